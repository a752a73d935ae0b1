// Forward, head dim 128: 128x64 tiles, 8 warps.
#include "fwd_kernel.cuh"
#include "fwd_launch.h"

namespace hstu_attn {

cudaError_t run_fwd_hdim128(const HstuAttnFwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_fwd<FwdTraits<128, 128, 64, 8, cutlass::bfloat16_t>>(params, stream);
  return launch_fwd<FwdTraits<128, 128, 64, 8, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
