// Forward, head dim 256: 64x64 tiles, 4 warps.
#include "fwd_kernel.cuh"
#include "fwd_launch.h"

namespace hstu_attn {

cudaError_t run_fwd_hdim256(const HstuAttnFwdParams& params, cudaStream_t stream) {
  if (params.dtype == HSTU_ATTN_BF16) return launch_fwd<FwdTraits<256, 64, 64, 4, cutlass::bfloat16_t>>(params, stream);
  return launch_fwd<FwdTraits<256, 64, 64, 4, cutlass::half_t>>(params, stream);
}

}  // namespace hstu_attn
