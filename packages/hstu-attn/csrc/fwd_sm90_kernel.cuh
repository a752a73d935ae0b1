// Hopper (sm_90a) forward of jagged HSTU attention without rab (with or without the fused relative bias of
// relative_bias.cuh, added per valid pair before SiLU as in the SM80 kernel): one CTA computes a 128 x D output
// tile of one (sequence, head). Warp-specialized: a producer warpgroup (one thread issues the loads, the group gives
// its registers away with setmaxnreg) and two consumer warpgroups of 128 threads, each owning 64 query rows.
//
// Loads: TMA over the whole jagged [L, H, D] tensors (one descriptor per tensor, rows = L tokens; a tile is addressed
// at the sequence's first token + its offset, so it may reach into the next sequence, whose rows the mask drops, or
// past L, which TMA fills with zeros). Q arrives once on its own mbarrier; K and V tiles go through a three-stage
// mbarrier pipeline (PipelineTmaAsync: full barriers with transaction counts, empty barriers the consumers release).
// Per key tile: S = Q K^T with wgmma reading both operands from shared memory (SS), P = SiLU(alpha S) / scaling
// where the pair is valid and 0 where it is not (selected, never multiplied; mask.cuh drops keys and queries at or
// past the sequence end), P converted to the input dtype in registers, O += P V with wgmma taking P from registers
// and V from shared memory (RS); S of the next key tile is issued together with P V of the current one and turned
// into P while P V runs (see sm90_consume). The tiles sit in shared memory in the GMMA 128-byte-swizzled K-major layout (V is
// read as V^T through the same bytes, MN-major). Output rows past the sequence end are never stored. Masked tiles
// (every tile that reaches past the sequence end is one) keep a non-finite V entry away from the rows that may not
// attend its token with finite.cuh (zeroed in shared memory before P V; output entries a valid pair links to it
// stored NaN), as the SM80 kernel does, with the consumer warpgroups' own barriers instead of __syncthreads.
//
// The kernel body exists for sm_90a only (wgmma, TMA, setmaxnreg); other targets compile an empty body that the
// host never launches (fwd_sm90_runs_here checks that the loaded binary is sm_90 code).
#pragma once

#include <stdint.h>

#include <cuda_runtime.h>

#include "finite.cuh"
#include "fwd_kernel.cuh"
#include "hstu_attn_cutlass.h"
#include "mask.cuh"
#include "sm90_common.cuh"

