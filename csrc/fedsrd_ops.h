// Launch API of the CUDA kernels in csrc/*.cu: raw device pointers, sizes and a stream.
//
// Plain C++ (no torch headers), so every .cu file compiles with plain nvcc; the one file that
// includes torch, bindings.cpp, checks the tensors and calls these functions. Every launcher
// returns the CUDA error of its launches (cudaSuccess when all went well).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace fedsrd {

// ------------------------------------------------------------------------------ seeded download
// The download kernels work on groups: tensor t of a group is flat[offsets[t], offsets[t + 1]) of
// a flat buffer. A block (one "tile") covers kCodecTile elements of one tensor, never two: each of
// its kCodecThreads threads owns kCodecItems consecutive elements, so a thread's keep flags are
// the 16 low bits of one uint32 (bit j = element j of its run) and its place in the output is a
// block-wide prefix sum of popcounts.
constexpr int kCodecThreads = 256;
constexpr int kCodecItems = 16;
constexpr int64_t kCodecTile = int64_t(kCodecThreads) * kCodecItems;  // 4096 elements

// Device tables of one grouped launch (built by the host, read by every block).
struct GroupTables {
  const int64_t* offsets;     // [num_tensors + 1] first element of each tensor; last = total
  const int64_t* tile_first;  // [num_tensors + 1] first tile of each tensor; last = num_tiles
  int64_t num_tensors;
  int64_t num_tiles;
};

// Storage formats the kernels read and write (bit patterns; only expand-add does arithmetic).
enum class FloatFormat : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Pass 1, seeded mask (philox.cuh): kept count of each tile. keys[t] is tensor t's 63-bit key;
// element i is kept iff its Philox word >= threshold.
cudaError_t count_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold, int64_t* tile_counts,
                         cudaStream_t stream);

// Between the passes: tile_base = exclusive prefix sum of tile_counts[0 .. num_tiles] (the last
// input is 0, so tile_base[num_tiles] is the total), tensor_counts[t] = kept in tensor t,
// status[0] = total. workspace: scan_workspace_bytes() bytes.
cudaError_t scan_workspace_bytes(int64_t num_tiles, size_t* bytes);
cudaError_t scan_tiles(const GroupTables& g, const int64_t* tile_counts, int64_t* tile_base, int64_t* tensor_counts,
                       int64_t* status, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Pass 2, compaction: kept[tile_base[tile] + rank] = values[element], in element order. A bit copy
// of elements of elem_bytes (2, 4 or 8) bytes. kept_index (optional) receives tensor-local indices.
cudaError_t compact_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold, const int64_t* tile_base,
                           const void* values, int elem_bytes, void* kept, int64_t* kept_index, cudaStream_t stream);

// Pass 2, expand-add: out = to_format(float(factor) + (kept ? float(value) * scales[t] : 0.0f)),
// the value being the next one of the flat value buffer in element order; one rounding per
// operation (no FMA), as torch computes fedsrd_kernels.server.apply.
cudaError_t expand_add_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold,
                              const int64_t* tile_base, const void* factor, FloatFormat factor_format,
                              const void* values, FloatFormat value_format, const float* scales, void* out,
                              cudaStream_t stream);

}  // namespace fedsrd
