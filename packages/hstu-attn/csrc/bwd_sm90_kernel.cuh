// Hopper (sm_90a) backward of jagged HSTU attention without rab, with or without the fused relative bias (b = the
// position and time tables' value of the pair, added to alpha S^T before SiLU; its d b summed per relative distance
// and time bucket into the tables' gradients, as bwd_kernel.cuh does). Warp-specialized: one CTA of 384
// threads owns a 128 x D tile of dK and dV for one (sequence, head) and walks the 64-row query blocks that can attend
// its keys (the block range of bwd_kernel.cuh). Two consumer warpgroups of 128 threads own 64 key rows each (their dK,
// dV in registers, setmaxnreg up to 240); a producer warpgroup (setmaxnreg down to 24), in which one thread issues
// TMA loads: K and V once on their own mbarrier, Q and dO per query block through a two-stage mbarrier pipeline
// (PipelineTmaAsync). Per query block, in each consumer warpgroup:
//   S^T = K Q^T, dP^T = V dO^T               wgmma SS, one batch, fp32 [64 keys, 64 queries]
//   P^T = SiLU(alpha S^T + b) / scaling, dS^T = dP^T * alpha / scaling * SiLU'(alpha S^T + b)  (0 where invalid:
//                                            selected, never multiplied; the math of bwd_kernel.cuh)
//   dV += P^T dO, dK += dS^T Q               wgmma RS, one batch: P^T, dS^T from registers, dO^T, Q^T read MN-major
//   dQ  = dS K                               dS^T of both warpgroups stored to shared memory with stmatrix before the
//                                            dV/dK batch is issued; wgmma SS over the 128 keys, each warpgroup D/2
//                                            columns, queued behind that batch; one wait for the three products, the
//                                            Q/dO stage released, dQ added with fp32 atomics
// Every tile sits in shared memory in the GMMA 128-byte-swizzled K-major layout. The TMA descriptors span the whole
// jagged [L, H, D] tensors: a tile starts at the sequence's first token plus its offset, so it may reach into the next
// sequence (rows the mask drops) or past L (TMA fills zeros). A tile reaching past the sequence end is therefore always
// treated as masked, and dK, dV, dQ rows past the end are never stored. Non-finite containment as bwd_kernel.cuh
// implements finite.cuh: in masked tiles the non-finite q and dO entries are zeroed in the stage after S^T and dP^T
// used them, before dK += dS^T Q and dV += P^T dO; the dV entries that a valid pair links to a non-finite dO entry are
// stored NaN; dQ = dS K takes non-finite K entries as 0 in masked tiles (a zeroed copy of K, made once when K holds
// inf/nan, the next sequence's rows included). Generic-proxy writes to shared memory (zeroing, dS) are made visible to
// wgmma with fence.proxy.async; the consumers synchronize on their own named barriers.
//
// The kernel body exists for sm_90a only; other targets compile an empty body that the host never launches
// (bwd_sm90_runs_here checks that the loaded binary is sm_90 code).
#pragma once

#include <stdint.h>

#include <cuda_runtime.h>

#include "bwd_kernel.cuh"
#include "finite.cuh"
#include "hstu_attn_cutlass.h"
#include "mask.cuh"
#include "sm90_common.cuh"