namespace hstu_attn {

using namespace cute;

template <int kHeadDim_, typename Elem_>
struct FwdSm90Traits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpgroups = 2;  // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = 64;  // finite.cuh's row masks hold <= 64 rows
  // K/V pipeline depth: the overlapped consumer loop holds two stages at once (this block's V, the next block's K), so
  // a third lets the producer load the block after next while both are held.
  static constexpr int kStages = 3;
  static constexpr int kConsumerThreads = 128 * kWarpgroups;  // threads 0 .. 255 (finite.cuh indexes by threadIdx.x)
  static constexpr int kNThreads = kConsumerThreads + 128;     // + the producer warpgroup
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;  // 2 x 128 x 240 + 128 x 24 <= 64K registers
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");

  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  using WarpgroupsAlongM = Layout<Shape<Int<kWarpgroups>, _1, _1>>;
  // S = Q K^T: A = Q [M, D] in registers (loaded once from shared memory with ldmatrix), B = K [N, D] K-major in
  // shared memory. With both operands in shared memory (SS) a m64n64k16 wgmma reads as many bytes as the SM's shared
  // memory delivers in the time of its math, so Q K^T would be bound by shared memory; RS halves the bytes.
  using MmaQK = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpgroupsAlongM{}));
  // O = P V: A = P [M, N] in registers, B = V^T [D, N] MN-major (V's rows are contiguous along D).
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupsAlongM{}));

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Elem>;  // 8 x 64 elements, 128-byte swizzle
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, TileQ{}));
  using SmemLayoutKVTile = decltype(tile_to_shape(SmemAtom{}, TileKV{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // TMA over a whole [L, H, D] tensor seen as (token, d, head) with unit stride along d.
  using GmemTensor = JaggedTmaView<Elem>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutQ{}, TileQ{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutKVTile{}, TileKV{}, _1{}));
  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Elem);
  static constexpr uint32_t kBytesKV = 2 * kBlockN * kHeadDim * sizeof(Elem);  // one K tile and one V tile

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  struct SharedStorage {
    alignas(1024) Elem q[cosize_v<SmemLayoutQ>];  // 128-byte swizzle atoms repeat every 1024 bytes
    alignas(1024) Elem k[cosize_v<SmemLayoutKV>];
    alignas(1024) Elem v[cosize_v<SmemLayoutKV>];
    uint32_t reached[kBlockM * kHeadDim / 32];  // finite.cuh's bitmap of output entries stored NaN
    unsigned long long non_finite_word;          // consumers_or's word
    cutlass::arch::ClusterTransactionBarrier q_full;
    typename Pipeline::SharedStorage pipeline;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
};

#if HSTU_ATTN_SM90_DEVICE
// The tile geometry that producer and consumers share: one (sequence, head, query block) and its key blocks.
struct Sm90Block {
  int64_t start;  // first token of the sequence
  int length, m0, head, n_block_begin, n_block_end;
  SequenceMask mask;
};

template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool sm90_block(const HstuAttnFwdParams& p, Sm90Block& b) {
  // Blocks are ordered by query block, last (heaviest under the causal mask) first, over all sequences.
  const int num_m_blocks = (p.max_seq_len + kBlockM - 1) / kBlockM;
  const int sequence = blockIdx.x % p.num_sequences;
  b.m0 = (num_m_blocks - 1 - int(blockIdx.x / p.num_sequences)) * kBlockM;
  b.head = blockIdx.y;
  b.start = load_index(p.seq_offsets, p.offsets_int64, sequence);
  b.length = int(load_index(p.seq_offsets, p.offsets_int64, sequence + 1) - b.start);
  if (b.m0 >= b.length) return false;
  const int targets = p.num_targets == nullptr ? 0 : int(load_index(p.num_targets, p.targets_int64, sequence));
  b.mask = SequenceMask{b.length, b.length - targets, p.contextual_seq_len, p.max_attn_len, p.causal != 0};
  b.n_block_begin = b.mask.column_begin(b.m0) / kBlockN;
  b.n_block_end = (b.mask.column_end(b.m0, kBlockM) + kBlockN - 1) / kBlockN;
  return true;
}

// Producer: one thread loads Q, then the key blocks from last to first into the pipeline's stages.
template <class Traits>
__device__ __forceinline__ void sm90_produce(const HstuAttnFwdParams& p, const Sm90Block& b,
                                             typename Traits::SharedStorage& shared, typename Traits::Pipeline& pipeline,
                                             typename Traits::TmaQ const& tma_q, typename Traits::TmaKV const& tma_k,
                                             typename Traits::TmaKV const& tma_v) {
  const auto shape = make_shape(int32_t(p.num_tokens), int32_t(Traits::kHeadDim), int32_t(p.num_heads));
  // The sequence's rows from its first token on (a TMA coordinate tensor: no memory is touched here).
  auto rows = [&](auto const& tma) { return domain_offset(make_coord(b.start, _0{}), tma.get_tma_tensor(shape)(_, _, b.head)); };
  Tensor gQ = local_tile(rows(tma_q), typename Traits::TileQ{}, make_coord(b.m0 / Traits::kBlockM, _0{}));
  Tensor gK = local_tile(rows(tma_k), typename Traits::TileKV{}, make_coord(_, _0{}));  // (N, D, n_blocks)
  Tensor gV = local_tile(rows(tma_v), typename Traits::TileKV{}, make_coord(_, _0{}));
  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Traits::SmemLayoutKV{});  // (N, D, stages)
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutKV{});
  auto [tQgQ, tQsQ] = tma_partition(tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tKgK, tKsK] = tma_partition(tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVgV, tVsV] = tma_partition(tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

  shared.q_full.arrive_and_expect_tx(Traits::kBytesQ);
  copy(tma_q.with(reinterpret_cast<uint64_t&>(shared.q_full), 0), tQgQ, tQsQ);
  auto state = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  for (int n_block = b.n_block_end - 1; n_block >= b.n_block_begin; --n_block) {
    pipeline.producer_acquire(state);  // the stage is free; its full barrier expects kBytesKV
    uint64_t* full = pipeline.producer_get_barrier(state);
    copy(tma_k.with(*full, 0), tKgK(_, n_block), tKsK(_, state.index()));
    copy(tma_v.with(*full, 0), tVgV(_, n_block), tVsV(_, state.index()));
    ++state;
  }
}

