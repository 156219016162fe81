// The seeded download on the GPU: the Philox keep mask (philox.cuh) drawn in registers, never
// stored, for the server's compaction (delta -> kept positions + values) and the apply's
// expand-add (factor + kept values * scale), and the per-tensor counts apply checks first.
//
// Two passes, because an element's output slot depends on how many elements before it are kept:
//   1. a count kernel writes each tile's kept count;
//   2. cub::DeviceScan turns the tile counts into tile bases; a block then ranks its threads with
//      cub::BlockScan over their popcounts, and each thread walks its 16 flags.
// Dense streams (the factor in and out) go through cub::BlockLoad/BlockStore with the
// warp-transpose algorithm: coalesced whatever the alignment of a tensor inside the group.
// Kept values are read and written directly, only where kept (~5-20% of the elements).
//
// (The explicit-mask bitmap codec that shared these passes was deleted: nothing but its tests
// called it.)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/block/block_store.cuh>
#include <cub/device/device_scan.cuh>

#include "common.cuh"
#include "fedsrd_ops.h"

namespace fedsrd {
namespace {

constexpr int kThreads = kCodecThreads;
constexpr int kItems = kCodecItems;

// The tile a block works on.
struct Tile {
  int64_t tensor;  // owning tensor
  int64_t local;   // first element of the tile, counted in the tensor
  int64_t numel;   // elements of the tensor
  int64_t global;  // first element of the tile in the flat buffers
  int valid;       // elements of the tile inside the tensor (kCodecTile but for the last tile)
};

__device__ __forceinline__ Tile locate_tile(const GroupTables& g) {
  Tile tile;
  const int64_t id = blockIdx.x;
  tile.tensor = tensor_of_tile(g.tile_first, g.num_tensors, id);
  tile.local = (id - g.tile_first[tile.tensor]) * kCodecTile;
  const int64_t begin = g.offsets[tile.tensor];
  tile.numel = g.offsets[tile.tensor + 1] - begin;
  tile.global = begin + tile.local;
  const int64_t left = tile.numel - tile.local;
  tile.valid = static_cast<int>(left < kCodecTile ? left : kCodecTile);
  return tile;
}

// The mask source: the keep flags of the run of 16 elements a thread owns (first = its first
// element, counted in the tensor), from the tensor's Philox key.
struct PhiloxSource {
  const int64_t* keys;
  uint32_t threshold;
  __device__ __forceinline__ uint32_t bits(const Tile& tile, int64_t first) const {
    return philox_run_bits(static_cast<uint64_t>(keys[tile.tensor]), threshold, tile.numel, first);
  }
};

// Value formats for expand-add: storage bits <-> float32, exact widening, RNE narrowing.
struct Float32Format {
  using Bits = uint32_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ Bits from_float(float f) { return __float_as_uint(f); }
};
struct BFloat16Format {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return bfloat16_to_float(b); }
  static __device__ __forceinline__ Bits from_float(float f) { return float_to_bfloat16(f); }
};
struct Float16Format {
  using Bits = uint16_t;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
};  // a value format only: factors are float32 or bfloat16

__device__ __forceinline__ int64_t run_first(const Tile& tile) {
  return tile.local + static_cast<int64_t>(threadIdx.x) * kItems;
}

// ------------------------------------------------------------------------------------ pass 1

template <class Source>
__global__ void __launch_bounds__(kThreads)
    count_kernel(GroupTables g, Source source, int64_t* __restrict__ tile_counts) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const Tile tile = locate_tile(g);
  const uint32_t bits = source.bits(tile, run_first(tile));
  const int kept = Reduce(temp).Sum(__popc(bits));
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = kept;
}

__global__ void tensor_counts_kernel(GroupTables g, const int64_t* __restrict__ tile_base,
                                     int64_t* __restrict__ tensor_counts, int64_t* __restrict__ status) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < g.num_tensors) tensor_counts[t] = tile_base[g.tile_first[t + 1]] - tile_base[g.tile_first[t]];
  if (t == 0) status[0] = tile_base[g.num_tiles];
}

// ------------------------------------------------------------------------------------ pass 2

