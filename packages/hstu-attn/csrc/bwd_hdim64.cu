// Backward, head dim 64: 64 key rows per CTA, 64 query rows per step, 4 warps.
#include "bwd_kernel.cuh"
#include "bwd_launch.h"

namespace hstu_attn {

cudaError_t run_bwd_hdim64(const HstuAttnBwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_bwd<BwdTraits<64, 64, 64, 4, cutlass::bfloat16_t>>(params, stream);
  return launch_bwd<BwdTraits<64, 64, 64, 4, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
