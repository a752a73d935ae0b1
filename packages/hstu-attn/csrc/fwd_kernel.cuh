// Forward of jagged HSTU attention: one CTA computes a kBlockM x D output tile of one (sequence, head).
//
// Per key tile: S = Q K^T (fp32), P = SiLU(alpha S + rab) / scaling where the pair is valid, 0 where it is not
// (selected, never multiplied), O += P V with P taken straight from the S accumulators. With a rab (kHasRab), each
// thread loads the rab entries at its own accumulator coordinates straight from global memory into registers, issued
// before Q K^T so that the loads overlap it; entries past the sequence end are not read. With the fused relative bias
// (relative_bias.cuh), each valid pair's bias is computed from the tables and timestamps as its score is turned into
// P, after Q K^T, and a rab given beside it is read there too. K/V tiles are single-buffered:
// V[j] loads while Q K[j]^T runs, K[j-1] loads while P V[j] runs. Rows past the sequence end are zero-filled in
// shared memory and never stored. Masked tiles keep a non-finite V entry away from the rows that may not attend its
// token (finite.cuh): they zero it before P V, and the output entries that a valid pair links to it are stored NaN.
#pragma once

#include <cuda_runtime.h>

#include "finite.cuh"
#include "fwd_traits.cuh"
#include "hstu_attn_cutlass.h"
#include "mask.cuh"
#include "relative_bias.cuh"

namespace hstu_attn {

__device__ __forceinline__ int64_t load_index(const void* ptr, bool is_int64, int i) {
  return is_int64 ? static_cast<const int64_t*>(ptr)[i] : int64_t(static_cast<const int32_t*>(ptr)[i]);
}

// Global -> shared copy of one tile whose rows at or past `rows_left` are zero-filled instead of read.
template <class TiledCopy, class Src, class Dst, class Coord>
__device__ __forceinline__ void load_rows(TiledCopy const& tiled_copy, Src const& src, Dst& dst, Coord const& coord,
                                          int rows_left) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    if (get<0>(coord(0, m, 0)) < rows_left) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(dst); ++k) copy(tiled_copy, src(_, m, k), dst(_, m, k));
    } else {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(dst); ++k) clear(dst(_, m, k));
    }
  }
}

// The rab entries of one score tile at this thread's accumulator coordinates: fragment(i) = rab[query, key] with
// (query, key) = (query0 + row, key0 + column) of coords(i). Entries whose query or key is at or past `length` are 0
// and not read.
template <class Fragment, class Coords, typename Elem>
__device__ __forceinline__ void load_rab(Fragment& fragment, Coords const& coords, const Elem* rab, int64_t row_stride,
                                         int query0, int key0, int length) {
  CUTE_UNROLL
  for (int i = 0; i < size(fragment); ++i) {
    const int query = query0 + get<0>(coords(i));
    const int key = key0 + get<1>(coords(i));
    fragment(i) = (query < length && key < length) ? rab[query * row_stride + key] : Elem(0.0f);
  }
}

template <class TiledCopy, class Tensor_>
__device__ __forceinline__ auto retiled(TiledCopy const&, Tensor_& registers) {
  return make_tensor(registers.data(), TiledCopy::retile(registers.layout()));
}

// acc += A B^T over the K mode, A and B fragments loaded from shared memory one k-block ahead of the MMAs. With
// kZeroNonFiniteB, inf/nan entries of B enter the product as 0 (shared memory keeps them).
template <bool kZeroNonFiniteB = false, class Acc, class RegA, class RegB, class SmemA, class SmemB, class Mma,
          class CopyA, class CopyB>
