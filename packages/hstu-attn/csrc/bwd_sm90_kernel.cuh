// Hopper (sm_90a) backward of jagged HSTU attention without rab or relative bias, first step: wgmma for every
// product, cp.async loads (no TMA, no warp specialization yet). One CTA of one warpgroup (128 threads) owns a 64 x D
// tile of dK and dV for one (sequence, head), held in registers, and walks the 64-row query blocks that can attend
// its keys (the block range of bwd_kernel.cuh). Per query block:
//   S^T = K Q^T, dP^T = V dO^T               wgmma SS (K, V, Q, dO in shared memory), fp32 [64 keys, 64 queries]
//   P^T = SiLU(alpha S^T) / scaling, dS^T = dP^T * alpha / scaling * SiLU'(alpha S^T)  (0 where the pair is invalid:
//                                            selected, never multiplied; the math of bwd_kernel.cuh)
//   dV += P^T dO, dK += dS^T Q               wgmma RS: P^T, dS^T from registers, dO^T, Q^T read MN-major
//   dQ  = dS K                               wgmma SS: dS^T stored to shared memory with stmatrix, read as dS
//                                            MN-major, K^T read MN-major; added with fp32 atomics into dq_accum
// Every tile sits in shared memory in the GMMA 128-byte-swizzled K-major layout. Rows past the sequence end are
// zero-filled, so they add nothing, and never stored. Non-finite containment as bwd_kernel.cuh implements finite.cuh:
// in masked tiles the non-finite q and dO entries are zeroed in shared memory after S^T and dP^T used them, before
// dK += dS^T Q and dV += P^T dO; the dV entries that a valid pair links to a non-finite dO entry are stored NaN; dQ
// = dS K takes non-finite K entries as 0 (a zeroed copy of K, made once when K holds inf/nan). Generic-proxy writes
// to shared memory (cp.async, zero fills, dS) are made visible to wgmma with fence.proxy.async before the barrier.
// S^T and dP^T are issued as one wgmma batch, dV and dK as another; each batch is waited for before the next step.
//
// The kernel body exists for sm_90a only; other targets compile an empty body that the host never launches
// (bwd_sm90_runs_here checks that the loaded binary is sm_90 code).
#pragma once

#include <stdint.h>

#include <cuda_runtime.h>

#include "bwd_kernel.cuh"
#include "finite.cuh"
#include "fwd_sm90_kernel.cuh"
#include "hstu_attn_cutlass.h"
#include "mask.cuh"

namespace hstu_attn {

using namespace cute;

template <int kHeadDim_, typename Elem_>
struct BwdSm90Traits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // query rows per step (finite.cuh's row masks hold <= 64 rows)
  static constexpr int kBlockN = 64;  // key rows per CTA (one wgmma M tile)
  static constexpr int kNThreads = 128;  // one warpgroup
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileSt = Shape<Int<kBlockN>, Int<kBlockM>>;  // S^T, dP^T: [keys, queries]
  // S^T = K Q^T and dP^T = V dO^T: A = K or V [N, D], B = Q or dO [M, D], both K-major.
  using MmaSt = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<kBlockN>, Int<kBlockM>, Int<kHeadDim>>>()));
  // dV += P^T dO and dK += dS^T Q: A = P^T or dS^T [N, M] in registers, B = dO^T or Q^T [D, M] MN-major.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>()));
  // dQ = dS K: A = dS [M, N] read MN-major from dS^T in shared memory, B = K^T [D, N] MN-major.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));
  // dS^T from registers to shared memory with stmatrix (four 8 x 8 matrices per instruction).
  using SmemStoredS = Copy_Atom<SM90_U32x4_STSM_N, Elem>;

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Elem>;  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, TileQ{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, TileKV{}));
  using SmemLayoutdSt = decltype(tile_to_shape(SmemAtom{}, TileSt{}));
  // Transposed views: the same bytes, coordinates swapped.
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutdS =
      decltype(composition(SmemLayoutdSt{}, make_layout(Shape<Int<kBlockM>, Int<kBlockN>>{}, GenRowMajor{})));

  // Global -> shared: 16-byte cp.async vectors, 8 threads per 64-element row segment.
  using GmemThreads = Layout<Shape<Int<kNThreads / 8>, _8>, Stride<_8, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{}, GmemThreads{},
                                            Layout<Shape<_1, _8>>{}));

  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];  // 128-byte swizzle atoms repeat every 1024 bytes
    alignas(1024) Elem dout[cosize_v<SmemLayoutQ>];
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem k_finite[cosize_v<SmemLayoutKV>];  // K with inf/nan entries as 0, for dQ in masked tiles
    alignas(1024) Elem ds[cosize_v<SmemLayoutdSt>];  // dS^T [keys, queries]
    uint32_t reached[kBlockN * kHeadDim / 32];  // finite.cuh's bitmap of dV entries stored NaN
    unsigned long long non_finite_word;          // cta_or's word
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

