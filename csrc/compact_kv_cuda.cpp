// Thin torch binding of the CUDA kernel (compact_kv.cu) for pjd::compact_kv, whose schema and CPU
// kernel live in compact_kv_cpu.cpp (extension pjd._C, imported first).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <exception>
#include <vector>

#include "compact_kv.h"
#include "compact_kv_checks.h"

namespace pjd {
namespace {

at::Tensor compact_kv_cuda(at::TensorList caches, const at::Tensor& keep, int64_t tail_start,
                           const at::Tensor& dst_start, at::TensorList meta) {
  check_compact_kv_args(caches, keep, tail_start, dst_start, meta);
  const c10::cuda::CUDAGuard guard(caches[0].device());
  const int64_t H = caches[0].size(1), S = caches[0].size(2);
  TORCH_CHECK_VALUE(H <= INT32_MAX, "compact_kv: caches have ", H, " heads, more than ", INT32_MAX);

  // Host descriptors: pjd_compact_kv_cuda passes them to the kernel by value (CUDA-graph safe).
  std::vector<PjdKvTensor> tensors;
  for (const at::Tensor& x : caches) {
    const int64_t row_bytes = x.size(3) * x.element_size();
    TORCH_CHECK_VALUE(row_bytes <= PJD_MAX_ROW_BYTES, "compact_kv: rows of ", row_bytes, " bytes exceed ",
                      PJD_MAX_ROW_BYTES);
    tensors.push_back({x.data_ptr(), static_cast<int32_t>(H), static_cast<int32_t>(row_bytes)});
  }
  for (const at::Tensor& m : meta) {
    tensors.push_back({m.data_ptr(), 1, static_cast<int32_t>(m.element_size())});
  }

  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor dst_c = dst_start.contiguous();
  at::Tensor new_lengths = at::empty_like(dst_c);
  const int err = pjd_compact_kv_cuda(
      tensors.data(), static_cast<int>(tensors.size()), keep_c.size(0), S, keep_c.data_ptr<bool>(),
      keep_c.size(1), tail_start, dst_c.data_ptr<int32_t>(), new_lengths.data_ptr<int32_t>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "compact_kv: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return new_lengths;
}

// kernel_image_error(device_index) -> None when the compaction kernel has an image CUDA device
// `device_index` can run, else the CUDA error saying why (cudaFuncGetAttributes on that device).
// pjd.ops.compact_kv asks this before choosing the CUDA op: the binary's gencode list (setup.py)
// is the one source of truth for the devices it runs on.
PyObject* kernel_image_error(PyObject* /*module*/, PyObject* arg) {
  const long index = PyLong_AsLong(arg);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  int err = cudaSuccess;
  try {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
    err = pjd_compact_kv_cuda_kernel_image();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (err == cudaSuccess) Py_RETURN_NONE;
  const auto code = static_cast<cudaError_t>(err);
  return PyUnicode_FromFormat("%s: %s", cudaGetErrorName(code), cudaGetErrorString(code));
}

PyMethodDef methods[] = {
    {"kernel_image_error", kernel_image_error, METH_O,
     "kernel_image_error(device_index) -> None if compact_kv's CUDA kernel runs on that device, else why not"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace pjd

TORCH_LIBRARY_IMPL(pjd, CUDA, m) { m.impl("compact_kv", &pjd::compact_kv_cuda); }

// `import pjd._C_cuda` loads this library (and so runs the registration above).
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, pjd::methods};
  return PyModule_Create(&module);
}