// Consumers: both warpgroups walk the key blocks of the pipeline and store their 64 output rows each. kRelative: the
// fused relative bias (relative_bias.cuh) is added to alpha S of every valid pair inside the sequence.
template <class Traits, bool kRelative>
__device__ __forceinline__ void sm90_consume(const HstuAttnFwdParams& p, const Sm90Block& b,
                                             typename Traits::SharedStorage& shared,
                                             typename Traits::Pipeline& pipeline) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kConsumerThreads;
  const int tid = threadIdx.x;
  const int m0 = b.m0;
  const SequenceMask& mask = b.mask;

  Tensor sQ = make_tensor(make_smem_ptr(shared.q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v), typename Traits::SmemLayoutVt{});
  const ReachedBits<Traits::kBlockM, kHeadDim, kThreads> reached{shared.reached};
  bool any_reached = false;  // uniform over the consumers: whether `reached` holds bits (cleared on first use)

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);  // registers, filled once Q has arrived
  Tensor tSrK = thr_qk.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_K, stages)
  Tensor tOrVt = thr_pv.partition_fragment_B(sVt);
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(typename Traits::TileS{}));
  Tensor acc_o = partition_fragment_C(mma_pv, typename Traits::TileQ{});
  clear(acc_o);

  // S tile -> P in registers, in the register layout of the P V A operand (the m64nNk16 A fragment holds, in order,
  // the values of two neighbouring n8 column groups of the m64nN accumulator, so the flat orders agree); in a masked
  // tile, V's non-finite entries are zeroed in the stage before any P V reads it (finite.cuh).
  const RelativeBiasRows bias_rows(p.relative_bias, b.start, b.head);  // read only with kRelative
  auto scores_to_p = [&](int n_block, int stage, auto const& acc_s, auto& tOrP) {
    const int n0 = n_block * kBlockN;
    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN);  // false for tiles reaching past the end
    with_tile_mask(all_valid, [&](auto unmasked) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int query = m0 + get<0>(tScS(i));
        const int key = n0 + get<1>(tScS(i));
        const bool valid = decltype(unmasked)::value || mask.valid(query, key);
        float score = acc_s(i) * p.alpha;
        if constexpr (kRelative) {
          // All-valid tiles may hold rows past the sequence end (valid elsewhere implies inside it).
          if (valid && query < b.length) {
            int bucket;
            score += bias_rows.value(query, key, bucket);
          }
        }
        tOrP(i) = static_cast<Elem>(valid ? silu(score) * p.inv_scaling : 0.0f);
      }
    });
    if (!all_valid) {  // uniform over the consumers
      Tensor sVs = sV(_, _, stage);
      const uint64_t bad_rows = non_finite_rows<Elem, kBlockN, kHeadDim, kThreads>(sVs);
      if (consumers_any<kThreads>(bad_rows != 0)) {  // V[n_block] holds inf/nan (rare), maybe another sequence's
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = consumers_or<kThreads>(bad_rows, &shared.non_finite_word);
        reached.mark(sVs, rows, [&](int row, int key) { return mask.valid(m0 + row, n0 + key); });
        consumers_sync<kThreads>();  // every consumer has read the non-finite entries
        zero_non_finite<kBlockN, kHeadDim, kThreads>(sVs);
        cutlass::arch::fence_view_async_shared();  // the zeros are visible to wgmma (async proxy)
        consumers_sync<kThreads>();                // V[n_block] is finite for P V
      }
    }
  };

  // Key blocks from last to first (the producer's order). Each step issues S = Q K^T of the next block and then
  // O += P V of the current one, waits for S only, turns it into P while P V runs, then waits for P V and releases
  // the current stage: the per-element math of one block overlaps the tensor-core work of the other.
  Tensor acc_s = partition_fragment_C(mma_qk, typename Traits::TileS{});
  Tensor tOrP = make_tensor<Elem>(partition_shape_A(mma_pv, typename Traits::TileS{}));
  Tensor tOrP_next = make_tensor<Elem>(partition_shape_A(mma_pv, typename Traits::TileS{}));
  static_assert(decltype(size(tOrP))::value == decltype(size(acc_s))::value, "P fragment vs S accumulator");
  shared.q_full.wait(0);
  auto load_q = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, Elem>{}, mma_qk);
  auto thr_load_q = load_q.get_thread_slice(tid);
  copy(load_q, thr_load_q.partition_S(sQ), thr_load_q.retile_D(tSrQ));
  typename Traits::Pipeline::PipelineState state;  // stage 0, phase 0: the producer's order
  int n_block = b.n_block_end - 1;
  if (n_block >= b.n_block_begin) {
    pipeline.consumer_wait(state);  // K[n_block] and V[n_block] arrived
    wgmma_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), acc_s, /*zero_init=*/true);
    scores_to_p(n_block, state.index(), acc_s, tOrP);
    for (--n_block; n_block >= b.n_block_begin; --n_block) {
      auto next = state;
      ++next;
      pipeline.consumer_wait(next);  // K[n_block] and V[n_block] arrived
      wgmma_batch<true>(mma_qk, tSrQ, tSrK(_, _, _, next.index()), acc_s, /*zero_init=*/true);
      wgmma_batch<true>(mma_pv, tOrP, tOrVt(_, _, _, state.index()), acc_o, /*zero_init=*/false);
      warpgroup_wait<1>();  // S is complete (batches complete in order); P V may still run
      warpgroup_fence_operand(acc_s);
      scores_to_p(n_block, next.index(), acc_s, tOrP_next);
      warpgroup_wait<0>();  // P V is complete: tOrP and the current stage are free
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(tOrP);
      pipeline.consumer_release(state);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrP); ++i) tOrP(i) = tOrP_next(i);
      state = next;
    }
    wgmma_gemm<true>(mma_pv, tOrP, tOrVt(_, _, _, state.index()), acc_o, /*zero_init=*/false);
    pipeline.consumer_release(state);
  }

  // Epilogue: each thread stores its accumulator pairs (two neighbouring columns) of the rows inside the sequence.
  // (reached: the consumers_sync after the last mark() ordered every thread's bits before these reads.)
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(typename Traits::TileQ{}));
  Elem* out = static_cast<Elem*>(p.out) + (b.start + m0) * p.o_row_stride + b.head * p.o_head_stride;
  const Elem nan = Elem(__int_as_float(0x7fc00000));
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); i += 2) {
    const int row = get<0>(tOcO(i));
    const int column = get<1>(tOcO(i));
    if (row >= b.length - m0) continue;
    alignas(4) Elem pair[2] = {static_cast<Elem>(acc_o(i)), static_cast<Elem>(acc_o(i + 1))};
    if (any_reached) {
      if (reached.test(row, column)) pair[0] = nan;
      if (reached.test(row, column + 1)) pair[1] = nan;
    }
    *reinterpret_cast<uint32_t*>(out + row * p.o_row_stride + column) = *reinterpret_cast<const uint32_t*>(pair);
  }
}
#endif

