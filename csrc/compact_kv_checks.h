// Argument checks shared by the CPU op and the CUDA binding (torch side only). The Python wrapper
// pjd.ops.compact_kv checks the same things first with friendlier messages; these guard direct
// torch.ops.pjd.compact_kv calls. TORCH_CHECK_VALUE / _TYPE surface as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>

namespace pjd {

inline void check_compact_kv_args(at::TensorList caches, const at::Tensor& keep, int64_t tail_start,
                                  const at::Tensor& dst_start, at::TensorList meta) {
  TORCH_CHECK_VALUE(!caches.empty(), "compact_kv: caches must hold at least one tensor");
  const at::Tensor& x0 = caches[0];
  TORCH_CHECK_VALUE(x0.dim() == 4, "compact_kv: caches[0] must be [B, H, S, D], got ", x0.sizes());
  const int64_t B = x0.size(0), S = x0.size(2);
  TORCH_CHECK_VALUE(x0.size(1) >= 1 && x0.size(3) >= 1, "compact_kv: caches need H >= 1 and D >= 1, got ",
                    x0.sizes());
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& x = caches[i];
    TORCH_CHECK_VALUE(x.sizes() == x0.sizes(), "compact_kv: caches[", i, "] has shape ", x.sizes(),
                      ", caches[0] has ", x0.sizes());
    TORCH_CHECK_TYPE(x.scalar_type() == x0.scalar_type(), "compact_kv: caches[", i, "] is ",
                     x.scalar_type(), ", caches[0] is ", x0.scalar_type());
    TORCH_CHECK_VALUE(x.device() == x0.device(), "compact_kv: caches[", i, "] is on ", x.device(),
                      ", caches[0] on ", x0.device());
    TORCH_CHECK_VALUE(x.is_contiguous(), "compact_kv: caches[", i, "] must be contiguous");
  }
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "compact_kv: keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.size(0) == B, "compact_kv: keep must be [B=", B, ", T], got ",
                    keep.sizes());
  TORCH_CHECK_VALUE(keep.device() == x0.device(), "compact_kv: keep is on ", keep.device(),
                    ", caches on ", x0.device());
  TORCH_CHECK_VALUE(tail_start >= 0 && tail_start + keep.size(1) <= S, "compact_kv: need 0 <= tail_start and ",
                    "tail_start + T <= S, got tail_start=", tail_start, ", T=", keep.size(1), ", S=", S);
  TORCH_CHECK_TYPE(dst_start.scalar_type() == at::kInt, "compact_kv: dst_start must be int32, got ",
                   dst_start.scalar_type());
  TORCH_CHECK_VALUE(dst_start.dim() == 1 && dst_start.size(0) == B, "compact_kv: dst_start must be [B=", B,
                    "], got ", dst_start.sizes());
  TORCH_CHECK_VALUE(dst_start.device() == x0.device(), "compact_kv: dst_start is on ", dst_start.device(),
                    ", caches on ", x0.device());
  for (size_t i = 0; i < meta.size(); ++i) {
    const at::Tensor& m = meta[i];
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == S, "compact_kv: meta[", i,
                      "] must be [B=", B, ", S=", S, "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == x0.device(), "compact_kv: meta[", i, "] is on ", m.device(),
                      ", caches on ", x0.device());
    TORCH_CHECK_VALUE(m.is_contiguous(), "compact_kv: meta[", i, "] must be contiguous");
  }
}

}  // namespace pjd