namespace hstu_attn {

using namespace cute;

template <int kHeadDim_, typename Elem_>
struct BwdSm90Traits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = 2;  // consumer warpgroups, 64 key rows each
  static constexpr int kBlockM = 64;  // query rows per step (finite.cuh's row masks hold <= 64 rows)
  static constexpr int kBlockN = 64 * kWarpgroups;  // key rows per CTA
  static constexpr int kStages = 2;  // Q/dO pipeline depth
  static constexpr int kConsumerThreads = 128 * kWarpgroups;  // threads 0 .. 255 (finite.cuh indexes by threadIdx.x)
  static constexpr int kNThreads = kConsumerThreads + 128;     // + the producer warpgroup
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;  // 2 x 128 x 240 + 128 x 24 <= 64K registers
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileSt = Shape<Int<kBlockN>, Int<kBlockM>>;  // S^T, dP^T: [keys, queries]
  using WarpgroupsAlongM = Layout<Shape<Int<kWarpgroups>, _1, _1>>;
  using WarpgroupsAlongN = Layout<Shape<_1, Int<kWarpgroups>, _1>>;
  // S^T = K Q^T and dP^T = V dO^T: A = K or V [N, D], B = Q or dO [M, D], both K-major; warpgroups along the keys.
  using MmaSt = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), WarpgroupsAlongM{}));
  // dV += P^T dO and dK += dS^T Q: A = P^T or dS^T [N, M] in registers, B = dO^T or Q^T [D, M] MN-major.
  using MmaKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupsAlongM{}));
  // dQ = dS K: A = dS [M, N] read MN-major from dS^T in shared memory, B = K^T [D, N] MN-major; the warpgroups split D.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim / kWarpgroups>, Int<kBlockN>>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      WarpgroupsAlongN{}));
  // dS^T from registers to shared memory with stmatrix (four 8 x 8 matrices per instruction).
  using SmemStoredS = Copy_Atom<SM90_U32x4_STSM_N, Elem>;

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Elem>;  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQTile = decltype(tile_to_shape(SmemAtom{}, TileQ{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, TileKV{}));
  using SmemLayoutdSt = decltype(tile_to_shape(SmemAtom{}, TileSt{}));
  // Transposed views: the same bytes, coordinates swapped.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutdS =
      decltype(composition(SmemLayoutdSt{}, make_layout(Shape<Int<kBlockM>, Int<kBlockN>>{}, GenRowMajor{})));

  // TMA over a whole [L, H, D] tensor seen as (token, d, head) with unit stride along d.
  using GmemTensor = JaggedTmaView<Elem>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQTile{}, TileQ{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutKV{}, TileKV{}, _1{}));
  static constexpr uint32_t kBytesQdO = 2 * kBlockM * kHeadDim * sizeof(Elem);  // one Q tile and one dO tile
  static constexpr uint32_t kBytesKV = 2 * kBlockN * kHeadDim * sizeof(Elem);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using BiasGradients = RelativeBiasGradients<kBlockM, kBlockN, kConsumerThreads>;
  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];  // 128-byte swizzle atoms repeat every 1024 bytes
    alignas(1024) Elem dout[cosize_v<SmemLayoutQ>];
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem k_finite[cosize_v<SmemLayoutKV>];  // K with inf/nan entries as 0, for dQ in masked tiles
    alignas(1024) Elem ds[cosize_v<SmemLayoutdSt>];        // dS^T [keys, queries]
    uint32_t reached[kBlockN * kHeadDim / 32];  // finite.cuh's bitmap of dV entries stored NaN
    // RelativeBiasGradients' sums (the position window, then the time buckets when they fit in shared memory)
    float bias_sums[BiasGradients::kWindowFloats + BiasGradients::kMaxSharedBuckets];
    unsigned long long non_finite_word;          // consumers_or's word
    cutlass::arch::ClusterTransactionBarrier kv_full;
    typename Pipeline::SharedStorage pipeline;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

#if HSTU_ATTN_SM90_DEVICE
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

// acc1 (+)= A1 B1^T and acc2 (+)= A2 B2^T with wgmma, issued as one committed batch, not waited for (as
// wgmma_batch: no operand may be read or written until a warpgroup_wait covers it). zero_init: acc = A B^T.
// kRegisterA: the A operands are register fragments (RS), else shared-memory descriptor fragments (SS).
template <bool kRegisterA, class Mma, class FragA1, class FragB1, class Acc1, class FragA2, class FragB2, class Acc2>
__device__ __forceinline__ void wgmma_pair_batch(Mma& mma, FragA1& a1, FragB1 const& b1, Acc1& acc1, FragA2& a2,
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
}

// wgmma_pair_batch, waited for.
template <bool kRegisterA, class Mma, class FragA1, class FragB1, class Acc1, class FragA2, class FragB2, class Acc2>
__device__ __forceinline__ void wgmma_gemm_pair(Mma& mma, FragA1& a1, FragB1 const& b1, Acc1& acc1, FragA2& a2,
                                                FragB2 const& b2, Acc2& acc2, bool zero_init) {
  wgmma_pair_batch<kRegisterA>(mma, a1, b1, acc1, a2, b2, acc2, zero_init);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc1);
  warpgroup_fence_operand(acc2);
  if constexpr (kRegisterA) {
    warpgroup_fence_operand(a1);
    warpgroup_fence_operand(a2);
  }
}