template <class Traits, bool kRelative>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    hstu_attn_fwd_sm90_kernel(const HstuAttnFwdParams p, const __grid_constant__ typename Traits::TmaQ tma_q,
                              const __grid_constant__ typename Traits::TmaKV tma_k,
                              const __grid_constant__ typename Traits::TmaKV tma_v) {
#if HSTU_ATTN_SM90_DEVICE
  using Pipeline = typename Traits::Pipeline;
  Sm90Block block;
  if (!sm90_block<Traits::kBlockM, Traits::kBlockN>(p, block)) return;  // the whole CTA

  extern __shared__ __align__(1024) char smem[];
  auto& shared = *reinterpret_cast<typename Traits::SharedStorage*>(smem);
  if (threadIdx.x == Traits::kConsumerThreads) {  // the producer's leader, the one thread that issues loads
    cute::prefetch_tma_descriptor(tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(tma_v.get_tma_descriptor());
    shared.q_full.init(1);
  }
  const auto params = sm90_pipeline_params<Pipeline, Traits::kConsumerThreads>(Traits::kBytesKV);
  Pipeline pipeline(shared.pipeline, params, Shape<_1, _1, _1>{});  // initializes the barriers
  __syncthreads();  // barrier initialization visible to every thread
  // Warp specialization, written out here: passed as lambdas to a helper, the relative consumer was not inlined (a
  // 384-byte stack frame, every wgmma waited for alone)
  if (threadIdx.x >= Traits::kConsumerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x == Traits::kConsumerThreads) sm90_produce<Traits>(p, block, shared, pipeline, tma_q, tma_k, tma_v);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    sm90_consume<Traits, kRelative>(p, block, shared, pipeline);
  }
#endif
}

