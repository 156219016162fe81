// The one file of the extension that includes torch: it checks every input with TORCH_CHECK
// (device, dtype, shape, contiguity, group layout) before any launch, allocates the outputs and
// registers the CUDA kernels of the ops whose schemas and fake kernels are declared in Python
// (fedsrd_kernels/kernels/download/cuda.py). Grouped ops take the group layout as a host int[] of
// offsets (tensor t = flat[offsets[t], offsets[t + 1])), so it is checked here and uploaded once.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <tuple>

#include "fedsrd_ops.h"

namespace fedsrd {
namespace {

// Philox covers 4 * 2**32 elements of a tensor (the counter i / 4 is one uint32), as kernels/download/reference.py.
constexpr int64_t kMaxSeededNumel = int64_t{4} << 32;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// A 1-D contiguous CUDA tensor on `device` of one of `dtypes`.
void check_vector(const at::Tensor& t, const char* op, const char* name, std::initializer_list<at::ScalarType> dtypes,
                  const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  bool known = false;
  for (at::ScalarType dtype : dtypes) known = known || t.scalar_type() == dtype;
  TORCH_CHECK(known, op, ": ", name, " has dtype ", t.scalar_type(), ", which this op does not take");
}

FloatFormat float_format(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return FloatFormat::kBFloat16;
    case at::kHalf:
      return FloatFormat::kFloat16;
    default:
      return FloatFormat::kFloat32;
  }
}

uint32_t check_threshold(int64_t threshold, const char* op) {
  TORCH_CHECK(threshold >= 0 && threshold <= int64_t{0xFFFFFFFF}, op,
              ": threshold must be floor(drop * 2**32) in [0, 2**32), got ", threshold);
  return static_cast<uint32_t>(threshold);
}

// The device tables of one grouped launch (see GroupTables in fedsrd_ops.h).
struct GroupPlan {
  at::Tensor tables;  // owns the memory GroupTables points into
  GroupTables g{};
};

GroupPlan plan_group(c10::IntArrayRef offsets, int64_t numel, const at::Device& device, int64_t max_tensor_numel,
                     const char* op) {
  TORCH_CHECK(!offsets.empty() && offsets.front() == 0 && offsets.back() == numel, op,
              ": offsets must start at 0 and end at the flat size ", numel, ", got ", offsets);
  const int64_t num_tensors = static_cast<int64_t>(offsets.size()) - 1;
  at::Tensor host = at::empty({2 * (num_tensors + 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t tiles = 0;
  for (int64_t t = 0; t <= num_tensors; ++t) {
    h[t] = offsets[t];
    h[num_tensors + 1 + t] = tiles;
    if (t == num_tensors) break;
    const int64_t n = offsets[t + 1] - offsets[t];
    TORCH_CHECK(n >= 0, op, ": offsets must be non-decreasing, got ", offsets[t], " then ", offsets[t + 1]);
    TORCH_CHECK(n <= max_tensor_numel, op, ": tensor ", t, " has ", n, " elements, over the limit of ",
                max_tensor_numel);
    tiles += (n + kCodecTile - 1) / kCodecTile;
  }
  TORCH_CHECK(tiles < int64_t{INT32_MAX}, op, ": ", tiles, " tiles of ", kCodecTile, " elements are too many");
  GroupPlan plan;
  plan.tables = host.to(device, /*non_blocking=*/true);  // pinned: the caching host allocator keeps it until copied
  const int64_t* d = plan.tables.data_ptr<int64_t>();
  plan.g = GroupTables{d, d + num_tensors + 1, num_tensors, tiles};
  return plan;
}

// Pass 1 (the count) and the scan between the passes, for a group with at least one tile:
// count(tile_counts) launches the count kernel; the result holds the tile bases, the per-tensor
// counts and the total, read back in the op's one host sync.
struct Counted {
  at::Tensor tile_base;      // [num_tiles + 1] first output slot of each tile
  at::Tensor tensor_counts;  // [num_tensors] kept per tensor (device)
  int64_t total = 0;
};

template <class CountFn>
Counted count_and_scan(const GroupPlan& plan, const at::Device& device, cudaStream_t stream, const char* op,
                       CountFn&& count) {
  const auto longs = at::TensorOptions().device(device).dtype(at::kLong);
  at::Tensor tile_counts = at::zeros({plan.g.num_tiles + 1}, longs);  // the last stays 0: the scan's total
  at::Tensor status = at::zeros({1}, longs);
  check_cuda(count(tile_counts.data_ptr<int64_t>()), op);
  size_t bytes = 0;
  check_cuda(scan_workspace_bytes(plan.g.num_tiles, &bytes), op);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, longs.dtype(at::kByte));
  Counted out;
  out.tile_base = at::empty({plan.g.num_tiles + 1}, longs);
  out.tensor_counts = at::empty({plan.g.num_tensors}, longs);
  check_cuda(scan_tiles(plan.g, tile_counts.data_ptr<int64_t>(), out.tile_base.data_ptr<int64_t>(),
                        out.tensor_counts.data_ptr<int64_t>(), status.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
                        stream),
             op);
  out.total = status.item<int64_t>();  // the host sync: output sizes come from the data
  return out;
}

// --------------------------------------------------------------------------------------- ops

at::Tensor seeded_count_cuda(const at::Tensor& keys, c10::IntArrayRef offsets, int64_t threshold) {
  const char* op = "fedsrd::seeded_count";
  TORCH_CHECK(keys.is_cuda(), op, ": keys must be a CUDA tensor, got one on ", keys.device());
  const at::Device device = keys.device();
  check_vector(keys, op, "keys", {at::kLong}, device);
  const uint32_t t32 = check_threshold(threshold, op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t numel = offsets.empty() ? 0 : offsets.back();
  const GroupPlan plan = plan_group(offsets, numel, device, kMaxSeededNumel, op);
  TORCH_CHECK(keys.numel() == plan.g.num_tensors, op, ": ", keys.numel(), " keys for ", plan.g.num_tensors,
              " tensors");
  if (plan.g.num_tiles == 0) return at::zeros({plan.g.num_tensors}, keys.options());
  const Counted counted = count_and_scan(plan, device, stream, op, [&](int64_t* tile_counts) {
    return count_philox(plan.g, keys.data_ptr<int64_t>(), t32, tile_counts, stream);
  });
  return counted.tensor_counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seeded_compact_cuda(const at::Tensor& values, const at::Tensor& keys,
                                                              c10::IntArrayRef offsets, int64_t threshold) {
  const char* op = "fedsrd::seeded_compact";
  TORCH_CHECK(values.is_cuda(), op, ": values must be a CUDA tensor, got one on ", values.device());
  const at::Device device = values.device();
  check_vector(values, op, "values", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}, device);
  check_vector(keys, op, "keys", {at::kLong}, device);
  const uint32_t t32 = check_threshold(threshold, op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const GroupPlan plan = plan_group(offsets, values.numel(), device, kMaxSeededNumel, op);
  TORCH_CHECK(keys.numel() == plan.g.num_tensors, op, ": ", keys.numel(), " keys for ", plan.g.num_tensors,
              " tensors");
  const auto longs = values.options().dtype(at::kLong);
  if (plan.g.num_tiles == 0) {
    return {at::empty({0}, longs), at::empty({0}, values.options()), at::zeros({plan.g.num_tensors}, longs)};
  }
  const Counted counted = count_and_scan(plan, device, stream, op, [&](int64_t* tile_counts) {
    return count_philox(plan.g, keys.data_ptr<int64_t>(), t32, tile_counts, stream);
  });
  at::Tensor indices = at::empty({counted.total}, longs);
  at::Tensor kept = at::empty({counted.total}, values.options());
  if (counted.total > 0) {
    check_cuda(compact_philox(plan.g, keys.data_ptr<int64_t>(), t32, counted.tile_base.data_ptr<int64_t>(),
                              values.data_ptr(), static_cast<int>(values.element_size()), kept.data_ptr(),
                              indices.data_ptr<int64_t>(), stream),
               op);
  }
  return {indices, kept, counted.tensor_counts};
}

at::Tensor seeded_expand_add_cuda(const at::Tensor& factor, const at::Tensor& values, const at::Tensor& keys,
                             const at::Tensor& scales, c10::IntArrayRef offsets, int64_t threshold) {
  const char* op = "fedsrd::seeded_expand_add";
  TORCH_CHECK(factor.is_cuda(), op, ": factor must be a CUDA tensor, got one on ", factor.device());
  const at::Device device = factor.device();
  check_vector(factor, op, "factor", {at::kFloat, at::kBFloat16}, device);
  check_vector(values, op, "values", {at::kFloat, at::kBFloat16, at::kHalf}, device);
  check_vector(keys, op, "keys", {at::kLong}, device);
  check_vector(scales, op, "scales", {at::kFloat}, device);
  const uint32_t t32 = check_threshold(threshold, op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const GroupPlan plan = plan_group(offsets, factor.numel(), device, kMaxSeededNumel, op);
  TORCH_CHECK(keys.numel() == plan.g.num_tensors, op, ": ", keys.numel(), " keys for ", plan.g.num_tensors,
              " tensors");
  TORCH_CHECK(scales.numel() == plan.g.num_tensors, op, ": ", scales.numel(), " scales for ", plan.g.num_tensors,
              " tensors");
  at::Tensor out = at::empty_like(factor);
  if (plan.g.num_tiles == 0) {
    TORCH_CHECK(values.numel() == 0, op, ": the masks keep 0 elements, got ", values.numel(), " values");
    return out;
  }
  const Counted counted = count_and_scan(plan, device, stream, op, [&](int64_t* tile_counts) {
    return count_philox(plan.g, keys.data_ptr<int64_t>(), t32, tile_counts, stream);
  });
  TORCH_CHECK(counted.total == values.numel(), op, ": the masks keep ", counted.total, " elements, got ",
              values.numel(), " values");
  check_cuda(expand_add_philox(plan.g, keys.data_ptr<int64_t>(), t32, counted.tile_base.data_ptr<int64_t>(),
                               factor.data_ptr(), float_format(factor), values.data_ptr(), float_format(values),
                               scales.data_ptr<float>(), out.data_ptr(), stream),
             op);
  return out;
}

// Registered from PyInit__C rather than a static TORCH_LIBRARY_IMPL: a kernel whose C++ signature
// does not match the schema declared in kernels/download/cuda.py then fails the import with an ImportError
// (the package warns once and uses Triton or torch) instead of terminating the process.
void register_cuda_kernels() {
  static torch::Library* library = nullptr;  // lives as long as the process: it owns the registrations
  if (library != nullptr) return;
  library = new torch::Library(torch::Library::IMPL, "fedsrd", c10::DispatchKey::CUDA, __FILE__, __LINE__);
  library->impl("seeded_count", &seeded_count_cuda);
  library->impl("seeded_compact", &seeded_compact_cuda);
  library->impl("seeded_expand_add", &seeded_expand_add_cuda);
}

}  // namespace
}  // namespace fedsrd

// A Python module without functions: importing fedsrd_kernels._C registers the kernels (the
// torchao pattern; no pybind11 needed).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  try {
    fedsrd::register_cuda_kernels();
  } catch (const std::exception& exc) {
    PyErr_SetString(PyExc_ImportError, exc.what());
    return nullptr;
  }
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fedsrd_kernels CUDA ops (see torch.ops.fedsrd)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