#if HSTU_ATTN_SM90_DEVICE
// cp.async writes (and generic zero fills) become visible to wgmma's async-proxy reads of shared memory.
__device__ __forceinline__ void bwd_sm90_wait_loads() {
  cp_async_wait<0>();
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
}

// Issues acc (+)= A B^T over every k-block as wgmmas of the open batch (zero_init: acc = A B^T), not waited for.
template <class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void wgmma_issue(Mma& mma, FragA& a, FragB const& b, Acc& acc, bool zero_init) {
  mma.accumulate_ = zero_init ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// acc1 (+)= A1 B1^T and acc2 (+)= A2 B2^T with wgmma, issued as one batch and waited for once (zero_init: acc = A B^T).
// kRegisterA: the A operands are register fragments (RS), else shared-memory descriptor fragments (SS).
template <bool kRegisterA, class Mma, class FragA1, class FragB1, class Acc1, class FragA2, class FragB2, class Acc2>
__device__ __forceinline__ void wgmma_gemm_pair(Mma& mma, FragA1& a1, FragB1 const& b1, Acc1& acc1, FragA2& a2,
                                                FragB2 const& b2, Acc2& acc2, bool zero_init) {
  if constexpr (kRegisterA) {
    warpgroup_fence_operand(a1);
    warpgroup_fence_operand(a2);
  }
  warpgroup_fence_operand(acc1);
  warpgroup_fence_operand(acc2);
  warpgroup_arrive();
  wgmma_issue(mma, a1, b1, acc1, zero_init);
  wgmma_issue(mma, a2, b2, acc2, zero_init);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc1);
  warpgroup_fence_operand(acc2);
  if constexpr (kRegisterA) {
    warpgroup_fence_operand(a1);
    warpgroup_fence_operand(a2);
  }
}