// dst = src with its inf/nan entries replaced by 0 (two [kRows, kCols] shared-memory tiles; kThreads threads, from
// thread 0, share the work).
template <int kRows, int kCols, int kThreads, class Src, class Dst>
__device__ __forceinline__ void copy_finite(Src const& src, Dst& dst) {
  using Elem = typename Dst::value_type;
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const Elem x = src(i / kCols, i % kCols);
    dst(i / kCols, i % kCols) = non_finite(x) ? Elem(0.0f) : x;
  }
}

// The geometry that producer and consumers share: one (sequence, head, key block) and its query blocks.
struct Sm90BwdBlock {
  int64_t start;  // first token of the sequence
  int length, n0, head, m_block_begin, m_block_end;
  SequenceMask mask;
};

template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool sm90_bwd_block(const HstuAttnBwdParams& p, Sm90BwdBlock& b) {
  // Blocks are ordered by key block, last first, over all sequences (as bwd_kernel.cuh).
  const int num_n_blocks = (p.max_seq_len + kBlockN - 1) / kBlockN;
  const int sequence = blockIdx.x % p.num_sequences;
  b.n0 = (num_n_blocks - 1 - int(blockIdx.x / p.num_sequences)) * kBlockN;
  b.head = blockIdx.y;
  b.start = load_index(p.seq_offsets, p.offsets_int64, sequence);
  b.length = int(load_index(p.seq_offsets, p.offsets_int64, sequence + 1) - b.start);
  if (b.n0 >= b.length) return false;
  const int targets = p.num_targets == nullptr ? 0 : int(load_index(p.num_targets, p.targets_int64, sequence));
  const SequenceMask mask{b.length, b.length - targets, p.contextual_seq_len, p.max_attn_len, p.causal != 0};
  b.mask = mask;
  const int n0 = b.n0;
  const int length = b.length;
  // Under a causal mask with no contextual rows every valid pair has query >= key.
  const int m_block_begin = (mask.causal && mask.contextual == 0) ? n0 / kBlockM : 0;
  const int m_block_end = (length + kBlockM - 1) / kBlockM;
  b.m_block_begin = m_block_begin;
  b.m_block_end = m_block_end;
  return true;
}

// Whether the query block at m0 holds a valid pair with the key block at n0 (the same test in producer and consumers).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool sm90_bwd_visits(const SequenceMask& mask, int m0, int n0) {
  return !(n0 >= mask.column_end(m0, kBlockM) || n0 + kBlockN <= mask.column_begin(m0));
}

// Producer: one thread loads K and V, then Q and dO of each visited query block into the pipeline's stages.
template <class Traits>
__device__ __forceinline__ void sm90_bwd_produce(const HstuAttnBwdParams& p, const Sm90BwdBlock& b,
                                                 typename Traits::SharedStorage& shared,
                                                 typename Traits::Pipeline& pipeline, typename Traits::TmaQ const& tma_q,
                                                 typename Traits::TmaQ const& tma_do,
                                                 typename Traits::TmaKV const& tma_k,
                                                 typename Traits::TmaKV const& tma_v) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  const auto shape = make_shape(int32_t(p.num_tokens), int32_t(Traits::kHeadDim), int32_t(p.num_heads));
  // The sequence's rows from its first token on (a TMA coordinate tensor: no memory is touched here).
  auto rows = [&](auto const& tma) { return domain_offset(make_coord(b.start, _0{}), tma.get_tma_tensor(shape)(_, _, b.head)); };
  Tensor gQ = local_tile(rows(tma_q), typename Traits::TileQ{}, make_coord(_, _0{}));  // (M, D, m_blocks)
  Tensor gdO = local_tile(rows(tma_do), typename Traits::TileQ{}, make_coord(_, _0{}));
  Tensor gK = local_tile(rows(tma_k), typename Traits::TileKV{}, make_coord(b.n0 / kBlockN, _0{}));
  Tensor gV = local_tile(rows(tma_v), typename Traits::TileKV{}, make_coord(b.n0 / kBlockN, _0{}));
  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQ{});  // (M, D, stages)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutKV{});
  auto [tQgQ, tQsQ] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tdOgdO, tdOsdO] = tma_partition(tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
  auto [tKgK, tKsK] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVgV, tVsV] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

  shared.kv_full.arrive_and_expect_tx(Traits::kBytesKV);
  copy(tma_k.with(reinterpret_cast<uint64_t&>(shared.kv_full), 0), tKgK, tKsK);
  copy(tma_v.with(reinterpret_cast<uint64_t&>(shared.kv_full), 0), tVgV, tVsV);
  auto state = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  for (int m_block = b.m_block_begin; m_block < b.m_block_end; ++m_block) {
    if (!sm90_bwd_visits<kBlockM, kBlockN>(b.mask, m_block * kBlockM, b.n0)) continue;
    pipeline.producer_acquire(state);  // the stage is free; its full barrier expects kBytesQdO
    uint64_t* full = pipeline.producer_get_barrier(state);
    copy(tma_q.with(*full, 0), tQgQ(_, m_block), tQsQ(_, state.index()));
    copy(tma_do.with(*full, 0), tdOgdO(_, m_block), tdOsdO(_, state.index()));
    ++state;
  }
}

