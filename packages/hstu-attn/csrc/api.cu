// The C ABI of hstu_attn_cutlass.h: argument checks and dispatch by head dim.
#include <cuda_runtime.h>

#include "bwd_launch.h"
#include "fwd_launch.h"
#include "hstu_attn_cutlass.h"

extern "C" {

int hstu_attn_cutlass_abi_version(void) { return HSTU_ATTN_CUTLASS_ABI_VERSION; }

int hstu_attn_cutlass_fwd_params_size(void) { return int(sizeof(HstuAttnFwdParams)); }

int hstu_attn_cutlass_forward(const HstuAttnFwdParams* params, void* stream) {
  if (params == nullptr || params->num_sequences < 0 || params->num_heads < 0 || params->max_seq_len < 0) {
    return HSTU_ATTN_BAD_ARGUMENT;
  }
  if (params->dtype != HSTU_ATTN_FP16 && params->dtype != HSTU_ATTN_BF16) return HSTU_ATTN_UNSUPPORTED_DTYPE;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (params->head_dim) {
    case 64: return int(hstu_attn::run_fwd_hdim64(*params, cuda_stream));
    case 128: return int(hstu_attn::run_fwd_hdim128(*params, cuda_stream));
    case 256: return int(hstu_attn::run_fwd_hdim256(*params, cuda_stream));
    default: return HSTU_ATTN_UNSUPPORTED_HEAD_DIM;
  }
}

int hstu_attn_cutlass_bwd_params_size(void) { return int(sizeof(HstuAttnBwdParams)); }

int hstu_attn_cutlass_backward(const HstuAttnBwdParams* params, void* stream) {
  if (params == nullptr || params->num_sequences < 0 || params->num_heads < 0 || params->max_seq_len < 0 ||
      params->dq_accum == nullptr || (params->drab != nullptr && params->rab == nullptr)) {
    return HSTU_ATTN_BAD_ARGUMENT;
  }
  if (params->dtype != HSTU_ATTN_FP16 && params->dtype != HSTU_ATTN_BF16) return HSTU_ATTN_UNSUPPORTED_DTYPE;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (params->head_dim) {
    case 64: return int(hstu_attn::run_bwd_hdim64(*params, cuda_stream));
    case 128: return int(hstu_attn::run_bwd_hdim128(*params, cuda_stream));
    default: return HSTU_ATTN_UNSUPPORTED_HEAD_DIM;
  }
}

const char* hstu_attn_cutlass_status_string(int status) {
  switch (status) {
    case HSTU_ATTN_OK: return "ok";
    case HSTU_ATTN_UNSUPPORTED_DTYPE: return "unsupported dtype (float16 and bfloat16 only)";
    case HSTU_ATTN_UNSUPPORTED_HEAD_DIM: return "unsupported head dim (forward: 64, 128, 256; backward: 64, 128)";
    case HSTU_ATTN_BAD_ARGUMENT: return "bad argument (null params, negative sizes, no dq_accum, or drab without rab)";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
  }
}

}  // extern "C"