// dst = src with its inf/nan entries replaced by 0 (two [kRows, kCols] shared-memory tiles; the CTA shares the work).
template <int kRows, int kCols, int kThreads, class Src, class Dst>
__device__ __forceinline__ void copy_finite(Src const& src, Dst& dst) {
  using Elem = typename Dst::value_type;
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const Elem x = src(i / kCols, i % kCols);
    dst(i / kCols, i % kCols) = non_finite(x) ? Elem(0.0f) : x;
  }
}
#endif

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) hstu_attn_bwd_sm90_kernel(const HstuAttnBwdParams p) {
#if HSTU_ATTN_SM90_DEVICE
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  // Blocks are ordered by key block, last first, over all sequences (as bwd_kernel.cuh).
  const int num_n_blocks = (p.max_seq_len + kBlockN - 1) / kBlockN;
  const int sequence = blockIdx.x % p.num_sequences;
  const int n_block = num_n_blocks - 1 - int(blockIdx.x / p.num_sequences);
  const int head = blockIdx.y;
  const int64_t start = load_index(p.seq_offsets, p.offsets_int64, sequence);
  const int length = int(load_index(p.seq_offsets, p.offsets_int64, sequence + 1) - start);
  const int n0 = n_block * kBlockN;
  if (n0 >= length) return;
  const int targets = p.num_targets == nullptr ? 0 : int(load_index(p.num_targets, p.targets_int64, sequence));
  const SequenceMask mask{length, length - targets, p.contextual_seq_len, p.max_attn_len, p.causal != 0};
  // Under a causal mask with no contextual rows every valid pair has query >= key.
  const int m_block_begin = (mask.causal && mask.contextual == 0) ? n0 / kBlockM : 0;
  const int m_block_end = (length + kBlockM - 1) / kBlockM;
  const float scale = p.alpha * p.inv_scaling;

  const auto tile_q = typename Traits::TileQ{};
  const auto tile_kv = typename Traits::TileKV{};
  auto sequence_tensor = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    const Elem* ptr = static_cast<const Elem*>(base) + start * row_stride + head * head_stride;
    return make_tensor(make_gmem_ptr(ptr), make_shape(length, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor gQ = local_tile(sequence_tensor(p.q, p.q_row_stride, p.q_head_stride), tile_q, make_coord(_, 0));
  Tensor gdO = local_tile(sequence_tensor(p.dout, p.do_row_stride, p.do_head_stride), tile_q, make_coord(_, 0));
  Tensor gK = local_tile(sequence_tensor(p.k, p.k_row_stride, p.k_head_stride), tile_kv, make_coord(n_block, 0));
  Tensor gV = local_tile(sequence_tensor(p.v, p.v_row_stride, p.v_head_stride), tile_kv, make_coord(n_block, 0));

  extern __shared__ __align__(1024) char smem[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutKV{});
  Tensor sKfinite = make_tensor(make_smem_ptr(shared.k_finite), typename Traits::SmemLayoutKV{});
  Tensor sdSt = make_tensor(make_smem_ptr(shared.ds), typename Traits::SmemLayoutdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds), typename Traits::SmemLayoutdS{});
  Tensor sQt = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout), typename Traits::SmemLayoutQt{});
  const ReachedBits<kBlockN, kHeadDim, kNThreads> reached{shared.reached};
  bool any_reached = false;  // CTA-uniform: whether `reached` holds bits (cleared on first use)

  const int tid = threadIdx.x;
  typename Traits::GmemLoad gmem_load;
  auto gmem_thr = gmem_load.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D, m_blocks)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  Tensor tKcK = gmem_thr.partition_S(make_identity_tensor(tile_kv));

  // K and V of this CTA, once; K scanned once for inf/nan (then dQ in masked tiles reads a zeroed copy).
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVsV = gmem_thr.partition_D(sV);
  load_rows(gmem_load, gmem_thr.partition_S(gK), tKsK, tKcK, length - n0);
  load_rows(gmem_load, gmem_thr.partition_S(gV), tVsV, tKcK, length - n0);
  cp_async_fence();
  bwd_sm90_wait_loads();
  const bool k_non_finite = __syncthreads_or(tile_non_finite<Elem, kBlockN, kHeadDim, kNThreads>(sK)) != 0;
  if (k_non_finite) {  // rare
    copy_finite<kBlockN, kHeadDim, kNThreads>(sK, sKfinite);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();
  }

  typename Traits::MmaSt mma_st;
  typename Traits::MmaKV mma_kv;
  typename Traits::MmaQ mma_q;
  auto thr_st = mma_st.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid);
  auto thr_q = mma_q.get_thread_slice(tid);
  Tensor tSrK = thr_st.partition_fragment_A(sK);  // shared-memory descriptors
  Tensor tSrV = thr_st.partition_fragment_A(sV);
  Tensor tSrQ = thr_st.partition_fragment_B(sQ);
  Tensor tSrdO = thr_st.partition_fragment_B(sdO);
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);
  Tensor tKVrdOt = thr_kv.partition_fragment_B(sdOt);
  Tensor tQrdS = thr_q.partition_fragment_A(sdS);
  Tensor tScS = thr_st.partition_C(make_identity_tensor(typename Traits::TileSt{}));  // (key, query)
  Tensor tQcdQ = thr_q.partition_C(make_identity_tensor(tile_q));
  auto store_ds = make_tiled_copy_C(typename Traits::SmemStoredS{}, mma_st);
  auto thr_store_ds = store_ds.get_thread_slice(tid);
  Tensor tdSsdSt = thr_store_ds.partition_D(sdSt);

  Tensor acc_dk = partition_fragment_C(mma_kv, tile_kv);
  Tensor acc_dv = partition_fragment_C(mma_kv, tile_kv);
  clear(acc_dk);
  clear(acc_dv);

  for (int m_block = m_block_begin; m_block < m_block_end; ++m_block) {
    const int m0 = m_block * kBlockM;
    if (n0 >= mask.column_end(m0, kBlockM) || n0 + kBlockN <= mask.column_begin(m0)) continue;  // CTA-uniform
    __syncthreads();  // every warp is done with the previous sQ, sdO and sdS (its wgmmas were waited for)
    load_rows(gmem_load, tQgQ(_, _, _, m_block), tQsQ, tQcQ, length - m0);
    load_rows(gmem_load, tdOgdO(_, _, _, m_block), tdOsdO, tQcQ, length - m0);
    cp_async_fence();
    bwd_sm90_wait_loads();

    Tensor acc_s = partition_fragment_C(mma_st, typename Traits::TileSt{});   // S^T
    Tensor acc_dp = partition_fragment_C(mma_st, typename Traits::TileSt{});  // dP^T
    wgmma_gemm_pair<false>(mma_st, tSrK, tSrQ, acc_s, tSrV, tSrdO, acc_dp, /*zero_init=*/true);

    // P^T and dS^T in the register layout of the RS A operand: the m64nNk16 A fragment holds, in order, the values
    // of two neighbouring n8 column groups of the m64nN accumulator, so the flat orders agree (as the forward's P).
    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN);
    Tensor rPt = make_tensor<Elem>(partition_shape_A(mma_kv, typename Traits::TileSt{}));
    Tensor rdSt = make_tensor<Elem>(partition_shape_A(mma_kv, typename Traits::TileSt{}));
    static_assert(decltype(size(rPt))::value == decltype(size(acc_s))::value, "P^T fragment vs S^T accumulator");
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int query = m0 + get<1>(tScS(i));
      const int key = n0 + get<0>(tScS(i));
      const bool valid = all_valid || mask.valid(query, key);
      const float x = acc_s(i) * p.alpha;
      rdSt(i) = static_cast<Elem>(valid ? acc_dp(i) * scale * silu_derivative(x) : 0.0f);
      rPt(i) = static_cast<Elem>(valid ? silu(x) * p.inv_scaling : 0.0f);
    }
    if (!all_valid) {  // CTA-uniform
      const uint64_t bad_do_rows = non_finite_rows<Elem, kBlockM, kHeadDim, kNThreads>(sdO);
      const bool bad_q = tile_non_finite<Elem, kBlockM, kHeadDim, kNThreads>(sQ);
      // The wgmmas of S^T and dP^T were waited for, so sQ and sdO may be rewritten after this barrier.
      if (__syncthreads_or(bad_do_rows != 0 || bad_q)) {  // sQ or sdO holds inf/nan (rare)
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = cta_or(bad_do_rows, &shared.non_finite_word);
        reached.mark(sdO, rows, [&](int key_row, int query_row) { return mask.valid(m0 + query_row, n0 + key_row); });
        __syncthreads();  // every thread has read the non-finite entries
        zero_non_finite<kBlockM, kHeadDim, kNThreads>(sQ);
        zero_non_finite<kBlockM, kHeadDim, kNThreads>(sdO);
        cutlass::arch::fence_view_async_shared();  // the zeros are visible to wgmma (async proxy)
        __syncthreads();                           // Q and dO are finite for dK += dS^T Q and dV += P^T dO
      }
    }
    wgmma_gemm_pair<true>(mma_kv, rPt, tKVrdOt, acc_dv, rdSt, tKVrQt, acc_dk, /*zero_init=*/false);

    // dS^T to shared memory for dQ = dS K (the registers of rdSt seen in the S^T accumulator layout).
    Tensor rdSt_c = make_tensor(rdSt.data(), acc_dp.layout());
    copy(store_ds, thr_store_ds.retile_S(rdSt_c), tdSsdSt);
    cutlass::arch::fence_view_async_shared();
    __syncthreads();  // dS in shared memory
    // In masked tiles, rows that may not attend a non-finite K entry take it as 0 (the zeroed copy of K).
    Elem* k_for_dq = (!all_valid && k_non_finite) ? shared.k_finite : shared.k;
    Tensor tQrKt = thr_q.partition_fragment_B(make_tensor(make_smem_ptr(k_for_dq), typename Traits::SmemLayoutKt{}));
    Tensor acc_dq = partition_fragment_C(mma_q, tile_q);
    wgmma_gemm<false>(mma_q, tQrdS, tQrKt, acc_dq, /*zero_init=*/true);
    float* dq = p.dq_accum + (start + m0) * p.dq_row_stride + head * p.dq_head_stride;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int row = get<0>(tQcdQ(i));
      if (row < length - m0) atomicAdd(dq + row * p.dq_row_stride + get<1>(tQcdQ(i)), acc_dq(i));
    }
  }

  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(tile_kv));
  Elem* dk = static_cast<Elem*>(p.dk) + (start + n0) * p.dk_row_stride + head * p.dk_head_stride;
  Elem* dv = static_cast<Elem*>(p.dv) + (start + n0) * p.dv_row_stride + head * p.dv_head_stride;
  // The barrier after reached.mark() ordered the bits of every thread before these reads.
  store_rows(acc_dk, tKVcKV, dk, p.dk_row_stride, length - n0, static_cast<decltype(reached) const*>(nullptr));
  store_rows(acc_dv, tKVcKV, dv, p.dv_row_stride, length - n0, any_reached ? &reached : nullptr);
