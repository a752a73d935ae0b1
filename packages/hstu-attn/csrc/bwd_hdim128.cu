// Backward, head dim 128: 128 key rows per CTA, 64 query rows per step, 8 warps.
#include "bwd_kernel.cuh"
#include "bwd_launch.h"

namespace hstu_attn {

cudaError_t run_bwd_hdim128(const HstuAttnBwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_bwd<BwdTraits<128, 64, 128, 8, cutlass::bfloat16_t>>(params, stream);
  return launch_bwd<BwdTraits<128, 64, 128, 8, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
