// What the Hopper (sm_90a) kernels share: the consumer warpgroups' named barriers, wgmma batches, the parameters of
// the producer / consumer PipelineTmaAsync, and on the host the TMA view of a jagged [L, H, D] tensor, the check that a
// tensor suits TMA, the check that the loaded binary is sm_90 code, and the grid.
#pragma once

#include <stdint.h>

#include <atomic>

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HSTU_ATTN_SM90_DEVICE 1
#else
#define HSTU_ATTN_SM90_DEVICE 0
#endif

namespace hstu_attn {

using namespace cute;

#if HSTU_ATTN_SM90_DEVICE
// Barriers of the consumer warpgroups only (threads 0 .. kThreads - 1); ids 1 and 2 (0 is __syncthreads).
template <int kThreads>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
}

// Whether `x` holds in one of the consumer threads (all of them call it), as __syncthreads_or.
template <int kThreads>
__device__ __forceinline__ bool consumers_any(bool x) {
  uint32_t result;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 q, %1, 0;\n bar.red.or.pred p, 2, %2, q;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(result)
      : "r"(uint32_t(x)), "n"(kThreads)
      : "memory");
  return result != 0;
}

// finite.cuh's cta_or over the consumer threads: the OR of every consumer's `rows` through the shared `word`. The
// caller passes a consumers_sync after reading the result before it calls again.
template <int kThreads>
__device__ __forceinline__ uint64_t consumers_or(uint64_t rows, unsigned long long* word) {
  if (threadIdx.x == 0) *word = 0ull;
  consumers_sync<kThreads>();
  if (rows != 0) atomicOr(word, static_cast<unsigned long long>(rows));
  consumers_sync<kThreads>();
  return *word;
}

// Issues acc (+)= A B^T over every k-block with wgmma as one committed batch, not waited for: neither acc nor a
// register A may be read or written until a warpgroup_wait covers the batch (then fence the operands). zero_init:
// acc = A B^T. kRegisterA: A is a register fragment (RS), else a shared-memory descriptor fragment (SS).
template <bool kRegisterA, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void wgmma_batch(Mma& mma, FragA& frag_a, FragB const& frag_b, Acc& acc, bool zero_init) {
  if constexpr (kRegisterA) warpgroup_fence_operand(frag_a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  mma.accumulate_ = zero_init ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(frag_a); ++k) {
    gemm(mma, frag_a(_, _, k), frag_b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// wgmma_batch, waited for.
template <bool kRegisterA, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, FragA& frag_a, FragB const& frag_b, Acc& acc, bool zero_init) {
  wgmma_batch<kRegisterA>(mma, frag_a, frag_b, acc, zero_init);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if constexpr (kRegisterA) warpgroup_fence_operand(frag_a);
}

// The PipelineTmaAsync parameters of a kernel whose threads from kConsumerThreads on form the producer warpgroup, of
// which the first (the leader) issues the loads; each stage's full barrier expects `transaction_bytes`.
template <class Pipeline, int kConsumerThreads>
__device__ __forceinline__ typename Pipeline::Params sm90_pipeline_params(uint32_t transaction_bytes) {
  typename Pipeline::Params params;
  params.transaction_bytes = transaction_bytes;
  params.role = threadIdx.x >= kConsumerThreads ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  params.is_leader = threadIdx.x == kConsumerThreads;
  params.num_consumers = kConsumerThreads;
  params.initializing_warp = kConsumerThreads / 32;  // the leader's warp
  return params;
}

#endif

// Whether `kernel`'s code that runs on the current device is sm_90 code (compiled for sm_90a and the device is
// sm_90); false, with the error cleared, where the library holds no image for the device. Asked of the driver once per
// kernel and device (the dispatch calls it on every forward and backward), then read from a cache.
template <class Kernel>
bool sm90_code_runs_here(Kernel* kernel) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int8_t> cached[kCachedDevices];  // per kernel (one per instantiation): 0 unknown, 1 yes, 2 no
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable && cached[device].load(std::memory_order_relaxed) != 0) return cached[device] == 1;
  cudaFuncAttributes attributes;
  const cudaError_t error = cudaFuncGetAttributes(&attributes, kernel);
  if (error != cudaSuccess) (void)cudaGetLastError();  // no image for this device: the caller uses the SM80 kernel
  const bool runs = error == cudaSuccess && attributes.binaryVersion == 90;
  if (cacheable) cached[device].store(runs ? 1 : 2, std::memory_order_relaxed);
  return runs;
}

// What TMA needs of a [L, H, D] tensor (cuTensorMapEncodeTiled): a 16-byte-aligned base and strides that are
// multiples of 16 bytes, below 2^40 bytes; L and H within 32 bits.
template <typename Elem>
bool tma_compatible(const void* base, int64_t row_stride, int64_t head_stride) {
  constexpr int64_t kVector = 16 / sizeof(Elem);
  // TMA needs positive strides (an expand()ed view has 0, which cuTensorMapEncodeTiled rejects) below 2^40 bytes
  const auto in_range = [](int64_t stride) { return stride > 0 && stride * int64_t(sizeof(Elem)) < (int64_t(1) << 40); };
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % kVector == 0 && head_stride % kVector == 0 &&
         in_range(row_stride) && in_range(head_stride);
}

// q, k and v of `p` (forward or backward params) suit TMA, and L fits the descriptors' 32-bit extent.
template <typename Elem, class Params>
bool qkv_suit_tma(const Params& p) {
  return p.num_tokens > 0 && p.num_tokens <= 0x7fffffff && tma_compatible<Elem>(p.q, p.q_row_stride, p.q_head_stride) &&
         tma_compatible<Elem>(p.k, p.k_row_stride, p.k_head_stride) &&
         tma_compatible<Elem>(p.v, p.v_row_stride, p.v_head_stride);
}

// A whole jagged [L, H, D] tensor as the (token, d, head) view its TMA descriptor spans, unit stride along d.
template <typename Elem>
using JaggedTmaView = decltype(make_tensor(make_gmem_ptr(static_cast<const Elem*>(nullptr)),
                                           Shape<int32_t, int32_t, int32_t>{}, Stride<int64_t, _1, int64_t>{}));

template <typename Elem, int kHeadDim>
JaggedTmaView<Elem> jagged_tma_view(const void* base, int64_t num_tokens, int num_heads, int64_t row_stride,
                                    int64_t head_stride) {
  return make_tensor(make_gmem_ptr(static_cast<const Elem*>(base)),
                     make_shape(int32_t(num_tokens), int32_t(kHeadDim), int32_t(num_heads)),
                     make_stride(row_stride, _1{}, head_stride));
}

// The grid of a Hopper kernel: one CTA per `block_rows` rows of every sequence up to max_seq_len along x, the heads
// along y: an empty grid (x or y 0) when there is nothing to launch, else cudaErrorInvalidConfiguration past the
// grid limits.
inline cudaError_t sm90_grid(int64_t max_seq_len, int block_rows, int64_t num_sequences, int64_t num_heads,
                             dim3* grid) {
  const int64_t blocks = (max_seq_len + block_rows - 1) / block_rows * num_sequences;
  *grid = dim3(0, 0);
  if (blocks == 0 || num_heads == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || num_heads > 65535) return cudaErrorInvalidConfiguration;
  *grid = dim3(unsigned(blocks), unsigned(num_heads));
  return cudaSuccess;
}

}  // namespace hstu_attn
