// Backward of jagged HSTU attention: one CTA owns a kBlockN x D tile of dK and dV for one (sequence, head) and
// walks the query blocks that can attend its keys. Per query block, with warps stacked along the key rows:
//   S^T = K Q^T, dP^T = V dO^T                      (fp32 accumulators, [kBlockN, kBlockM])
//   P^T = SiLU(X) / scaling, dS^T = dP^T * alpha / scaling * SiLU'(X), X = alpha S^T + bias^T  (0 where invalid)
//   dV += P^T dO, dK += dS^T Q                       (P^T and dS^T straight from the accumulators)
//   dQ  = dS K  through shared memory, added with fp32 atomics into dq_accum (the caller casts it), or, for a
//         deterministic dQ (p.dq_semaphore), in a fixed order of key blocks with plain loads and stores (DqTurns)
// Rows past the sequence end are zero-filled in shared memory, so they add nothing, and are never stored.
// With a rab (kHasRab), each element of the S^T accumulators loads its rab entry from global memory as it is turned
// into P^T and dS^T, after the two products (the backward has no registers to spare for a rab fragment), and rab's
// gradient dS / alpha of every valid pair is stored (per head) or added with fp32 atomics (rab shared by the heads)
// right there: no extra shared memory. With the fused relative bias (kRelative, relative_bias.cuh), each valid pair's
// bias is computed there from the tables and timestamps (a rab given beside it read as above), and its dS is summed in
// shared memory per relative distance (per tile) and per time bucket (per CTA, after a shuffle sum over the lanes of a
// warp that share a bucket), then added into the fp32 table gradients with global atomics.
// Masked pairs are selected out (never multiplied by the mask). In masked tiles a non-finite operand entry must not
// meet an invalid pair's zero weight either (finite.cuh), as in hstu_attn.reference and the Triton kernels: such q and
// dO entries are zeroed in shared memory after S^T and dP^T used them, before dK += dS^T Q and dV += P^T dO; the dV
// entries that a valid pair links to a non-finite dO entry are stored NaN; dQ = dS K takes non-finite K entries as 0.
// A valid pair with a non-finite q, k, v or dO entry already has a NaN S^T or dP^T, so its dS^T (and P^T) are NaN.
#pragma once

#include <cuda_runtime.h>

#include "dq_turns.cuh"
#include "fwd_kernel.cuh"

namespace hstu_attn {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Elem_>
struct BwdTraits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // key rows per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0 && kBlockM % 64 == 0, "64-element shared-memory rows");
  static_assert(kBlockN % (16 * kNWarps) == 0, "warps stacked along the key rows");
  static_assert(kNWarps % 2 == 0 && kBlockM % (8 * kNWarps) == 0, "dQ tile shape vs MMA shape");

  using MmaOp = typename FwdTraits<kHeadDim, 16 * kNWarps, 16, kNWarps, Elem>::MmaOp;
  // S^T, dP^T, dK, dV: warps along the key rows (M mode of these products).
  using TiledMmaKV = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;
  // dQ = dS K: (kNWarps / 2) x 2 warps over [kBlockM, D].
  using TiledMmaQ =
      TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kNWarps / 2>, _2, _1>>, Tile<Int<8 * kNWarps>, _32, _16>>;

  using SmemAtom = typename FwdTraits<64, 64, 64, 4, Elem>::SmemAtom;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutdSt = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kBlockM>>{}));
  // Transposed views: the same bytes, coordinates swapped.
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutdS =
      decltype(composition(SmemLayoutdSt{}, make_layout(Shape<Int<kBlockM>, Int<kBlockN>>{}, GenRowMajor{})));

  using SmemLoad = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using SmemLoadTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
  using SmemStore = Copy_Atom<UniversalCopy<uint32_t>, Elem>;

  static constexpr int kThreadsPerRow = 8;  // 16-byte vectors, 8 threads per 64-element row
  using GmemThreads = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{}, GmemThreads{},
                                            Layout<Shape<_1, _8>>{}));

  // sQ, sdO [kBlockM, D]; sK, sV [kBlockN, D]; sdS^T [kBlockN, kBlockM]. Then, for finite.cuh: the bitmap of dV
  // entries marked NaN [kBlockN, D] and one 64-bit word for cta_or.
  static constexpr int kSmemTileBytes = (2 * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + kBlockN * kBlockM) *
                                        int(sizeof(Elem));
  static constexpr int kSmemReachedBytes = kBlockN * kHeadDim / 8;
  static constexpr int kSmemBytes = kSmemTileBytes + kSmemReachedBytes + 16;
};

