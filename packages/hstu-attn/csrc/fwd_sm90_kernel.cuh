// Hopper (sm_90a) forward of jagged HSTU attention without rab or relative bias: one CTA computes a 128 x D output
// tile of one (sequence, head) with two consumer warpgroups of 128 threads, each owning 64 query rows.
//
// Per key tile: S = Q K^T with wgmma reading both operands from shared memory (SS), P = SiLU(alpha S) / scaling
// where the pair is valid and 0 where it is not (selected, never multiplied; mask.cuh), P converted to the input
// dtype in registers, O += P V with wgmma taking P from registers and V from shared memory (RS). The tiles sit in
// shared memory in the GMMA 128-byte-swizzled K-major layout (V is read as V^T through the same bytes, MN-major).
// Loads are cp.async by every thread (K/V single-buffered as in fwd_kernel.cuh: V[j] loads while Q K[j]^T runs,
// K[j-1] while P V[j] runs); rows past the sequence end are zero-filled and never stored, rows of the next sequence
// are never read. Masked tiles keep a non-finite V entry away from the rows that may not attend its token with
// finite.cuh (zeroed before P V; output entries a valid pair links to it stored NaN), as the SM80 kernel does.
//
// The kernel body exists for sm_90a only (wgmma); other targets compile an empty body that the host never launches
// (fwd_sm90_launch checks that the loaded binary is sm_90 code).
#pragma once

#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "finite.cuh"
#include "fwd_kernel.cuh"
#include "hstu_attn_cutlass.h"
#include "mask.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HSTU_ATTN_SM90_DEVICE 1
#else
#define HSTU_ATTN_SM90_DEVICE 0
#endif

namespace hstu_attn {

using namespace cute;

template <int kHeadDim_, typename Elem_>
struct FwdSm90Traits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = 2;  // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = 64;  // finite.cuh's row masks hold <= 64 rows
  static constexpr int kNThreads = 128 * kWarpgroups;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  using WarpgroupsAlongM = Layout<Shape<Int<kWarpgroups>, _1, _1>>;
  // S = Q K^T: A = Q [M, D] and B = K [N, D], both K-major in shared memory.
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpgroupsAlongM{}));
  // O = P V: A = P [M, N] in registers, B = V^T [D, N] MN-major (V's rows are contiguous along D).
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupsAlongM{}));

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Elem>;  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, TileQ{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, TileKV{}));
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));

  // Global -> shared: 16-byte cp.async vectors, 8 threads per 64-element row segment.
  using GmemThreads = Layout<Shape<Int<kNThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{}, GmemThreads{},
                                            Layout<Shape<_1, _8>>{}));

  static constexpr int kSmemTileBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Elem));
  // Then, for finite.cuh: the bitmap of output entries marked NaN [kBlockM, kHeadDim], one 64-bit word for cta_or.
  static constexpr int kSmemReachedBytes = kBlockM * kHeadDim / 8;
  static constexpr int kSmemBytes = kSmemTileBytes + kSmemReachedBytes + 16;
};

#if HSTU_ATTN_SM90_DEVICE
// acc (+)= A B^T over every k-block with wgmma, waited for. zero_init: acc = A B^T. kRegisterA: A is a register
// fragment (RS), else a shared-memory descriptor fragment (SS).
template <bool kRegisterA, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void wgmma_gemm(Mma& mma, FragA& frag_a, FragB const& frag_b, Acc& acc, bool zero_init) {
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
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if constexpr (kRegisterA) warpgroup_fence_operand(frag_a);
}

