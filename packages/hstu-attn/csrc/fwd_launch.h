// One forward entry per head dim, each in its own translation unit (they compile in parallel).
#pragma once

#include <cuda_runtime.h>

#include "hstu_attn_cutlass.h"

namespace hstu_attn {

cudaError_t run_fwd_hdim64(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_hdim128(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_hdim256(const HstuAttnFwdParams& params, cudaStream_t stream);

// The Hopper forward (fwd_sm90_kernel.cuh: TMA, wgmma; no rab, no relative bias), head dims 64 and 128. *_takes:
// whether it can run these params: its sm_90a code runs on the current device (the library holds sm_90a code and the
// device is sm_90), and q, k, v meet TMA's alignment (16-byte base and strides) and L fits 32 bits.
bool fwd_sm90_hdim64_takes(const HstuAttnFwdParams& params);
bool fwd_sm90_hdim128_takes(const HstuAttnFwdParams& params);
cudaError_t run_fwd_sm90_hdim64(const HstuAttnFwdParams& params, cudaStream_t stream);
cudaError_t run_fwd_sm90_hdim128(const HstuAttnFwdParams& params, cudaStream_t stream);

}  // namespace hstu_attn