// Writes rab's gradient `value` of one valid pair at `offset` of drab: a store in the input dtype (drab per head) or
// an fp32 atomic add (drab shared by the heads).
template <typename Elem>
__device__ __forceinline__ void write_rab_gradient(void* drab, bool atomic, int64_t offset, float value) {
  if (atomic) {
    atomicAdd(static_cast<float*>(drab) + offset, value);
  } else {
    static_cast<Elem*>(drab)[offset] = static_cast<Elem>(value);
  }
}

// Stores a [rows, D] fp32 accumulator tile of `mma` as Elem to global memory, rows at or past `rows_left` skipped;
// with `nan_bits`, the entries whose bit is set are stored as NaN.
template <typename Elem, class Acc, class Coords, class Bits>
__device__ __forceinline__ void store_rows(Acc const& acc, Coords const& coords, Elem* base, int64_t row_stride,
                                           int rows_left, Bits const* nan_bits) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int row = get<0>(coords(i));
    const int column = get<1>(coords(i));
    float value = acc(i);
    if (nan_bits != nullptr && nan_bits->test(row, column)) value = __int_as_float(0x7fc00000);
    if (row < rows_left) base[row * row_stride + column] = static_cast<Elem>(value);
  }
}

template <class Traits, int kBias>
__global__ void __launch_bounds__(Traits::kNThreads, 1) hstu_attn_bwd_kernel(const HstuAttnBwdParams p) {
  using Elem = typename Traits::Elem;
  constexpr bool kHasRab = kBias == kRabBias;
  constexpr bool kRelative = kBias == kRelativeBias;  // fused relative bias, and rab if given
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

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
  const bool causal_start = mask.causal && mask.contextual == 0;  // every valid pair has query >= key
  const int m_block_begin = first_m_block<kBlockM, kBlockN>(n_block, causal_start);
  const int m_block_end = (length + kBlockM - 1) / kBlockM;
  const float scale = p.alpha * p.inv_scaling;
  const DqTurns<kBlockM, kBlockN> dq_turns{
      p.dq_semaphore == nullptr ? nullptr
                                : p.dq_semaphore + (int64_t(sequence) * p.num_heads + head) * p.dq_semaphore_stride,
      n_block, (length - 1) / kBlockN, causal_start};
  const Elem* rab = nullptr;
  void* drab = nullptr;  // offset to this (sequence, head) in elements of its type
  if constexpr (kHasRab || kRelative) {
    if (kHasRab || p.rab != nullptr) {
      rab = static_cast<const Elem*>(p.rab) + sequence * p.rab_batch_stride + head * p.rab_head_stride;
    }
    if (p.drab != nullptr) {
      const int64_t offset = sequence * p.drab_batch_stride + head * p.drab_head_stride;
      drab = p.drab_atomic ? static_cast<void*>(static_cast<float*>(p.drab) + offset)
                           : static_cast<void*>(static_cast<Elem*>(p.drab) + offset);
    }
  }

  auto tile_q = Shape<Int<kBlockM>, Int<kHeadDim>>{};
  auto tile_kv = Shape<Int<kBlockN>, Int<kHeadDim>>{};
  auto sequence_tensor = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    const Elem* ptr = static_cast<const Elem*>(base) + start * row_stride + head * head_stride;
    return make_tensor(make_gmem_ptr(ptr), make_shape(length, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor gQ = local_tile(sequence_tensor(p.q, p.q_row_stride, p.q_head_stride), tile_q, make_coord(_, 0));
  Tensor gdO = local_tile(sequence_tensor(p.dout, p.do_row_stride, p.do_head_stride), tile_q, make_coord(_, 0));
  Tensor gK = local_tile(sequence_tensor(p.k, p.k_row_stride, p.k_head_stride), tile_kv, make_coord(n_block, 0));
  Tensor gV = local_tile(sequence_tensor(p.v, p.v_row_stride, p.v_head_stride), tile_kv, make_coord(n_block, 0));

  extern __shared__ __align__(128) char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sdSt = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutdSt{});
  Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQt{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKt{});
  Tensor sdS = make_tensor(sdSt.data(), typename Traits::SmemLayoutdS{});
  const ReachedBits<kBlockN, kHeadDim, kNThreads> reached{reinterpret_cast<uint32_t*>(smem + Traits::kSmemTileBytes)};
  static_assert(decltype(reached)::kBytes == Traits::kSmemReachedBytes, "shared-memory plan");
  auto* non_finite_word =
      reinterpret_cast<unsigned long long*>(smem + Traits::kSmemTileBytes + Traits::kSmemReachedBytes);
  bool any_reached = false;  // CTA-uniform: whether `reached` holds bits (cleared on first use)
  int k_non_finite = -1;     // CTA-uniform: whether sK holds inf/nan; -1 = not scanned yet (masked tiles ask)

  const int tid = threadIdx.x;
  // With kRelative, the shared sums of the table gradients, zeroed here (the first tile's barrier orders that
  // before its adds); an unused int otherwise.
  const auto bias_grads = [&] {
    if constexpr (kRelative) {
      return RelativeBiasGradients<kBlockM, kBlockN, kNThreads>(reinterpret_cast<float*>(smem + Traits::kSmemBytes),
                                                                p, head, tid);
    } else {
      return 0;
    }
  }();
  typename Traits::GmemLoad gmem_load;
  auto gmem_thr = gmem_load.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D, m_blocks)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(tile_q));
  Tensor tKcK = gmem_thr.partition_S(make_identity_tensor(tile_kv));

  // K and V of this CTA, once.
  Tensor tKgK = gmem_thr.partition_S(gK);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  load_rows(gmem_load, tKgK, tKsK, tKcK, length - n0);
  load_rows(gmem_load, tVgV, tVsV, tKcK, length - n0);
  cp_async_fence();

  typename Traits::TiledMmaKV mma;
  auto thr_mma = mma.get_thread_slice(tid);
  auto copy_a = make_tiled_copy_A(typename Traits::SmemLoad{}, mma);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemLoad{}, mma);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);
  Tensor tSrV = thr_mma.partition_fragment_A(sV);
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ);
  Tensor tSrdO = thr_mma.partition_fragment_B(sdO);
  Tensor tKVrQt = thr_mma.partition_fragment_B(sQt);
  Tensor tKVrdOt = thr_mma.partition_fragment_B(sdOt);
  Tensor tSsK = copy_a.get_thread_slice(tid).partition_S(sK);
  Tensor tSsV = copy_a.get_thread_slice(tid).partition_S(sV);
  Tensor tSsQ = copy_b.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsdO = copy_b.get_thread_slice(tid).partition_S(sdO);
  Tensor tKVsQt = copy_bt.get_thread_slice(tid).partition_S(sQt);
  Tensor tKVsdOt = copy_bt.get_thread_slice(tid).partition_S(sdOt);
  auto store_ds = make_tiled_copy_C(typename Traits::SmemStore{}, mma);
  Tensor tdSsdSt = store_ds.get_thread_slice(tid).partition_D(sdSt);

  typename Traits::TiledMmaQ mma_q;
  auto thr_mma_q = mma_q.get_thread_slice(tid);
  auto copy_q_at = make_tiled_copy_A(typename Traits::SmemLoadTransposed{}, mma_q);
  auto copy_q_bt = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma_q);
  Tensor tQrdS = thr_mma_q.partition_fragment_A(sdS);
  Tensor tQrKt = thr_mma_q.partition_fragment_B(sKt);
  Tensor tQsdS = copy_q_at.get_thread_slice(tid).partition_S(sdS);
  Tensor tQsKt = copy_q_bt.get_thread_slice(tid).partition_S(sKt);
  Tensor tQcdQ = thr_mma_q.partition_C(make_identity_tensor(tile_q));

  Tensor acc_dk = partition_fragment_C(mma, tile_kv);
  Tensor acc_dv = partition_fragment_C(mma, tile_kv);
  clear(acc_dk);
  clear(acc_dv);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));

  for (int m_block = m_block_begin; m_block < m_block_end; ++m_block) {
    const int m0 = m_block * kBlockM;
    if (n0 >= mask.column_end(m0, kBlockM) || n0 + kBlockN <= mask.column_begin(m0)) {  // CTA-uniform
      if (dq_turns.counters != nullptr) {
        dq_turns.wait(m_block, tid);
        dq_turns.pass(m_block, tid);
      }
      continue;
    }
    __syncthreads();  // every warp is done with the previous sQ, sdO and sdS^T
    load_rows(gmem_load, tQgQ(_, _, _, m_block), tQsQ, tQcQ, length - m0);
    load_rows(gmem_load, tdOgdO(_, _, _, m_block), tdOsdO, tQcQ, length - m0);
    cp_async_fence();
    cp_async_wait<0>();
    __syncthreads();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});  // S^T
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kBlockM>>{});  // dP^T
    clear(acc_s);
    clear(acc_dp);
    gemm_smem_smem(acc_s, tSrK, tSrQ, tSsK, tSsQ, mma, copy_a, copy_b);
    gemm_smem_smem(acc_dp, tSrV, tSrdO, tSsV, tSsdO, mma, copy_a, copy_b);

    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN);
    with_tile_mask(all_valid, [&](auto unmasked) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const int query = m0 + get<1>(tScS(i));
        const int key = n0 + get<0>(tScS(i));
        const bool valid = decltype(unmasked)::value || mask.valid(query, key);
        float x = acc_s(i) * p.alpha;
        if constexpr (kHasRab) {
          if (query < length && key < length) x += static_cast<float>(rab[query * p.rab_row_stride + key]);
          const float ds = valid ? acc_dp(i) * p.inv_scaling * silu_derivative(x) : 0.0f;  // d rab
          // All-valid tiles may hold rows past the sequence end (valid elsewhere implies inside it).
          if (drab != nullptr && valid && query < length) {
            write_rab_gradient<Elem>(drab, p.drab_atomic, query * p.drab_row_stride + key, ds);
          }
          acc_dp(i) = ds * p.alpha;  // dS^T
        } else if constexpr (kRelative) {
          // All-valid tiles may hold rows past the sequence end (valid elsewhere implies inside it).
          const bool inside = valid && query < length;
          int bucket = -1;  // set by value() when there is a time table
          if (inside) {
            x += RelativeBiasRows(p.relative_bias, start, head).value(query, key, bucket);
            if (rab != nullptr) x += static_cast<float>(rab[query * p.rab_row_stride + key]);
          }
          const float ds = inside ? acc_dp(i) * p.inv_scaling * silu_derivative(x) : 0.0f;  // d bias
          if (inside) {
            if (drab != nullptr) write_rab_gradient<Elem>(drab, p.drab_atomic, query * p.drab_row_stride + key, ds);
            bias_grads.add_position(query, key, m0, n0, ds);
          }
          bias_grads.add_time(inside ? bucket : -1, ds);  // warp-collective
          acc_dp(i) = ds * p.alpha;  // dS^T
        } else {
          acc_dp(i) = valid ? acc_dp(i) * scale * silu_derivative(x) : 0.0f;  // dS^T
        }
        acc_s(i) = valid ? silu(x) * p.inv_scaling : 0.0f;  // P^T
      }
    });
    Tensor rPt = converted<Elem>(acc_s);
    Tensor rdSt = converted<Elem>(acc_dp);
    if (!all_valid) {  // CTA-uniform
      if (k_non_finite < 0) {
        k_non_finite = __syncthreads_or(tile_non_finite<Elem, kBlockN, kHeadDim, kNThreads>(sK)) != 0 ? 1 : 0;
      }
      const uint64_t bad_do_rows = non_finite_rows<Elem, kBlockM, kHeadDim, kNThreads>(sdO);
      const bool bad_q = tile_non_finite<Elem, kBlockM, kHeadDim, kNThreads>(sQ);
      // This barrier also orders every warp's S^T and dP^T reads of sQ and sdO before the zeroing below.
      if (__syncthreads_or(bad_do_rows != 0 || bad_q)) {  // sQ or sdO holds inf/nan (rare)
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = cta_or(bad_do_rows, non_finite_word);
        reached.mark(sdO, rows, [&](int key_row, int query_row) { return mask.valid(m0 + query_row, n0 + key_row); });
        __syncthreads();  // every thread has read the non-finite entries
        zero_non_finite<kBlockM, kHeadDim, kNThreads>(sQ);
        zero_non_finite<kBlockM, kHeadDim, kNThreads>(sdO);
        __syncthreads();  // Q and dO are finite for dK += dS^T Q and dV += P^T dO
      }
    }
    gemm_reg_smem(acc_dv, make_tensor(rPt.data(), accumulator_as_operand_a(rPt.layout())), tKVrdOt, tKVsdOt, mma,
                  copy_bt);
    gemm_reg_smem(acc_dk, make_tensor(rdSt.data(), accumulator_as_operand_a(rdSt.layout())), tKVrQt, tKVsQt, mma,
                  copy_bt);

    copy(store_ds, retiled(store_ds, rdSt), tdSsdSt);
    __syncthreads();  // dS^T in shared memory (and this tile's bias-gradient sums)
    if constexpr (kRelative) bias_grads.flush_tile(m0, n0, tid);
    Tensor acc_dq = partition_fragment_C(mma_q, tile_q);
    clear(acc_dq);
    if (!all_valid && k_non_finite > 0) {  // rows that may not attend a non-finite K entry take it as 0
      gemm_smem_smem<true>(acc_dq, tQrdS, tQrKt, tQsdS, tQsKt, mma_q, copy_q_at, copy_q_bt);
    } else {
      gemm_smem_smem(acc_dq, tQrdS, tQrKt, tQsdS, tQsKt, mma_q, copy_q_at, copy_q_bt);
    }
    float* dq = p.dq_accum + (start + m0) * p.dq_row_stride + head * p.dq_head_stride;
    if (dq_turns.counters == nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) {
        const int row = get<0>(tQcdQ(i));
        if (row < length - m0) atomicAdd(dq + row * p.dq_row_stride + get<1>(tQcdQ(i)), acc_dq(i));
      }
    } else {  // in turn, through L2 (__ldcg/__stcg: no stale L1 line of another CTA's sum)
      dq_turns.wait(m_block, tid);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); ++i) {
        const int row = get<0>(tQcdQ(i));
        float* entry = dq + row * p.dq_row_stride + get<1>(tQcdQ(i));
        if (row < length - m0) __stcg(entry, __ldcg(entry) + acc_dq(i));
      }
      dq_turns.pass(m_block, tid);
    }
  }

  Tensor tKVcKV = thr_mma.partition_C(make_identity_tensor(tile_kv));
  Elem* dk = static_cast<Elem*>(p.dk) + (start + n0) * p.dk_row_stride + head * p.dk_head_stride;
  Elem* dv = static_cast<Elem*>(p.dv) + (start + n0) * p.dv_row_stride + head * p.dv_head_stride;
  // The barrier after reached.mark() ordered the bits of every thread before these reads.
  store_rows(acc_dk, tKVcKV, dk, p.dk_row_stride, length - n0, static_cast<decltype(reached) const*>(nullptr));
  store_rows(acc_dv, tKVcKV, dv, p.dv_row_stride, length - n0, any_reached ? &reached : nullptr);
  if constexpr (kRelative) {
    __syncthreads();  // every thread's time-bucket sums
    bias_grads.flush_time(tid);
  }
}