// Whether the Hopper forward takes `p`: q, k, v suit TMA and the forward's sm_90a code runs on the current device.
template <class Traits>
bool fwd_sm90_takes(const HstuAttnFwdParams& p) {
  return qkv_suit_tma<typename Traits::Elem>(p) && sm90_code_runs_here(&hstu_attn_fwd_sm90_kernel<Traits, false>);
}

template <class Traits>
cudaError_t launch_fwd_sm90(const HstuAttnFwdParams& p, cudaStream_t stream) {
  using Elem = typename Traits::Elem;
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = has_relative_bias(p.relative_bias) ? &hstu_attn_fwd_sm90_kernel<Traits, true>
                                                   : &hstu_attn_fwd_sm90_kernel<Traits, false>;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  dim3 grid;
  if (error == cudaSuccess) error = sm90_grid(p.max_seq_len, Traits::kBlockM, p.num_sequences, p.num_heads, &grid);
  if (error != cudaSuccess || grid.x == 0 || grid.y == 0) return error;
  auto tma = [&](const void* base, int64_t row_stride, int64_t head_stride, auto smem_layout, auto tile) {
    const auto view = jagged_tma_view<Elem, Traits::kHeadDim>(base, p.num_tokens, p.num_heads, row_stride, head_stride);
    return make_tma_copy(SM90_TMA_LOAD{}, view, smem_layout, tile, _1{});
  };
  const typename Traits::TmaQ tma_q =
      tma(p.q, p.q_row_stride, p.q_head_stride, typename Traits::SmemLayoutQ{}, typename Traits::TileQ{});
  const typename Traits::TmaKV tma_k =
      tma(p.k, p.k_row_stride, p.k_head_stride, typename Traits::SmemLayoutKVTile{}, typename Traits::TileKV{});
  const typename Traits::TmaKV tma_v =
      tma(p.v, p.v_row_stride, p.v_head_stride, typename Traits::SmemLayoutKVTile{}, typename Traits::TileKV{});
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(p, tma_q, tma_k, tma_v);
  return cudaGetLastError();
}

}  // namespace hstu_attn
