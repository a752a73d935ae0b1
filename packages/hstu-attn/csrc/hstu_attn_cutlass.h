// C ABI of the hstu-attn CUTLASS/CuTe kernels (libhstu_attn_cutlass.so).
//
// The library depends on the CUDA runtime only (no torch, no Python headers), so one build serves every torch
// and Python version; hstu_attn/cutlass/_library.py binds it with ctypes and mirrors HstuAttnFwdParams.
// Bump HSTU_ATTN_CUTLASS_ABI_VERSION whenever the struct or a signature changes.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HSTU_ATTN_CUTLASS_ABI_VERSION 7
#define HSTU_ATTN_API __attribute__((visibility("default")))

enum HstuAttnDtype { HSTU_ATTN_FP16 = 0, HSTU_ATTN_BF16 = 1 };

enum HstuAttnStatus {
  HSTU_ATTN_OK = 0,
  HSTU_ATTN_UNSUPPORTED_DTYPE = -1,
  HSTU_ATTN_UNSUPPORTED_HEAD_DIM = -2,
  HSTU_ATTN_BAD_ARGUMENT = -3,
  // Positive values are cudaError_t codes.
};

// Element type of HstuAttnRelativeBias.timestamps.
enum HstuAttnTimestampDtype {
  HSTU_ATTN_TIMESTAMPS_INT32 = 0,
  HSTU_ATTN_TIMESTAMPS_INT64 = 1,
  HSTU_ATTN_TIMESTAMPS_FP32 = 2,
  HSTU_ATTN_TIMESTAMPS_FP64 = 3,
  HSTU_ATTN_TIMESTAMPS_FP16 = 4,
  HSTU_ATTN_TIMESTAMPS_BF16 = 5,
};

// The fused relative bias of hstu_attn.relative_bias (no [B, H, N, N] tensor): for query i and key j of one sequence
// (in-sequence positions) and head h, bias = position_weights[h, clamp(j - i, -R, R) + R] (R = position_reach)
// + time_weights[h, clamp(floor(logf(max(|t_j - t_i|, 1)) * inv_time_bucket_divisor), 0, num_time_buckets - 1)],
// each term present when its table is not NULL, added to alpha * q k^T before SiLU (beside rab, when both are given).
// The tables are fp32 [Hb, width] with unit stride along the width; a head's row is head * *_head_stride (0: one row
// shared by the heads). timestamps [L] (same jagged layout as q; needed with time_weights) are of type
// timestamps_dtype; t_j - t_i is taken in that type (integers wrap, fp16/bf16 round the fp32 difference), its
// magnitude in fp32. inv_time_bucket_divisor is the fp32 reciprocal of the bucket divisor (as PyTorch on CUDA divides).
typedef struct HstuAttnRelativeBias {
  const float* position_weights;
  const float* time_weights;
  const void* timestamps;
  int64_t position_head_stride, time_head_stride;
  int32_t position_reach;
  int32_t num_time_buckets;
  int32_t timestamps_dtype;  // HstuAttnTimestampDtype
  float inv_time_bucket_divisor;
} HstuAttnRelativeBias;

// Forward of jagged HSTU attention for one batch. Tensors are [L, H, D] with unit stride along D;
// seq_offsets [B+1] and num_targets [B] (NULL: no targets) are int32 or int64 as the flags say.
// rab (NULL: none) is the bias [B, H or 1, N, N] in the input dtype, indexed by in-sequence positions (query row,
// key column) with unit stride along the key column, added to alpha * q k^T before SiLU; a rab shared by the heads
// has rab_head_stride 0. Entries at invalid pairs are never used, entries past a sequence's end never read.
// relative_bias (both tables NULL: none) is the fused relative bias above, computed in the kernel.
typedef struct HstuAttnFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const void* seq_offsets;
  const void* num_targets;
  const void* rab;
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t rab_batch_stride, rab_head_stride, rab_row_stride;
  int32_t num_sequences;
  int32_t num_heads;
  int32_t head_dim;
  int32_t max_seq_len;
  int32_t dtype;  // HstuAttnDtype
  int32_t offsets_int64;
  int32_t targets_int64;
  int32_t causal;
  int32_t contextual_seq_len;
  int32_t max_attn_len;  // 0 = unlimited
  float alpha;
  float inv_scaling;  // 1 / scaling_seqlen
  HstuAttnRelativeBias relative_bias;
  int64_t num_tokens;  // L, the rows of q, k, v and out (the Hopper forward's TMA descriptors span them)
} HstuAttnFwdParams;