// The plain kernel's stand-in for RelativeBiasGradients: no shared sums to zero, nothing to add or flush.
struct NoBiasGradients {
  __device__ __forceinline__ void add_position(int, int, int, int, float) const {}
  __device__ __forceinline__ void add_time(int, float) const {}
  __device__ __forceinline__ void flush_tile(int, int, int) const {}
  __device__ __forceinline__ void flush_time(int) const {}
};

// Consumers: both warpgroups walk the query blocks of the pipeline, then store their 64 dK and dV rows each.
// kRelative: the fused relative bias is added to alpha S^T of every valid pair before SiLU, and its tables' gradients
// (the d bias of those pairs) are summed per distance and per time bucket (RelativeBiasGradients) into the fp32 rows.
template <class Traits, bool kRelative>
__device__ __forceinline__ void sm90_bwd_consume(const HstuAttnBwdParams& p, const Sm90BwdBlock& b,
                                                 typename Traits::SharedStorage& shared,
                                                 typename Traits::Pipeline& pipeline) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kConsumerThreads;
  const int tid = threadIdx.x;
  const int n0 = b.n0;
  const int length = b.length;
  const SequenceMask& mask = b.mask;
  const float scale = p.alpha * p.inv_scaling;
  const auto tile_q = typename Traits::TileQ{};
  const auto tile_kv = typename Traits::TileKV{};

  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQ{});  // (M, D, stages)
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutKV{});
  Tensor sKfinite = make_tensor(make_smem_ptr(shared.k_finite), typename Traits::SmemLayoutKV{});
  Tensor sdSt = make_tensor(make_smem_ptr(shared.ds), typename Traits::SmemLayoutdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds), typename Traits::SmemLayoutdS{});
  Tensor sQt = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQt{});  // (D, M, stages)
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout), typename Traits::SmemLayoutQt{});
  const ReachedBits<kBlockN, kHeadDim, kThreads> reached{shared.reached};
  bool any_reached = false;  // uniform over the consumers: whether `reached` holds bits (cleared on first use)
  const RelativeBiasRows bias_rows(p.relative_bias, b.start, b.head);  // read only with kRelative
  const auto bias_grads = [&] {
    if constexpr (kRelative) {
      return typename Traits::BiasGradients(shared.bias_sums, p, b.head, tid);  // zeroes its shared sums
    } else {
      return NoBiasGradients{};
    }
  }();
  if constexpr (kRelative) consumers_sync<kThreads>();  // the sums are zeroed before any add or flush

  // K (with the next sequence's rows when the block reaches past the end) scanned once for inf/nan: dQ in masked
  // tiles then reads a zeroed copy.
  shared.kv_full.wait(0);
  const bool k_non_finite = consumers_any<kThreads>(tile_non_finite<Elem, kBlockN, kHeadDim, kThreads>(sK));
  if (k_non_finite) {  // rare
    copy_finite<kBlockN, kHeadDim, kThreads>(sK, sKfinite);
    cutlass::arch::fence_view_async_shared();
    consumers_sync<kThreads>();
  }

  typename Traits::MmaSt mma_st;
  typename Traits::MmaKV mma_kv;
  typename Traits::MmaQ mma_q;
  auto thr_st = mma_st.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid);
  auto thr_q = mma_q.get_thread_slice(tid);
  Tensor tSrK = thr_st.partition_fragment_A(sK);  // shared-memory descriptors
  Tensor tSrV = thr_st.partition_fragment_A(sV);
  Tensor tSrQ = thr_st.partition_fragment_B(sQ);  // (MMA, MMA_N, MMA_K, stages)
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

  typename Traits::Pipeline::PipelineState state;  // stage 0, phase 0: the producer's order
  for (int m_block = b.m_block_begin; m_block < b.m_block_end; ++m_block) {
    const int m0 = m_block * kBlockM;
    if (!sm90_bwd_visits<kBlockM, kBlockN>(mask, m0, n0)) continue;  // uniform
    const int stage = state.index();
    pipeline.consumer_wait(state);  // Q[m_block] and dO[m_block] arrived
    Tensor acc_s = partition_fragment_C(mma_st, typename Traits::TileSt{});   // S^T
    Tensor acc_dp = partition_fragment_C(mma_st, typename Traits::TileSt{});  // dP^T
    wgmma_gemm_pair<false>(mma_st, tSrK, tSrQ(_, _, _, stage), acc_s, tSrV, tSrdO(_, _, _, stage), acc_dp,
                           /*zero_init=*/true);

    // P^T and dS^T in the register layout of the RS A operand: the m64nNk16 A fragment holds, in order, the values
    // of two neighbouring n8 column groups of the m64nN accumulator, so the flat orders agree (as the forward's P).
    // A tile whose query rows reach past the sequence end holds the next sequence's (or TMA's zero) rows: masked.
    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN) && m0 + kBlockM <= length;
    Tensor rPt = make_tensor<Elem>(partition_shape_A(mma_kv, typename Traits::TileSt{}));
    Tensor rdSt = make_tensor<Elem>(partition_shape_A(mma_kv, typename Traits::TileSt{}));
    static_assert(decltype(size(rPt))::value == decltype(size(acc_s))::value, "P^T fragment vs S^T accumulator");
    with_tile_mask(all_valid, [&](auto unmasked) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int query = m0 + get<1>(tScS(i));
        const int key = n0 + get<0>(tScS(i));
        const bool valid = decltype(unmasked)::value || mask.valid(query, key);
        float x = acc_s(i) * p.alpha;
        [[maybe_unused]] int bucket = -1;  // set by value() when there is a time table
        if constexpr (kRelative) {
          if (valid) x += bias_rows.value(query, key, bucket);  // valid pairs lie inside the sequence
        }
        const float s = sigmoid(x);  // silu(x) = x s, silu'(x) = s (1 + x (1 - s))
        const float silu_grad = s * (1.0f + x * (1.0f - s));
        if constexpr (kRelative) {
          const float ds = valid ? acc_dp(i) * p.inv_scaling * silu_grad : 0.0f;  // d bias
          if (valid) bias_grads.add_position(query, key, m0, n0, ds);
          bias_grads.add_time(valid ? bucket : -1, ds);  // warp-collective
          rdSt(i) = static_cast<Elem>(ds * p.alpha);
        } else {
          rdSt(i) = static_cast<Elem>(valid ? acc_dp(i) * scale * silu_grad : 0.0f);
        }
        rPt(i) = static_cast<Elem>(valid ? x * s * p.inv_scaling : 0.0f);
      }
    });
    if (!all_valid) {  // uniform over the consumers
      Tensor sQs = sQ(_, _, stage);
      Tensor sdOs = sdO(_, _, stage);
      const uint64_t bad_do_rows = non_finite_rows<Elem, kBlockM, kHeadDim, kThreads>(sdOs);
      const bool bad_q = tile_non_finite<Elem, kBlockM, kHeadDim, kThreads>(sQs);
      // Both warpgroups waited for their S^T and dP^T wgmmas, so after this barrier the stage may be rewritten.
      if (consumers_any<kThreads>(bad_do_rows != 0 || bad_q)) {  // Q or dO holds inf/nan (rare)
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = consumers_or<kThreads>(bad_do_rows, &shared.non_finite_word);
        reached.mark(sdOs, rows, [&](int key_row, int query_row) { return mask.valid(m0 + query_row, n0 + key_row); });
        consumers_sync<kThreads>();  // every consumer has read the non-finite entries
        zero_non_finite<kBlockM, kHeadDim, kThreads>(sQs);
        zero_non_finite<kBlockM, kHeadDim, kThreads>(sdOs);
        cutlass::arch::fence_view_async_shared();  // the zeros are visible to wgmma (async proxy)
        consumers_sync<kThreads>();                // Q and dO are finite for dK += dS^T Q and dV += P^T dO
      }
    }
    // dS^T of both warpgroups to shared memory for dQ = dS K (the registers of rdSt seen in the S^T accumulator
    // layout), after every consumer's previous dQ wgmma (waited for) has read the previous dS^T; stored before the
    // dV/dK batch is issued, since the registers of an in-flight wgmma's A operand may not be read.
    consumers_sync<kThreads>();
    if constexpr (kRelative) bias_grads.flush_tile(m0, n0, tid);  // the sync above follows this tile's adds
    Tensor rdSt_c = make_tensor(rdSt.data(), acc_dp.layout());
    copy(store_ds, thr_store_ds.retile_S(rdSt_c), tdSsdSt);
    cutlass::arch::fence_view_async_shared();
    // dV += P^T dO and dK += dS^T Q, then dQ = dS K once both warpgroups' dS^T are in shared memory, queued behind
    // them without a wait in between; one wait covers the three products.
    wgmma_pair_batch<true>(mma_kv, rPt, tKVrdOt(_, _, _, stage), acc_dv, rdSt, tKVrQt(_, _, _, stage), acc_dk,
                           /*zero_init=*/false);
    consumers_sync<kThreads>();  // dS^T in shared memory (and the position window flushed before the next adds)
    // In masked tiles, rows that may not attend a non-finite K entry take it as 0 (the zeroed copy of K).
    Elem* k_for_dq = (!all_valid && k_non_finite) ? shared.k_finite : shared.k;
    Tensor tQrKt = thr_q.partition_fragment_B(make_tensor(make_smem_ptr(k_for_dq), typename Traits::SmemLayoutKt{}));
    Tensor acc_dq = partition_fragment_C(mma_q, tile_q);
    wgmma_batch<false>(mma_q, tQrdS, tQrKt, acc_dq, /*zero_init=*/true);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(rPt);
    warpgroup_fence_operand(rdSt);
    warpgroup_fence_operand(acc_dq);
    pipeline.consumer_release(state);  // the dV/dK products have read the stage
    ++state;
    float* dq = p.dq_accum + (b.start + m0) * p.dq_row_stride + b.head * p.dq_head_stride;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int row = get<0>(tQcdQ(i));
      if (row < length - m0) atomicAdd(dq + row * p.dq_row_stride + get<1>(tQcdQ(i)), acc_dq(i));
    }
  }

  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(tile_kv));
  Elem* dk = static_cast<Elem*>(p.dk) + (b.start + n0) * p.dk_row_stride + b.head * p.dk_head_stride;
  Elem* dv = static_cast<Elem*>(p.dv) + (b.start + n0) * p.dv_row_stride + b.head * p.dv_head_stride;
  // The consumers_sync after the last mark() ordered every consumer's bits before these reads.
  // (After the last tile's two consumers_syncs, every add to the time sums is done.)
  if constexpr (kRelative) bias_grads.flush_time(tid);
  store_rows(acc_dk, tKVcKV, dk, p.dk_row_stride, length - n0, static_cast<decltype(reached) const*>(nullptr));
  store_rows(acc_dv, tKVcKV, dv, p.dv_row_stride, length - n0, any_reached ? &reached : nullptr);
}
#endif

