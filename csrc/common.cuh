// Helpers shared by the download kernels, written for host and device: the CPU test
// (tests/test_cuda_compile.py) runs the host build of the seeded-run, tile and rounding rules.
#pragma once

#include <cstdint>
#include <cstring>

#include "fedsrd_ops.h"
#include "philox.cuh"

namespace fedsrd {

FEDSRD_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Flags of the elements of a run of kCodecItems that lie inside the tensor (remaining = numel - first).
FEDSRD_HD uint32_t run_valid_bits(int64_t remaining) {
  if (remaining >= kCodecItems) return (1u << kCodecItems) - 1u;
  return remaining <= 0 ? 0u : (1u << remaining) - 1u;
}

// Which tensor owns tile `tile`: the largest t with tile_first[t] <= tile. Empty tensors own no
// tile and share their tile_first with the next tensor, so the largest such t is the owner.
FEDSRD_HD int64_t tensor_of_tile(const int64_t* tile_first, int64_t num_tensors, int64_t tile) {
  int64_t lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (tile_first[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Keep flags of the run first .. first + 15 under the seeded rule (philox.cuh): 4 counters.
FEDSRD_HD uint32_t philox_run_bits(uint64_t key, uint32_t threshold, int64_t numel, int64_t first) {
  uint32_t bits = 0;
  for (int q = 0; q < kCodecItems / 4; ++q) {
    if (first + 4 * q >= numel) break;  // the tail of a tensor: no word past its last counter
    const PhiloxWords w = philox_counter_words(key, static_cast<uint32_t>((first >> 2) + q));
    for (int l = 0; l < 4; ++l) bits |= static_cast<uint32_t>(w.lane[l] >= threshold) << (4 * q + l);
  }
  return bits & run_valid_bits(numel - first);
}

// Float formats as bit patterns. bfloat16 rounding is torch's c10::BFloat16 (nearest even, any
// NaN -> 0x7FC0) in integer ops, so the GPU and CPU paths give the same bits.
FEDSRD_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FEDSRD_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FEDSRD_HD float bfloat16_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

FEDSRD_HD uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace fedsrd
