// KV-cache compaction after rejections: one launch moves the kept entries of the appended tail of
// every tensor of every layer (plain CUDA, no torch headers; binding in compact_kv_cuda.cpp).
//
// Work split: one block per (tensor, sample, head): the rows it moves, [S, row_bytes] of one head
// of one sample, are disjoint from every other block's, so blocks never need to coordinate.
//
// Kept-index prefix sum on device: each block scans keep[b, :] itself, kThreads entries at a time
// (warp ballot + popcount, then the warp totals), into a shared list of kept tail indices. The scan
// is redundant across the heads of a sample, but T is ~100 booleans: cheaper than a second launch
// and the host never reads keep or dst_start (no synchronisation).
//
// Overlap: the kept entry of rank i moves from row src_i = tail_start + t_i to dst_i = dst_start + i
// with dst_start <= tail_start and i <= t_i, so dst_i <= src_i < src_j for every later entry j.
// The block walks the stream of (kept entry, unit) pairs in increasing order, a stage of
// kThreads * kUnitsPerThread pairs at a time: all loads of a stage go to registers, then a
// barrier, then all its stores. A store of pair (i, u) can only hit a row read by an entry j <= i:
// j < i was loaded in this or an earlier stage (before the barrier), and j = i with a different
// unit u' is a different address (same unit: the very load of this pair). So no load ever sees a
// value stored by this compaction, which is what the sequential per-sample loop guarantees.
// Rows are copied with the widest unit (16-byte uint4 down to 1 byte) that divides the row size
// and the tensor's address.
//
// Descriptors by value: the tensors' descriptors are a kernel parameter (LaunchTensors), not a table
// in device memory. A table would have to be uploaded on every call from a host buffer, and a
// CUDA graph replays such a copy from that buffer long after the call returned (freed or reused by
// then). Kernel parameters are copied into the graph when it is captured, so the op is capturable.
// The classic 4 KiB parameter limit holds PJD_LAUNCH_TENSORS = 240 descriptors of 16 bytes plus
// the other arguments: 32 layers of K and V with positions and states (66 tensors) take one launch,
// larger sets one launch per 240 tensors, in order on one stream.
#include "compact_kv.h"

#include <limits.h>

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnitsPerThread = 4;  // registers staged per thread and stage (4 x 16 B with uint4)

struct LaunchTensors {
  PjdKvTensor tensors[PJD_LAUNCH_TENSORS];
};
static_assert(sizeof(PjdKvTensor) == 16, "PjdKvTensor must stay 16 bytes (kernel parameter budget)");
static_assert(sizeof(LaunchTensors) <= 4096 - 256,
              "the descriptors must leave 256 bytes of the 4 KiB kernel parameters to the other arguments");