// Backward for one batch: dq_accum [L, H, D] fp32 must be zero on entry (the kernel adds into it; the caller
// casts it to the input dtype); dk, dv [L, H, D] in the input dtype are written for every token. Head dims 64, 128.
// rab and relative_bias as in HstuAttnFwdParams. drab (NULL: not wanted) is rab's gradient, indexed like rab with
// unit stride along the key column, zero on entry; the kernel writes only the valid pairs. drab_atomic = 0: drab is
// per head (any head stride) in the input dtype and each valid pair's entry is stored once. drab_atomic = 1: drab is
// fp32, shared by the heads (drab_head_stride 0), and every head adds its gradient with fp32 atomics (the caller
// casts it).
typedef struct HstuAttnBwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  float* dq_accum;
  void* dk;
  void* dv;
  const void* seq_offsets;
  const void* num_targets;
  const void* rab;
  void* drab;
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t do_row_stride, do_head_stride;
  int64_t dq_row_stride, dq_head_stride;
  int64_t dk_row_stride, dk_head_stride;
  int64_t dv_row_stride, dv_head_stride;
  int64_t rab_batch_stride, rab_head_stride, rab_row_stride;
  int64_t drab_batch_stride, drab_head_stride, drab_row_stride;
  int32_t num_sequences;
  int32_t num_heads;
  int32_t head_dim;
  int32_t max_seq_len;
  int32_t dtype;  // HstuAttnDtype
  int32_t offsets_int64;
  int32_t targets_int64;
  int32_t causal;
  int32_t contextual_seq_len;
  int32_t max_attn_len;  // 0 = unlimited
  int32_t drab_atomic;   // see above
  float alpha;
  float inv_scaling;  // 1 / scaling_seqlen
  HstuAttnRelativeBias relative_bias;
  // The tables' gradients (NULL: not wanted; non-NULL only beside its table): fp32, shaped and strided like the
  // tables (a shared row takes the sum over heads), zero on entry; the kernel adds dS of every valid pair with fp32
  // atomics (summed per CTA in shared memory first), so their bits may vary between runs. The caller casts them.
  float* dposition_weights;
  float* dtime_weights;
  int64_t num_tokens;  // L, the rows of q, k, v, dout (the Hopper backward's TMA descriptors span them)
  // Deterministic dQ (NULL: dQ is added with fp32 atomics, in an order that varies between runs): one zeroed int32
  // counter per (sequence, head, 64-row query block), [num_sequences, num_heads, dq_semaphore_stride] with
  // dq_semaphore_stride >= ceil(max_seq_len / 64). The CTA of each key block then adds its dQ tile of a query block
  // with plain loads and stores after the CTAs of every higher key block of that sequence (launched before it), so
  // dq_accum's bits repeat. SM80-style kernels only (the Hopper backward is not used); not with drab_atomic or table
  // gradients (their atomics would stay).
  int* dq_semaphore;
  int64_t dq_semaphore_stride;
} HstuAttnBwdParams;

HSTU_ATTN_API int hstu_attn_cutlass_abi_version(void);
HSTU_ATTN_API int hstu_attn_cutlass_fwd_params_size(void);
// Enqueues the forward on `stream` (a cudaStream_t; NULL = default stream). Returns an HstuAttnStatus.
HSTU_ATTN_API int hstu_attn_cutlass_forward(const HstuAttnFwdParams* params, void* stream);
HSTU_ATTN_API int hstu_attn_cutlass_bwd_params_size(void);
// Enqueues the backward on `stream`. Returns an HstuAttnStatus (head dim 256: HSTU_ATTN_UNSUPPORTED_HEAD_DIM).
HSTU_ATTN_API int hstu_attn_cutlass_backward(const HstuAttnBwdParams* params, void* stream);
HSTU_ATTN_API const char* hstu_attn_cutlass_status_string(int status);

#ifdef __cplusplus
}
#endif