__device__ __forceinline__ void gemm_smem_smem(Acc& acc, RegA& reg_a, RegB& reg_b, SmemA const& smem_a,
                                               SmemB const& smem_b, Mma const& mma, CopyA const& copy_a,
                                               CopyB const& copy_b) {
  auto view_a = retiled(copy_a, reg_a);
  auto view_b = retiled(copy_b, reg_b);
  copy(copy_a, smem_a(_, _, _0{}), view_a(_, _, _0{}));
  copy(copy_b, smem_b(_, _, _0{}), view_b(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(reg_a); ++k) {
    if (k + 1 < size<2>(reg_a)) {
      copy(copy_a, smem_a(_, _, k + 1), view_a(_, _, k + 1));
      copy(copy_b, smem_b(_, _, k + 1), view_b(_, _, k + 1));
    }
    if constexpr (kZeroNonFiniteB) zero_non_finite_fragment(reg_b(_, _, k));
    gemm(mma, reg_a(_, _, k), reg_b(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers.
template <class Acc, class RegA, class RegB, class SmemB, class Mma, class CopyB>
__device__ __forceinline__ void gemm_reg_smem(Acc& acc, RegA const& reg_a, RegB& reg_b, SmemB const& smem_b,
                                              Mma const& mma, CopyB const& copy_b) {
  auto view_b = retiled(copy_b, reg_b);
  copy(copy_b, smem_b(_, _, _0{}), view_b(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(reg_a); ++k) {
    if (k + 1 < size<2>(reg_a)) copy(copy_b, smem_b(_, _, k + 1), view_b(_, _, k + 1));
    gemm(mma, reg_a(_, _, k), reg_b(_, _, k), acc);
  }
}

// An m16n8 accumulator layout ((2,2), M, N) seen as the m16n8k16 A-operand layout (((2,2),2), M, N/2): two
// neighbouring n8 accumulator tiles hold exactly the registers of one k16 A fragment.
template <class Layout>
__device__ __forceinline__ auto accumulator_as_operand_a(Layout const& layout) {
  auto split = logical_divide(layout, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

template <typename To, class Engine, class Layout>
__device__ __forceinline__ auto converted(Tensor<Engine, Layout> const& from) {
  Tensor to = make_tensor<To>(from.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(from); ++i) to(i) = static_cast<To>(from(i));
  return to;
}

template <class Traits, int kBias>
__global__ void __launch_bounds__(Traits::kNThreads, 1) hstu_attn_fwd_kernel(const HstuAttnFwdParams p) {
  using Elem = typename Traits::Elem;
  constexpr bool kHasRab = kBias == kRabBias;  // rab prefetched into registers
  constexpr bool kRelative = kBias == kRelativeBias;  // fused relative bias, and rab read per element if given
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
  const Elem* rab = nullptr;
  if constexpr (kHasRab) {
    rab = static_cast<const Elem*>(p.rab) + sequence * p.rab_batch_stride + head * p.rab_head_stride;
  }
  if constexpr (kRelative) {
    if (p.rab != nullptr) {
      rab = static_cast<const Elem*>(p.rab) + sequence * p.rab_batch_stride + head * p.rab_head_stride;
    }
  }

  auto tile_q = Shape<Int<kBlockM>, Int<kHeadDim>>{};
  auto tile_kv = Shape<Int<kBlockN>, Int<kHeadDim>>{};
  auto sequence_tensor = [&](const void* base, int64_t row_stride, int64_t head_stride) {
    const Elem* ptr = static_cast<const Elem*>(base) + start * row_stride + head * head_stride;
    return make_tensor(make_gmem_ptr(ptr), make_shape(length, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor gQ = local_tile(sequence_tensor(p.q, p.q_row_stride, p.q_head_stride), tile_q, make_coord(m_block, 0));
  Tensor gK = local_tile(sequence_tensor(p.k, p.k_row_stride, p.k_head_stride), tile_kv, make_coord(_, 0));
  Tensor gV = local_tile(sequence_tensor(p.v, p.v_row_stride, p.v_head_stride), tile_kv, make_coord(_, 0));
  Elem* out_ptr = static_cast<Elem*>(p.out) + start * p.o_row_stride + head * p.o_head_stride;
  Tensor gO = local_tile(make_tensor(make_gmem_ptr(out_ptr), make_shape(length, Int<kHeadDim>{}),
                                     make_stride(p.o_row_stride, _1{})),
                         tile_q, make_coord(m_block, 0));

  extern __shared__ __align__(128) char smem[];
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

  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVt);
  auto copy_q = make_tiled_copy_A(typename Traits::SmemLoad{}, mma);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemLoad{}, mma);
  auto copy_vt = make_tiled_copy_B(typename Traits::SmemLoadTransposed{}, mma);
  Tensor tSsQ = copy_q.get_thread_slice(tid).partition_S(sQ);
  Tensor tSsK = copy_k.get_thread_slice(tid).partition_S(sK);
  Tensor tOsVt = copy_vt.get_thread_slice(tid).partition_S(sVt);

  Tensor acc_o = partition_fragment_C(mma, tile_q);
  clear(acc_o);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));

  load_rows(gmem_load, tQgQ, tQsQ, tQcQ, length - m0);
  if (n_block_end > n_block_begin) {
    const int last = n_block_end - 1;
    load_rows(gmem_load, tKgK(_, _, _, last), tKsK, tKcK, length - last * kBlockN);
  }
  cp_async_fence();

  for (int n_block = n_block_end - 1; n_block >= n_block_begin; --n_block) {
    const int n0 = n_block * kBlockN;
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n_block] (and Q) arrived; every warp is done with V[n_block + 1]
    load_rows(gmem_load, tVgV(_, _, _, n_block), tVsV, tKcK, length - n0);
    cp_async_fence();
    Tensor rRab = make_tensor<Elem>(acc_s.layout());  // used only with kHasRab
    if constexpr (kHasRab) load_rab(rRab, tScS, rab, p.rab_row_stride, m0, n0, length);

    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, copy_q, copy_k);

    cp_async_wait<0>();
    __syncthreads();  // V[n_block] arrived; every warp is done with K[n_block]
    if (n_block > n_block_begin) {
      load_rows(gmem_load, tKgK(_, _, _, n_block - 1), tKsK, tKcK, length - (n0 - kBlockN));
      cp_async_fence();
    }

    const bool all_valid = mask.tile_all_valid(m0, n0, kBlockN);
    with_tile_mask(all_valid, [&](auto unmasked) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const bool valid = decltype(unmasked)::value || mask.valid(m0 + get<0>(tScS(i)), n0 + get<1>(tScS(i)));
        float score = acc_s(i) * p.alpha;
        if constexpr (kHasRab) score += static_cast<float>(rRab(i));
        if constexpr (kRelative) {
          const int query = m0 + get<0>(tScS(i));
          const int key = n0 + get<1>(tScS(i));
          // All-valid tiles may hold rows past the sequence end (valid elsewhere implies inside it).
          if (valid && query < length) {
            int bucket;
            score += RelativeBiasRows(p.relative_bias, start, head).value(query, key, bucket);
            if (rab != nullptr) score += static_cast<float>(rab[query * p.rab_row_stride + key]);
          }
        }
        acc_s(i) = valid ? silu(score) * p.inv_scaling : 0.0f;
      }
    });
    Tensor tOrP = converted<Elem>(acc_s);
    if (!all_valid) {  // CTA-uniform
      const uint64_t bad_rows = non_finite_rows<Elem, kBlockN, kHeadDim, kNThreads>(sV);
      if (__syncthreads_or(bad_rows != 0)) {  // V[n_block] holds inf/nan (rare)
        if (!any_reached) reached.clear();
        any_reached = true;
        const uint64_t rows = cta_or(bad_rows, non_finite_word);
        reached.mark(sV, rows, [&](int row, int key) { return mask.valid(m0 + row, n0 + key); });
        __syncthreads();  // every thread has read the non-finite entries
        zero_non_finite<kBlockN, kHeadDim, kNThreads>(sV);
        __syncthreads();  // V[n_block] is finite for P V
      }
    }
    Tensor tOrP_a = make_tensor(tOrP.data(), accumulator_as_operand_a(tOrP.layout()));
    gemm_reg_smem(acc_o, tOrP_a, tOrVt, tOsVt, mma, copy_vt);
  }

  // Epilogue: registers -> shared (Q's buffer) -> 16-byte global stores of the rows inside the sequence.
  Tensor rO = converted<Elem>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto store_o = make_tiled_copy_C(typename Traits::SmemStoreO{}, mma);
  auto store_o_thr = store_o.get_thread_slice(tid);
  Tensor tOsO_mma = store_o_thr.partition_D(sO);
  __syncthreads();
  copy(store_o, retiled(store_o, rO), tOsO_mma);
  __syncthreads();
  typename Traits::GmemStore gmem_store;
  auto gmem_store_thr = gmem_store.get_thread_slice(tid);
  Tensor tOsO = gmem_store_thr.partition_S(sO);
  Tensor tOgO = gmem_store_thr.partition_D(gO);
  Tensor tOcO = gmem_store_thr.partition_D(make_identity_tensor(tile_q));
  Tensor tOrO = make_tensor<Elem>(shape(tOgO));
  copy(gmem_store, tOsO, tOrO);
  if (any_reached) {  // the barrier after reached.mark() ordered the bits of every thread before these reads
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) {
      if (reached.test(get<0>(tOcO(i)), get<1>(tOcO(i)))) tOrO(i) = Elem(__int_as_float(0x7fc00000));
    }
  }
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tOcO(0, m, 0)) < length - m0) copy(gmem_store, tOrO(_, m, _), tOgO(_, m, _));
  }
}

