// pjd::compact_kv: op schema (TORCH_LIBRARY) and CPU kernel. The CUDA kernel registers into the
// same schema from compact_kv_cuda.cpp (extension pjd._C_cuda). Semantics: pjd/ops/compact_kv.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "compact_kv_checks.h"

namespace pjd {
namespace {

// One unit of parallel work: the [S, row_bytes] rows of one head of one sample of one tensor.
struct Slab {
  char* rows;
  int64_t row_bytes;
  int64_t sample;
};

at::Tensor compact_kv_cpu(at::TensorList caches, const at::Tensor& keep, int64_t tail_start,
                          const at::Tensor& dst_start, at::TensorList meta) {
  check_compact_kv_args(caches, keep, tail_start, dst_start, meta);
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor new_lengths = dst_start.contiguous().clone();
  const int64_t B = keep_c.size(0), T = keep_c.size(1);
  const int64_t H = caches[0].size(1), S = caches[0].size(2);
  const bool* keep_p = keep_c.data_ptr<bool>();
  int32_t* len_p = new_lengths.data_ptr<int32_t>();

  // Kept tail indices of every sample, in increasing order (CSR: sample b owns [first[b], first[b+1])).
  std::vector<int64_t> kept, first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len_p[b] >= 0 && len_p[b] <= tail_start, "compact_kv: dst_start[", b, "] = ", len_p[b],
                      " is outside [0, tail_start=", tail_start, "]");
    for (int64_t t = 0; t < T; ++t) {
      if (keep_p[b * T + t]) kept.push_back(t);
    }
    first[b + 1] = static_cast<int64_t>(kept.size());
  }

  std::vector<Slab> slabs;
  int64_t bytes_moved = 0;
  auto add = [&](const at::Tensor& x, int64_t heads, int64_t row_bytes) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        slabs.push_back({static_cast<char*>(x.data_ptr()) + (b * heads + h) * S * row_bytes, row_bytes, b});
      }
    }
    bytes_moved += heads * static_cast<int64_t>(kept.size()) * row_bytes;
  };
  for (const at::Tensor& x : caches) add(x, H, x.size(3) * x.element_size());
  for (const at::Tensor& m : meta) add(m, 1, m.element_size());

  // Split across threads only when each gets a worthwhile amount of copying (~64 KiB).
  const int64_t n = static_cast<int64_t>(slabs.size());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) * n / std::max<int64_t>(1, bytes_moved));
  // Rows are whole row_bytes slots, so a source and its destination are the same row or disjoint.
  // Within a slab the entries go in increasing order and entry i lands at dst_i <= src_i < src_j
  // for every later j: a write never clobbers a row that is still to be read.
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const Slab& slab = slabs[s];
      const int64_t b = slab.sample;
      char* dst = slab.rows + static_cast<int64_t>(len_p[b]) * slab.row_bytes;
      for (int64_t i = first[b]; i < first[b + 1]; ++i, dst += slab.row_bytes) {
        const char* src = slab.rows + (tail_start + kept[i]) * slab.row_bytes;
        if (dst != src) std::memcpy(dst, src, slab.row_bytes);
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) len_p[b] += static_cast<int32_t>(first[b + 1] - first[b]);
  return new_lengths;
}

}  // namespace
}  // namespace pjd

TORCH_LIBRARY(pjd, m) {
  // The fake (meta) kernel is registered in Python, from this module.
  m.set_python_module("pjd.ops.compact_kv");
  m.def("compact_kv(Tensor(a!)[] caches, Tensor keep, int tail_start, Tensor dst_start, Tensor(b!)[] meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(pjd, CPU, m) { m.impl("compact_kv", &pjd::compact_kv_cpu); }

// `import pjd._C` loads this library (and so runs the registrations above); it has no Python API.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