// cp.async writes (and generic zero fills) become visible to wgmma's async-proxy reads of shared memory.
__device__ __forceinline__ void wait_loads_for_wgmma() {
  cp_async_wait<0>();
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}
#endif

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) hstu_attn_fwd_sm90_kernel(const HstuAttnFwdParams p) {
#if HSTU_ATTN_SM90_DEVICE
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  // Blocks are ordered by query block, last (heaviest under the causal mask) first, over all sequences.
  const int num_m_blocks = (p.max_seq_len + kBlockM - 1) / kBlockM;
  const int sequence = blockIdx.x % p.num_sequences;
  const int m_block = num_m_blocks - 1 - int(blockIdx.x / p.num_sequences);
  const int head = blockIdx.y;
  const int64_t start = load_index(p.seq_offsets, p.offsets_int64, sequence);
  const int length = int(load_index(p.seq_offsets, p.offsets_int64, sequence + 1) - start);
  const int m0 = m_block * kBlockM;
  if (m0 >= length) return;
  const int targets = p.num_targets == nullptr ? 0 : int(load_index(p.num_targets, p.targets_int64, sequence));
  const SequenceMask mask{length, length - targets, p.contextual_seq_len, p.max_attn_len, p.causal != 0};
  const int n_block_begin = mask.column_begin(m0) / kBlockN;
  const int n_block_end = (mask.column_end(m0, kBlockM) + kBlockN - 1) / kBlockN;

  auto sequence_tensor = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    const Elem* ptr = static_cast<const Elem*>(base) + start * row_stride + head * head_stride;
    return make_tensor(make_gmem_ptr(ptr), make_shape(length, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  const auto tile_q = typename Traits::TileQ{};
  const auto tile_kv = typename Traits::TileKV{};
  Tensor gQ = local_tile(sequence_tensor(p.q, p.q_row_stride, p.q_head_stride), tile_q, make_coord(m_block, 0));
  Tensor gK = local_tile(sequence_tensor(p.k, p.k_row_stride, p.k_head_stride), tile_kv, make_coord(_, 0));
  Tensor gV = local_tile(sequence_tensor(p.v, p.v_row_stride, p.v_head_stride), tile_kv, make_coord(_, 0));

  extern __shared__ __align__(1024) char smem[];  // 128-byte swizzle atoms repeat every 1024 bytes
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  const ReachedBits<kBlockM, kHeadDim, kNThreads> reached{reinterpret_cast<uint32_t*>(smem + Traits::kSmemTileBytes)};
  static_assert(decltype(reached)::kBytes == Traits::kSmemReachedBytes, "shared-memory plan");
  auto* non_finite_word =
      reinterpret_cast<unsigned long long*>(smem + Traits::kSmemTileBytes + Traits::kSmemReachedBytes);
  bool any_reached = false;  // CTA-uniform: whether `reached` holds bits (cleared on first use)

  const int tid = threadIdx.x;
  typename Traits::GmemLoad gmem_load;
  auto gmem_thr = gmem_load.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_D, n_blocks)
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  Tensor tKcK = gmem_thr.partition_S(make_identity_tensor(tile_kv));

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);  // shared-memory descriptors
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(typename Traits::TileS{}));
  Tensor acc_o = partition_fragment_C(mma_pv, tile_q);
  clear(acc_o);

  load_rows(gmem_load, tQgQ, tQsQ, tQcQ, length - m0);
  if (n_block_end > n_block_begin) {
    const int last = n_block_end - 1;
    load_rows(gmem_load, tKgK(_, _, _, last), tKsK, tKcK, length - last * kBlockN);
  }
  cp_async_fence();

  for (int n_block = n_block_end - 1; n_block >= n_block_begin; --n_block) {
    const int n0 = n_block * kBlockN;
    wait_loads_for_wgmma();  // K[n_block] (and Q) arrived; every warpgroup is done with V[n_block + 1]
    load_rows(gmem_load, tVgV(_, _, _, n_block), tVsV, tKcK, length - n0);
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma_qk, typename Traits::TileS{});
    wgmma_gemm<false>(mma_qk, tSrQ, tSrK, acc_s, /*zero_init=*/true);

    wait_loads_for_wgmma();  // V[n_block] arrived; every warpgroup is done with K[n_block]
    if (n_block > n_block_begin) {
      load_rows(gmem_load, tKgK(_, _, _, n_block - 1), tKsK, tKcK, length - (n0 - kBlockN));
      cp_async_fence();
    }

    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN);
    // P in the register layout of the P V A operand: the m64nNk16 A fragment holds, in order, the values of two
    // neighbouring n8 column groups of the m64nN accumulator, so the flat orders agree.
    Tensor tOrP = make_tensor<Elem>(partition_shape_A(mma_pv, typename Traits::TileS{}));
    static_assert(decltype(size(tOrP))::value == decltype(size(acc_s))::value, "P fragment vs S accumulator");
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const bool valid = all_valid || mask.valid(m0 + get<0>(tScS(i)), n0 + get<1>(tScS(i)));
      tOrP(i) = static_cast<Elem>(valid ? silu(acc_s(i) * p.alpha) * p.inv_scaling : 0.0f);
    }
    if (!all_valid) {  // CTA-uniform
      const uint64_t bad_rows = non_finite_rows<Elem, kBlockN, kHeadDim, kNThreads>(sV);
      if (__syncthreads_or(bad_rows != 0)) {  // V[n_block] holds inf/nan (rare)
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = cta_or(bad_rows, non_finite_word);
        reached.mark(sV, rows, [&](int row, int key) { return mask.valid(m0 + row, n0 + key); });
        __syncthreads();  // every thread has read the non-finite entries
        zero_non_finite<kBlockN, kHeadDim, kNThreads>(sV);
        cutlass::arch::fence_view_async_shared();  // the zeros are visible to wgmma
        __syncthreads();  // V[n_block] is finite for P V
      }
    }
    wgmma_gemm<true>(mma_pv, tOrP, tOrVt, acc_o, /*zero_init=*/false);
  }

  // Epilogue: each thread stores its accumulator pairs (two neighbouring columns) of the rows inside the sequence.
  // (reached: the barrier after the last mark() ordered every thread's bits before these reads.)
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(tile_q));
  Elem* out = static_cast<Elem*>(p.out) + (start + m0) * p.o_row_stride + head * p.o_head_stride;
  const Elem nan = Elem(__int_as_float(0x7fc00000));
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); i += 2) {
    const int row = get<0>(tOcO(i));
    const int column = get<1>(tOcO(i));
    if (row >= length - m0) continue;
    Elem pair[2] = {static_cast<Elem>(acc_o(i)), static_cast<Elem>(acc_o(i + 1))};
    if (any_reached) {
      if (reached.test(row, column)) pair[0] = nan;
      if (reached.test(row, column + 1)) pair[1] = nan;
    }
    *reinterpret_cast<uint32_t*>(out + row * p.o_row_stride + column) = *reinterpret_cast<const uint32_t*>(pair);
  }
#endif
}

// Whether the Hopper forward's sm_90a code is the binary that runs on the current device (compiled for sm_90a and
// the device is sm_90).
template <class Traits>
bool fwd_sm90_runs_here() {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, &hstu_attn_fwd_sm90_kernel<Traits>) != cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device: clear the error, use the SM80 kernel
    return false;
  }
  return attributes.binaryVersion == 90;
}

template <class Traits>
cudaError_t launch_fwd_sm90(const HstuAttnFwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &hstu_attn_fwd_sm90_kernel<Traits>;
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const int64_t num_m_blocks = (int64_t(p.max_seq_len) + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t blocks = num_m_blocks * p.num_sequences;
  if (blocks == 0 || p.num_heads == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || p.num_heads > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks), unsigned(p.num_heads)), Traits::kNThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hstu_attn
