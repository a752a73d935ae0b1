// Hopper backward (bwd_sm90_kernel.cuh), head dim 128: 128 key rows per CTA (two consumer warpgroups), 64 query rows
// per step, a TMA producer warpgroup.
#include "bwd_sm90_kernel.cuh"

namespace hstu_attn {

bool bwd_sm90_hdim128_takes(const HstuAttnBwdParams& params) {
  if (params.dtype == HSTU_ATTN_BF16) return bwd_sm90_takes<BwdSm90Traits<128, cutlass::bfloat16_t>>(params);
  return bwd_sm90_takes<BwdSm90Traits<128, cutlass::half_t>>(params);
}

cudaError_t run_bwd_sm90_hdim128(const HstuAttnBwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_bwd_sm90<BwdSm90Traits<128, cutlass::bfloat16_t>>(params, stream);
  return launch_bwd_sm90<BwdSm90Traits<128, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
