// One forward entry per head dim, each in its own translation unit (they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include "hstu_attn_cutlass.h"

namespace hstu_attn {

cudaError_t run_fwd_hdim64(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_hdim128(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_hdim256(const HstuAttnFwdParams& params, cudaStream_t stream);

// The Hopper forward (fwd_sm90_kernel.cuh: wgmma; no rab, no relative bias), head dims 64 and 128. *_runs_here:
// whether its sm_90a code runs on the current device (the library holds sm_90a code and the device is sm_90).
bool fwd_sm90_hdim64_runs_here(int dtype);
bool fwd_sm90_hdim128_runs_here(int dtype);
cudaError_t run_fwd_sm90_hdim64(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_sm90_hdim128(const HstuAttnFwdParams& params, cudaStream_t stream);

}  // namespace hstu_attn
