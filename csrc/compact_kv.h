// Plain C interface between the CUDA kernel (compact_kv.cu, no torch headers) and its torch binding
// (compact_kv_cuda.cpp). Semantics: pjd/ops/compact_kv.py and docs/compaction.md.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One tensor to compact, seen as [B, heads, S] rows of row_bytes bytes (a KV cache [B, H, S, D]
// has heads = H and row_bytes = D * element size; a meta tensor [B, S] has heads = 1).
// unit: bytes per load/store (16, 8, 4, 2 or 1); it must divide row_bytes and the address of data.
typedef struct PjdKvTensor {
  void* data;
  int64_t heads;
  int64_t row_bytes;
  int64_t unit;
} PjdKvTensor;

// Largest row the kernel accepts (it indexes a chunk of rows in 32 bits); a head dim of 128 in fp32
// is 512 bytes.
#define PJD_MAX_ROW_BYTES (1 << 20)

// Compacts every tensor of `tensors` (a DEVICE array of n_tensors descriptors) in one launch on
// `stream`. keep: bool [batch, keep_len]; dst_start, new_lengths: int32 [batch] (device memory).
// A sample whose dst_start is outside [0, tail_start] is left untouched and gets new_lengths = -1
// (the host never reads dst_start: that would synchronise). Returns the launch's cudaError_t.
int pjd_compact_kv_cuda(const PjdKvTensor* tensors, int n_tensors, int64_t max_heads, int64_t batch,
                        int64_t seq_len, const bool* keep, int64_t keep_len, int64_t tail_start,
                        const int32_t* dst_start, int32_t* new_lengths, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