// The exclusive rank of this thread's first kept element in the tile (block-wide scan).
template <class ScanStorage>
__device__ __forceinline__ int64_t run_slot(ScanStorage& storage, const int64_t* tile_base, uint32_t bits) {
  int rank;
  cub::BlockScan<int, kThreads>(storage).ExclusiveSum(__popc(bits), rank);
  return tile_base[blockIdx.x] + rank;
}

template <class Source, class T>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(GroupTables g, Source source, const int64_t* __restrict__ tile_base, const T* __restrict__ values,
                   T* __restrict__ kept, int64_t* __restrict__ kept_index) {
  __shared__ typename cub::BlockScan<int, kThreads>::TempStorage temp;
  const Tile tile = locate_tile(g);
  const int64_t first = run_first(tile);
  const uint32_t bits = source.bits(tile, first);
  int64_t slot = run_slot(temp, tile_base, bits);
  const T* run = values + (tile.global - tile.local) + first;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if ((bits >> j) & 1u) {
      kept[slot] = run[j];
      if (kept_index != nullptr) kept_index[slot] = first + j;
      ++slot;
    }
  }
}

// A kept value widened to float32. The format is a kernel argument, not a template parameter: the
// switch is uniform across the grid and runs for kept elements only, and 3 value formats x 2
// factor formats (x 2 mask sources, then) as templates made codec.cu the slowest file of the CI
// compile test.
__device__ __forceinline__ float value_to_float(const void* values, int64_t i, FloatFormat format) {
  switch (format) {
    case FloatFormat::kBFloat16:
      return BFloat16Format::to_float(static_cast<const uint16_t*>(values)[i]);
    case FloatFormat::kFloat16:
      return Float16Format::to_float(static_cast<const uint16_t*>(values)[i]);
    default:
      return Float32Format::to_float(static_cast<const uint32_t*>(values)[i]);
  }
}

template <class Source, class F>
__global__ void __launch_bounds__(kThreads)
    expand_add_kernel(GroupTables g, Source source, const int64_t* __restrict__ tile_base,
                      const typename F::Bits* __restrict__ factor, const void* __restrict__ values,
                      FloatFormat value_format, const float* __restrict__ scales, typename F::Bits* __restrict__ out) {
  using Bits = typename F::Bits;
  using Load = cub::BlockLoad<Bits, kThreads, kItems, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Store = cub::BlockStore<Bits, kThreads, kItems, cub::BLOCK_STORE_WARP_TRANSPOSE>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Store::TempStorage store;
    typename cub::BlockScan<int, kThreads>::TempStorage scan;
  } temp;
  const Tile tile = locate_tile(g);
  Bits x[kItems];
  Load(temp.load).Load(factor + tile.global, x, tile.valid, Bits{0});
  __syncthreads();  // temp.load is reused by the scan
  const uint32_t bits = source.bits(tile, run_first(tile));
  int64_t slot = run_slot(temp.scan, tile_base, bits);
  const float scale = scales[tile.tensor];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    // torch adds a dense float32 delta: exactly 0.0f where dropped (-0.0 + 0.0 = +0.0 as there).
    float delta = 0.0f;
    if ((bits >> j) & 1u) delta = __fmul_rn(value_to_float(values, slot++, value_format), scale);
    x[j] = F::from_float(__fadd_rn(F::to_float(x[j]), delta));  // _rn intrinsics: never contracted to an FMA
  }
  __syncthreads();  // temp.scan is reused by the store
  Store(temp.store).Store(out + tile.global, x, tile.valid);
}

// ------------------------------------------------------------------------------------ launch

dim3 tile_grid(const GroupTables& g) { return dim3(static_cast<unsigned>(g.num_tiles)); }