template <typename Unit>
__device__ void copy_kept_rows(char* slab, const int* kept_t, unsigned n_kept, int64_t dst_row0,
                               int64_t tail_start, int64_t row_bytes) {
  // 32-bit stream indices: n_kept <= kThreads and the binding caps row_bytes at PJD_MAX_ROW_BYTES.
  const unsigned units_per_row = static_cast<unsigned>(row_bytes / sizeof(Unit));
  const unsigned total = n_kept * units_per_row;
  for (unsigned stage = 0; stage < total; stage += kThreads * kUnitsPerThread) {
    Unit staged[kUnitsPerThread];
#pragma unroll
    for (int k = 0; k < kUnitsPerThread; ++k) {
      const unsigned e = stage + k * kThreads + threadIdx.x;
      if (e < total) {
        const unsigned r = e / units_per_row;
        const int64_t src_row = tail_start + kept_t[r];
        staged[k] = reinterpret_cast<const Unit*>(slab + src_row * row_bytes)[e - r * units_per_row];
      }
    }
    __syncthreads();  // every load of this stage happens before any of its stores
#pragma unroll
    for (int k = 0; k < kUnitsPerThread; ++k) {
      const unsigned e = stage + k * kThreads + threadIdx.x;
      if (e < total) {
        const unsigned r = e / units_per_row;
        const int64_t src_row = tail_start + kept_t[r];
        const int64_t dst_row = dst_row0 + r;
        if (dst_row != src_row) {  // an entry already in place costs no store
          reinterpret_cast<Unit*>(slab + dst_row * row_bytes)[e - r * units_per_row] = staged[k];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
compact_kv_kernel(const LaunchTensors launch, int max_heads, int64_t batch, int64_t seq_len,
                  const bool* __restrict__ keep, int64_t keep_len, int64_t tail_start,
                  const int32_t* __restrict__ dst_start, int32_t* __restrict__ new_lengths,
                  bool report_lengths) {
  const int64_t head = blockIdx.x % max_heads;
  const int64_t b = (blockIdx.x / max_heads) % batch;
  const int64_t tensor = blockIdx.x / (max_heads * batch);
  const PjdKvTensor t = launch.tensors[tensor];
  // In the first launch the block of (tensor 0, head 0) reports the sample's new length; it exists
  // since heads >= 1.
  const bool reporter = report_lengths && tensor == 0 && head == 0 && threadIdx.x == 0;
  if (head >= t.heads) return;  // meta tensors have one head: the rest of their blocks idle

  const int64_t dst0 = dst_start[b];
  if (dst0 < 0 || dst0 > tail_start) {
    if (reporter) new_lengths[b] = -1;
    return;
  }
  char* slab = static_cast<char*>(t.data) + (b * t.heads + head) * seq_len * t.row_bytes;
  // The widest power-of-two unit (<= 16 bytes) dividing both the row size and the tensor's address;
  // it divides every row's address too (rows start at multiples of row_bytes from data).
  const unsigned bits = static_cast<unsigned>(reinterpret_cast<uintptr_t>(t.data)) | t.row_bytes;
  const unsigned unit = min(bits & (0u - bits), 16u);

  __shared__ int kept_t[kThreads];
  __shared__ int warp_count[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t n_done = 0;
  for (int64_t t0 = 0; t0 < keep_len; t0 += kThreads) {
    const int64_t tt = t0 + threadIdx.x;
    const bool kept = tt < keep_len && keep[b * keep_len + tt];
    const unsigned ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = __popc(ballot & ((1u << lane) - 1u));
    unsigned n_kept = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? warp_count[w] : 0;
      n_kept += warp_count[w];
    }
    if (kept) kept_t[offset] = static_cast<int>(tt);
    __syncthreads();  // the list is complete

    switch (unit) {
      case 16: copy_kept_rows<uint4>(slab, kept_t, n_kept, dst0 + n_done, tail_start, t.row_bytes); break;
      case 8: copy_kept_rows<uint2>(slab, kept_t, n_kept, dst0 + n_done, tail_start, t.row_bytes); break;
      case 4: copy_kept_rows<unsigned>(slab, kept_t, n_kept, dst0 + n_done, tail_start, t.row_bytes); break;
      case 2: copy_kept_rows<unsigned short>(slab, kept_t, n_kept, dst0 + n_done, tail_start, t.row_bytes); break;
      default: copy_kept_rows<unsigned char>(slab, kept_t, n_kept, dst0 + n_done, tail_start, t.row_bytes); break;
    }
    n_done += n_kept;
    __syncthreads();  // kept_t and warp_count are rewritten by the next chunk
  }
  if (reporter) new_lengths[b] = static_cast<int32_t>(dst0 + n_done);
}

}  // namespace

extern "C" int pjd_compact_kv_cuda(const PjdKvTensor* tensors, int n_tensors, int64_t batch,
                                   int64_t seq_len, const bool* keep, int64_t keep_len,
                                   int64_t tail_start, const int32_t* dst_start,
                                   int32_t* new_lengths, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  for (int first = 0; first < n_tensors; first += PJD_LAUNCH_TENSORS) {
    const int count = min(n_tensors - first, PJD_LAUNCH_TENSORS);
    LaunchTensors launch = {};
    int max_heads = 0;
    for (int i = 0; i < count; ++i) {
      launch.tensors[i] = tensors[first + i];
      max_heads = max(max_heads, launch.tensors[i].heads);
    }
    const int64_t blocks = count * static_cast<int64_t>(max_heads) * batch;
    if (max_heads < 1 || blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    compact_kv_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        launch, max_heads, batch, seq_len, keep, keep_len, tail_start, dst_start, new_lengths,
        /*report_lengths=*/first == 0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

extern "C" int pjd_compact_kv_cuda_kernel_image(void) {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, compact_kv_kernel);
  if (err != cudaSuccess) cudaGetLastError();  // returned to the caller, not left for the next check
  return err;
}