template <class Traits, bool kRelative>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    hstu_attn_bwd_sm90_kernel(const HstuAttnBwdParams p, const __grid_constant__ typename Traits::TmaQ tma_q,
                              const __grid_constant__ typename Traits::TmaQ tma_do,
                              const __grid_constant__ typename Traits::TmaKV tma_k,
                              const __grid_constant__ typename Traits::TmaKV tma_v) {
#if HSTU_ATTN_SM90_DEVICE
  using Pipeline = typename Traits::Pipeline;
  Sm90BwdBlock block;
  if (!sm90_bwd_block<Traits::kBlockM, Traits::kBlockN>(p, block)) return;  // the whole CTA

  extern __shared__ __align__(1024) char smem[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(smem);
  if (threadIdx.x == Traits::kConsumerThreads) {  // the producer's leader, the one thread that issues loads
    cute::prefetch_tma_descriptor(tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_do.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_v.get_tma_descriptor());
    shared.kv_full.init(1);
  }
  const auto params = sm90_pipeline_params<Pipeline, Traits::kConsumerThreads>(Traits::kBytesQdO);
  Pipeline pipeline(shared.pipeline, params, Shape<_1, _1, _1>{});  // initializes the barriers
  __syncthreads();  // barrier initialization visible to every thread
  // Warp specialization, written out here: passed as lambdas to a helper, the relative consumer was not inlined (a
  // 384-byte stack frame, every wgmma waited for alone)
  if (threadIdx.x >= Traits::kConsumerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x == Traits::kConsumerThreads) sm90_bwd_produce<Traits>(p, block, shared, pipeline, tma_q, tma_do, tma_k, tma_v);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    sm90_bwd_consume<Traits, kRelative>(p, block, shared, pipeline);
  }
#endif
}

