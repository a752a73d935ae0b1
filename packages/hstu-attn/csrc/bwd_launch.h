// One backward entry per head dim, each in its own translation unit (they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include "hstu_attn_cutlass.h"

namespace hstu_attn {

cudaError_t run_bwd_hdim64(const HstuAttnBwdParams& params, cudaStream_t stream);
cudaError_t run_bwd_hdim128(const HstuAttnBwdParams& params, cudaStream_t stream);

}  // namespace hstu_attn
