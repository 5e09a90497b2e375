// Thin torch binding of the CUDA kernel (compact_kv.cu) for pjd::compact_kv, whose schema and CPU
// kernel live in compact_kv_cpu.cpp (extension pjd._C, imported first).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "compact_kv.h"
#include "compact_kv_checks.h"

namespace pjd {
namespace {

// Widest power-of-two unit (<= 16 bytes) dividing both the row size and the tensor's address.
int64_t copy_unit(const at::Tensor& x, int64_t row_bytes) {
  const auto addr = reinterpret_cast<std::uintptr_t>(x.data_ptr());
  int64_t unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || addr % unit != 0)) unit /= 2;
  return unit;
}

at::Tensor compact_kv_cuda(at::TensorList caches, const at::Tensor& keep, int64_t tail_start,
                           const at::Tensor& dst_start, at::TensorList meta) {
  check_compact_kv_args(caches, keep, tail_start, dst_start, meta);
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const int64_t H = caches[0].size(1), S = caches[0].size(2);

  std::vector<PjdKvTensor> table;
  for (const at::Tensor& x : caches) {
    const int64_t row_bytes = x.size(3) * x.element_size();
    TORCH_CHECK_VALUE(row_bytes <= PJD_MAX_ROW_BYTES, "compact_kv: rows of ", row_bytes, " bytes exceed ",
                      PJD_MAX_ROW_BYTES);
    table.push_back({x.data_ptr(), H, row_bytes, copy_unit(x, row_bytes)});
  }
  for (const at::Tensor& m : meta) {
    table.push_back({m.data_ptr(), 1, m.element_size(), copy_unit(m, m.element_size())});
  }
  // The descriptor table goes to the device through pinned memory, asynchronously on the current
  // stream (the caching host allocator keeps the staging buffer alive until the copy has run).
  const int64_t table_bytes = static_cast<int64_t>(table.size() * sizeof(PjdKvTensor));
  at::Tensor host = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), table_bytes);
  const at::Tensor device_table = host.to(caches[0].device(), /*non_blocking=*/true);

  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor dst_c = dst_start.contiguous();
  at::Tensor new_lengths = at::empty_like(dst_c);
  const int err = pjd_compact_kv_cuda(
      static_cast<const PjdKvTensor*>(device_table.data_ptr()), static_cast<int>(table.size()), H,
      keep_c.size(0), S, keep_c.data_ptr<bool>(), keep_c.size(1), tail_start, dst_c.data_ptr<int32_t>(),
      new_lengths.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "compact_kv: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return new_lengths;
}

}  // namespace
}  // namespace pjd

TORCH_LIBRARY_IMPL(pjd, CUDA, m) { m.impl("compact_kv", &pjd::compact_kv_cuda); }

// `import pjd._C_cuda` loads this library (and so runs the registration above); no Python API.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