// Whether the Hopper backward takes `p`: q, k, v and dO suit TMA (as fwd_sm90_takes: 16-byte-aligned bases and
// strides, positive strides, L within 32 bits) and the backward's sm_90a code runs on the current device.
template <class Traits>
bool bwd_sm90_takes(const HstuAttnBwdParams& p) {
  using Elem = typename Traits::Elem;
  return qkv_suit_tma<Elem>(p) && tma_compatible<Elem>(p.dout, p.do_row_stride, p.do_head_stride) &&
         sm90_code_runs_here(&hstu_attn_bwd_sm90_kernel<Traits, false>);
}

template <class Traits>
cudaError_t launch_bwd_sm90(const HstuAttnBwdParams& p, cudaStream_t stream) {
  using Elem = typename Traits::Elem;
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = has_relative_bias(p.relative_bias) ? &hstu_attn_bwd_sm90_kernel<Traits, true>
                                                   : &hstu_attn_bwd_sm90_kernel<Traits, false>;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  dim3 grid;
  if (error == cudaSuccess) error = sm90_grid(p.max_seq_len, Traits::kBlockN, p.num_sequences, p.num_heads, &grid);
  if (error != cudaSuccess || grid.x == 0 || grid.y == 0) return error;
  auto tma = [&](const void* base, int64_t row_stride, int64_t head_stride, auto smem_layout, auto tile) {
    const auto view = jagged_tma_view<Elem, Traits::kHeadDim>(base, p.num_tokens, p.num_heads, row_stride, head_stride);
    return make_tma_copy(SM90_TMA_LOAD{}, view, smem_layout, tile, _1{});
  };
  const auto rows = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    return tma(base, row_stride, head_stride, typename Traits::SmemLayoutQTile{}, typename Traits::TileQ{});
  };
  const auto keys = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    return tma(base, row_stride, head_stride, typename Traits::SmemLayoutKV{}, typename Traits::TileKV{});
  };
  const typename Traits::TmaQ tma_q = rows(p.q, p.q_row_stride, p.q_head_stride);
  const typename Traits::TmaQ tma_do = rows(p.dout, p.do_row_stride, p.do_head_stride);
  const typename Traits::TmaKV tma_k = keys(p.k, p.k_row_stride, p.k_head_stride);
  const typename Traits::TmaKV tma_v = keys(p.v, p.v_row_stride, p.v_head_stride);
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(p, tma_q, tma_do, tma_k, tma_v);
  return cudaGetLastError();
}

}  // namespace hstu_attn
