// Philox4x32-10 (Random123) and the download keep rule of fedsrd_kernels/kernels/download/reference.py.
//
// Element i of a tensor with 63-bit key K is kept iff lane i % 4 of Philox4x32-10 on counter
// (i / 4, 0, 0, 0) with key (K & 0xffffffff, K >> 32) is >= threshold = floor(drop * 2**32).
//
// Why not curand: curand's Philox4_32_10 is this generator and does reproduce the rule
// (curand_init(K, 0, 4 * (i / 4)) then curand4(): seed = key, subsequence = the counter's high 64
// bits, offset / 4 = its low 64 bits). But curand_kernel.h is not part of every CUDA toolkit (it
// is not in the one CI compiles with), its state (64 bytes with Box-Muller fields) and skip-ahead
// are machinery a stateless counter-based draw does not need, and the round function below is ten
// lines. Host and device share it, so the CPU build of tests/test_cuda_compile.py checks it
// against the numpy reference, and tests/test_cuda_ops.py checks the device build through the
// positions the compaction returns.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEDSRD_HD __host__ __device__ __forceinline__
#else
#define FEDSRD_HD inline
#endif

namespace fedsrd {

struct PhiloxWords {
  uint32_t lane[4];
};

FEDSRD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Random123 philox4x32 with 10 rounds: the round uses the key, then the key is bumped.
FEDSRD_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four words deciding elements 4 * counter .. 4 * counter + 3 under a 63-bit key.
FEDSRD_HD PhiloxWords philox_counter_words(uint64_t key, uint32_t counter) {
  return philox4x32_10(counter, 0u, 0u, 0u, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

}  // namespace fedsrd
