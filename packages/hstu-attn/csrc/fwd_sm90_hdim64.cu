// Hopper forward (fwd_sm90_kernel.cuh), head dim 64: 128 x 64 tiles, two consumer warpgroups and a TMA producer.
#include "fwd_launch.h"
#include "fwd_sm90_kernel.cuh"

namespace hstu_attn {

bool fwd_sm90_hdim64_takes(const HstuAttnFwdParams& params) {
  if (params.dtype == HSTU_ATTN_BF16) return fwd_sm90_takes<FwdSm90Traits<64, cutlass::bfloat16_t>>(params);
  return fwd_sm90_takes<FwdSm90Traits<64, cutlass::half_t>>(params);
}

cudaError_t run_fwd_sm90_hdim64(const HstuAttnFwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_fwd_sm90<FwdSm90Traits<64, cutlass::bfloat16_t>>(params, stream);
  return launch_fwd_sm90<FwdSm90Traits<64, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
