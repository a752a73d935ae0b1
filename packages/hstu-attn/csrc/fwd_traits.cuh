// Tile shapes, shared-memory layouts and copy/MMA atoms of the SM80-style forward (mma.sync, cp.async, ldmatrix).
// The same code runs on sm_90 (mma.sync is available there); it is not the Hopper wgmma/TMA design.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cutlass/numeric_types.h>

namespace hstu_attn {

using namespace cute;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Elem_>
struct FwdTraits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "head dims 64, 128, 256");
  static_assert(kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0, "tile shape vs MMA shape");

  using MmaOp = std::conditional_t<std::is_same_v<Elem, cutlass::half_t>, SM80_16x8x16_F32F16F16F32_TN,
                                   SM80_16x8x16_F32BF16BF16F32_TN>;
  // Warps stacked along M: each warp owns kBlockM / kNWarps query rows and the whole key tile.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // 64-element (128-byte) rows, XOR-swizzled so that ldmatrix of 8 rows hits 8 different bank groups.
  static constexpr int kSmemRow = 64;
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{},
                                        Layout<Shape<_8, Int<kSmemRow>>, Stride<Int<kSmemRow>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V read as V^T [D, N] for the P V product: the same bytes, coordinates swapped.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));

  using SmemLoad = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using SmemLoadTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
  using SmemStoreO = Copy_Atom<UniversalCopy<uint32_t>, Elem>;

  // Global <-> shared: 16-byte vectors, 8 threads per 64-element row.
  static constexpr int kThreadsPerRow = kSmemRow / 8;
  using GmemThreads = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Elem>{}, GmemThreads{},
                                            Layout<Shape<_1, _8>>{}));
  using GmemStore = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<uint128_t>, Elem>{}, GmemThreads{},
                                             Layout<Shape<_1, _8>>{}));

  static constexpr int kSmemTileBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Elem));
  // Then, for finite.cuh: the bitmap of output entries marked NaN [kBlockM, kHeadDim], one 64-bit word for cta_or.
  static constexpr int kSmemReachedBytes = kBlockM * kHeadDim / 8;
  static constexpr int kSmemBytes = kSmemTileBytes + kSmemReachedBytes + 16;
};

}  // namespace hstu_attn