template <class Traits, int kBias>
cudaError_t launch_fwd_kernel(const HstuAttnFwdParams& p, cudaStream_t stream) {
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &hstu_attn_fwd_kernel<Traits, kBias>;
  if (kSmem > 48 * 1024) {
    const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (error != cudaSuccess) return error;
  }
  const int64_t num_m_blocks = (int64_t(p.max_seq_len) + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t blocks = num_m_blocks * p.num_sequences;
  if (blocks == 0 || p.num_heads == 0) return cudaSuccess;
  if (blocks > 0x7fffffff || p.num_heads > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks), unsigned(p.num_heads)), Traits::kNThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

__host__ __device__ inline bool has_relative_bias(const HstuAttnRelativeBias& bias) {
  return bias.position_weights != nullptr || bias.time_weights != nullptr;
}

// The forward without bias, with rab, or with the fused relative bias (and rab if given): separate instantiations, so
// the kernels without the fused bias are unchanged by it.
template <class Traits>
cudaError_t launch_fwd(const HstuAttnFwdParams& p, cudaStream_t stream) {
  if (has_relative_bias(p.relative_bias)) return launch_fwd_kernel<Traits, kRelativeBias>(p, stream);
  if (p.rab != nullptr) return launch_fwd_kernel<Traits, kRabBias>(p, stream);
  return launch_fwd_kernel<Traits, kNoBias>(p, stream);
}

}  // namespace hstu_attn
