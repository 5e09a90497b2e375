// Plain C interface between the CUDA kernel (compact_kv.cu, no torch headers) and its torch binding
// (compact_kv_cuda.cpp). Semantics: pjd/ops/compact_kv.py and docs/compaction.md.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One tensor to compact, seen as [B, heads, S] rows of row_bytes bytes (a KV cache [B, H, S, D]
// has heads = H and row_bytes = D * element size; a meta tensor [B, S] has heads = 1). 16 bytes:
// the descriptors travel as a kernel parameter (see pjd_compact_kv_cuda).
typedef struct PjdKvTensor {
  void* data;
  int32_t heads;
  int32_t row_bytes;
} PjdKvTensor;

// Largest row the kernel accepts (it indexes a chunk of rows in 32 bits); a head dim of 128 in fp32
// is 512 bytes.
#define PJD_MAX_ROW_BYTES (1 << 20)

// Compacts every tensor of `tensors` (a HOST array of n_tensors descriptors, read before this
// returns) on `stream`. keep: bool [batch, keep_len]; dst_start, new_lengths: int32 [batch] (device
// memory). A sample whose dst_start is outside [0, tail_start] is left untouched and gets
// new_lengths = -1 (the host never reads dst_start: that would synchronise). The descriptors are
// kernel parameters, one launch per PJD_LAUNCH_TENSORS of them, so nothing is copied from host
// memory at run time and the call can be captured in a CUDA graph. Returns the first cudaError_t.
#define PJD_LAUNCH_TENSORS 240
int pjd_compact_kv_cuda(const PjdKvTensor* tensors, int n_tensors, int64_t batch, int64_t seq_len,
                        const bool* keep, int64_t keep_len, int64_t tail_start,
                        const int32_t* dst_start, int32_t* new_lengths, cudaStream_t stream);

// Whether the compaction kernel has an image the CURRENT device can run (a SASS build for its
// architecture, or PTX the driver can JIT for it): cudaSuccess, else the error of
// cudaFuncGetAttributes (e.g. cudaErrorNoKernelImageForDevice on a device older than the gencode
// list). The error is not left behind as the thread's last CUDA error.
int pjd_compact_kv_cuda_kernel_image(void);

#ifdef __cplusplus
}
#endif
