// The C ABI of hstu_attn_cutlass.h: argument checks and dispatch by head dim (and to the Hopper forward and backward
// on sm_90 unless HSTU_ATTN_CUTLASS_SM90=0).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "bwd_launch.h"
#include "fwd_launch.h"
#include "hstu_attn_cutlass.h"

namespace hstu_attn {

// The Hopper backward (bwd_sm90_hdim64.cu, bwd_sm90_hdim128.cu).
bool bwd_sm90_hdim64_takes(const HstuAttnBwdParams& params);
bool bwd_sm90_hdim128_takes(const HstuAttnBwdParams& params);
cudaError_t run_bwd_sm90_hdim64(const HstuAttnBwdParams& params, cudaStream_t stream);
cudaError_t run_bwd_sm90_hdim128(const HstuAttnBwdParams& params, cudaStream_t stream);

}  // namespace hstu_attn

namespace {

// The fused relative bias's fields are consistent: a time table needs timestamps of a known type and >= 1 bucket, a
// position table a reach >= 0, and a table gradient its table (gradients NULL for the forward).
bool relative_bias_ok(const HstuAttnRelativeBias& bias, const float* dposition, const float* dtime) {
  if (bias.position_weights != nullptr && bias.position_reach < 0) return false;
  if (bias.time_weights != nullptr &&
      (bias.timestamps == nullptr || bias.num_time_buckets < 1 || bias.timestamps_dtype < HSTU_ATTN_TIMESTAMPS_INT32 ||
       bias.timestamps_dtype > HSTU_ATTN_TIMESTAMPS_BF16)) {
    return false;
  }
  const bool position_grad_ok = dposition == nullptr || bias.position_weights != nullptr;
  return position_grad_ok && (dtime == nullptr || bias.time_weights != nullptr);
}

// A deterministic dQ (dq_semaphore) has a counter per 64-row query block and no atomic gradient beside it.
bool dq_semaphore_ok(const HstuAttnBwdParams& params) {
  if (params.dq_semaphore == nullptr) return true;
  const bool atomic_beside = (params.drab != nullptr && params.drab_atomic != 0) ||
                             params.dposition_weights != nullptr || params.dtime_weights != nullptr;
  return !atomic_beside && params.dq_semaphore_stride >= (int64_t(params.max_seq_len) + 63) / 64;
}

// Whether the Hopper kernels may run: yes unless the environment says HSTU_ATTN_CUTLASS_SM90=0 (read on every call).
bool sm90_enabled() {
  const char* env = std::getenv("HSTU_ATTN_CUTLASS_SM90");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Whether the forward takes the Hopper kernel (fwd_sm90_kernel.cuh): head dim 64 or 128, no rab (a fused relative
// bias is fine), its sm_90a code runs on the current device, q/k/v suit TMA (fwd_sm90_hdim*_takes), and the
// environment does not say HSTU_ATTN_CUTLASS_SM90=0 (read on every call, so a process can switch between the
// kernels; =0 runs the SM80 kernel).
bool use_fwd_sm90(const HstuAttnFwdParams& params) {
  if (!sm90_enabled() || params.rab != nullptr) return false;
  if (params.head_dim == 64) return hstu_attn::fwd_sm90_hdim64_takes(params);
  if (params.head_dim == 128) return hstu_attn::fwd_sm90_hdim128_takes(params);
  return false;
}

// Whether the backward takes the Hopper kernel (bwd_sm90_kernel.cuh): the same switch and conditions as
// use_fwd_sm90 (HSTU_ATTN_CUTLASS_SM90 not 0, head dim 64 or 128, no rab (a fused relative bias is fine), its sm_90a code
// runs on the current device) and q, k, v, dO suit TMA: 16-byte-aligned bases, positive strides that are multiples of
// 16 bytes, L (num_tokens) < 2^31 (bwd_sm90_hdim*_takes). This backward is non-deterministic (fp32 atomics into
// dq_accum); a deterministic dQ (dq_semaphore) takes the SM80 kernel.
bool use_bwd_sm90(const HstuAttnBwdParams& params) {
  if (!sm90_enabled() || params.rab != nullptr || params.dq_semaphore != nullptr) return false;
  if (params.head_dim == 64) return hstu_attn::bwd_sm90_hdim64_takes(params);
  if (params.head_dim == 128) return hstu_attn::bwd_sm90_hdim128_takes(params);
  return false;
}

}  // namespace

extern "C" {

int hstu_attn_cutlass_abi_version(void) { return HSTU_ATTN_CUTLASS_ABI_VERSION; }

int hstu_attn_cutlass_fwd_params_size(void) { return int(sizeof(HstuAttnFwdParams)); }

int hstu_attn_cutlass_forward(const HstuAttnFwdParams* params, void* stream) {
  if (params == nullptr || params->num_sequences < 0 || params->num_heads < 0 || params->max_seq_len < 0 ||
      !relative_bias_ok(params->relative_bias, nullptr, nullptr)) {
    return HSTU_ATTN_BAD_ARGUMENT;
  }
  if (params->dtype != HSTU_ATTN_FP16 && params->dtype != HSTU_ATTN_BF16) return HSTU_ATTN_UNSUPPORTED_DTYPE;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool sm90 = use_fwd_sm90(*params);
  switch (params->head_dim) {
    case 64:
      return int(sm90 ? hstu_attn::run_fwd_sm90_hdim64(*params, cuda_stream)
                      : hstu_attn::run_fwd_hdim64(*params, cuda_stream));
    case 128:
      return int(sm90 ? hstu_attn::run_fwd_sm90_hdim128(*params, cuda_stream)
                      : hstu_attn::run_fwd_hdim128(*params, cuda_stream));
    case 256: return int(hstu_attn::run_fwd_hdim256(*params, cuda_stream));
    default: return HSTU_ATTN_UNSUPPORTED_HEAD_DIM;
  }
}

int hstu_attn_cutlass_bwd_params_size(void) { return int(sizeof(HstuAttnBwdParams)); }

int hstu_attn_cutlass_backward(const HstuAttnBwdParams* params, void* stream) {
  if (params == nullptr || params->num_sequences < 0 || params->num_heads < 0 || params->max_seq_len < 0 ||
      params->dq_accum == nullptr || (params->drab != nullptr && params->rab == nullptr) ||
      !relative_bias_ok(params->relative_bias, params->dposition_weights, params->dtime_weights) ||
      !dq_semaphore_ok(*params)) {
    return HSTU_ATTN_BAD_ARGUMENT;
  }
  if (params->dtype != HSTU_ATTN_FP16 && params->dtype != HSTU_ATTN_BF16) return HSTU_ATTN_UNSUPPORTED_DTYPE;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool sm90 = use_bwd_sm90(*params);
  switch (params->head_dim) {
    case 64:
      return int(sm90 ? hstu_attn::run_bwd_sm90_hdim64(*params, cuda_stream)
                      : hstu_attn::run_bwd_hdim64(*params, cuda_stream));
    case 128:
      return int(sm90 ? hstu_attn::run_bwd_sm90_hdim128(*params, cuda_stream)
                      : hstu_attn::run_bwd_hdim128(*params, cuda_stream));
    default: return HSTU_ATTN_UNSUPPORTED_HEAD_DIM;
  }
}

const char* hstu_attn_cutlass_status_string(int status) {
  switch (status) {
    case HSTU_ATTN_OK: return "ok";
    case HSTU_ATTN_UNSUPPORTED_DTYPE: return "unsupported dtype (float16 and bfloat16 only)";
    case HSTU_ATTN_UNSUPPORTED_HEAD_DIM: return "unsupported head dim (forward: 64, 128, 256; backward: 64, 128)";
    case HSTU_ATTN_BAD_ARGUMENT:
      return "bad argument (null params, negative sizes, no dq_accum, drab without rab, a time table without "
             "timestamps, buckets or a known timestamp type, a negative position reach, or a table gradient without "
             "its table, or a deterministic dQ beside atomic drab or table gradients or with too few counters)";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
  }
}

}  // extern "C"