template <class Source>
cudaError_t launch_compact(const GroupTables& g, Source source, const int64_t* tile_base, const void* values,
                           int elem_bytes, void* kept, int64_t* kept_index, cudaStream_t stream) {
  if (g.num_tiles == 0) return cudaSuccess;
  switch (elem_bytes) {
    case 2:
      compact_kernel<Source, uint16_t><<<tile_grid(g), kThreads, 0, stream>>>(
          g, source, tile_base, static_cast<const uint16_t*>(values), static_cast<uint16_t*>(kept), kept_index);
      break;
    case 4:
      compact_kernel<Source, uint32_t><<<tile_grid(g), kThreads, 0, stream>>>(
          g, source, tile_base, static_cast<const uint32_t*>(values), static_cast<uint32_t*>(kept), kept_index);
      break;
    case 8:
      compact_kernel<Source, uint64_t><<<tile_grid(g), kThreads, 0, stream>>>(
          g, source, tile_base, static_cast<const uint64_t*>(values), static_cast<uint64_t*>(kept), kept_index);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <class Source, class F>
void launch_expand_add_typed(const GroupTables& g, Source source, const int64_t* tile_base, const void* factor,
                             const void* values, FloatFormat value_format, const float* scales, void* out,
                             cudaStream_t stream) {
  expand_add_kernel<Source, F><<<tile_grid(g), kThreads, 0, stream>>>(
      g, source, tile_base, static_cast<const typename F::Bits*>(factor), values, value_format, scales,
      static_cast<typename F::Bits*>(out));
}

template <class Source>
cudaError_t launch_expand_add(const GroupTables& g, Source source, const int64_t* tile_base, const void* factor,
                              FloatFormat factor_format, const void* values, FloatFormat value_format,
                              const float* scales, void* out, cudaStream_t stream) {
  if (g.num_tiles == 0) return cudaSuccess;
  if (value_format != FloatFormat::kFloat32 && value_format != FloatFormat::kBFloat16 &&
      value_format != FloatFormat::kFloat16) {
    return cudaErrorInvalidValue;
  }
  switch (factor_format) {
    case FloatFormat::kFloat32:
      launch_expand_add_typed<Source, Float32Format>(g, source, tile_base, factor, values, value_format, scales, out,
                                                     stream);
      break;
    case FloatFormat::kBFloat16:
      launch_expand_add_typed<Source, BFloat16Format>(g, source, tile_base, factor, values, value_format, scales, out,
                                                      stream);
      break;
    default:
      return cudaErrorInvalidValue;  // factors are float32 or bfloat16
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t count_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold, int64_t* tile_counts,
                         cudaStream_t stream) {
  if (g.num_tiles == 0) return cudaSuccess;
  count_kernel<<<tile_grid(g), kThreads, 0, stream>>>(g, PhiloxSource{keys, threshold}, tile_counts);
  return cudaGetLastError();
}

cudaError_t scan_workspace_bytes(int64_t num_tiles, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceScan::ExclusiveSum(nullptr, *bytes, static_cast<const int64_t*>(nullptr),
                                       static_cast<int64_t*>(nullptr), static_cast<int>(num_tiles + 1));
}

cudaError_t scan_tiles(const GroupTables& g, const int64_t* tile_counts, int64_t* tile_base, int64_t* tensor_counts,
                       int64_t* status, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  cudaError_t err = cub::DeviceScan::ExclusiveSum(workspace, workspace_bytes, tile_counts, tile_base,
                                                  static_cast<int>(g.num_tiles + 1), stream);
  if (err != cudaSuccess) return err;
  const int64_t threads = 256;
  const int64_t blocks = g.num_tensors > 0 ? (g.num_tensors + threads - 1) / threads : 1;
  tensor_counts_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(g, tile_base, tensor_counts, status);
  return cudaGetLastError();
}

cudaError_t compact_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold, const int64_t* tile_base,
                           const void* values, int elem_bytes, void* kept, int64_t* kept_index, cudaStream_t stream) {
  return launch_compact(g, PhiloxSource{keys, threshold}, tile_base, values, elem_bytes, kept, kept_index, stream);
}

cudaError_t expand_add_philox(const GroupTables& g, const int64_t* keys, uint32_t threshold,
                              const int64_t* tile_base, const void* factor, FloatFormat factor_format,
                              const void* values, FloatFormat value_format, const float* scales, void* out,
                              cudaStream_t stream) {
  return launch_expand_add(g, PhiloxSource{keys, threshold}, tile_base, factor, factor_format, values, value_format,
                           scales, out, stream);
}

}  // namespace fedsrd