#endif
}

// Whether the Hopper backward's sm_90a code is the binary that runs on the current device.
template <class Traits>
bool bwd_sm90_runs_here() {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, &hstu_attn_bwd_sm90_kernel<Traits>) != cudaSuccess) {
    (void)cudaGetLastError();  // no image for this device: clear the error, use the SM80 kernel
    return false;
  }
  return attributes.binaryVersion == 90;
}

// The forward's conditions (fwd_sm90_takes) for the tensors the Hopper backward loads with 16-byte vectors: q, k,
// v and dO with 16-byte-aligned bases and strides, positive strides (not expand()ed views).
template <class Traits>
bool bwd_sm90_takes(const HstuAttnBwdParams& p) {
  using Elem = typename Traits::Elem;
  return tma_compatible<Elem>(p.q, p.q_row_stride, p.q_head_stride) &&
         tma_compatible<Elem>(p.k, p.k_row_stride, p.k_head_stride) &&
         tma_compatible<Elem>(p.v, p.v_row_stride, p.v_head_stride) &&
         tma_compatible<Elem>(p.dout, p.do_row_stride, p.do_head_stride) && bwd_sm90_runs_here<Traits>();
}

template <class Traits>
cudaError_t launch_bwd_sm90(const HstuAttnBwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &hstu_attn_bwd_sm90_kernel<Traits>;
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (error != cudaSuccess) return error;
  const int64_t num_n_blocks = (int64_t(p.max_seq_len) + Traits::kBlockN - 1) / Traits::kBlockN;
  const int64_t blocks = num_n_blocks * p.num_sequences;
  if (blocks == 0 || p.num_heads == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || p.num_heads > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks), unsigned(p.num_heads)), Traits::kNThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hstu_attn