template <class Traits, int kBias>
cudaError_t launch_bwd_kernel(const HstuAttnBwdParams& p, cudaStream_t stream) {
  int smem_bytes = Traits::kSmemBytes;
  if constexpr (kBias == kRelativeBias) {
    smem_bytes += RelativeBiasGradients<Traits::kBlockM, Traits::kBlockN, Traits::kNThreads>::shared_bytes(
        p.relative_bias.num_time_buckets);
  }
  auto kernel = &hstu_attn_bwd_kernel<Traits, kBias>;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (error != cudaSuccess) return error;
  }
  const int64_t num_n_blocks = (int64_t(p.max_seq_len) + Traits::kBlockN - 1) / Traits::kBlockN;
  const int64_t blocks = num_n_blocks * p.num_sequences;
  if (blocks == 0 || p.num_heads == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || p.num_heads > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks), unsigned(p.num_heads)), Traits::kNThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// The backward without bias, with rab, or with the fused relative bias (and rab if given): separate instantiations,
// so the kernels without the fused bias are unchanged by it.
template <class Traits>
cudaError_t launch_bwd(const HstuAttnBwdParams& p, cudaStream_t stream) {
  if (has_relative_bias(p.relative_bias)) return launch_bwd_kernel<Traits, kRelativeBias>(p, stream);
  if (p.rab != nullptr) return launch_bwd_kernel<Traits, kRabBias>(p, stream);
  return launch_bwd_kernel<Traits, kNoBias>(p, stream);
}

}  // namespace hstu_attn
