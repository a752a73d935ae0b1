// Containment of non-finite values (inf, nan) in masked tiles, with the semantics of hstu_attn.reference
// (_selected_product) and the Triton kernels.
//
// In a product `weights @ x` an invalid pair's zero weight must never multiply an inf/nan entry of x (0 * nan = nan
// would reach a row that may not attend that token). Masked tiles therefore replace the non-finite entries of x by 0
// before the product, and the result entries that a valid pair links to one of them come out NaN. Tiles where every
// pair is valid are left alone: there every such entry is attended, so IEEE arithmetic already gives inf or nan.
//
// Cost: a masked tile scans its shared-memory operand tile (16-byte vectors) and takes one CTA-wide OR. Only a tile
// that holds an inf/nan takes the rare path: a mask of its bad rows through one shared word, reached result entries
// recorded as bits in a shared [rows, D] bitmap (applied when the result is stored, so the accumulator registers are
// not touched inside the main loop; the Triton kernels use a 0/1 product into a second accumulator instead, which
// would not fit these kernels' registers), and the bad entries zeroed in shared memory. The shared-memory loops are
// rolled loops over the CTA's threads, which keeps the register cost of these paths small.
#pragma once

#include <stdint.h>

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace hstu_attn {

// The exponent bits of a 16-bit float type: all of them are set exactly for inf and nan.
template <typename Elem>
struct ExponentBits;
template <>
struct ExponentBits<cutlass::half_t> {
  static constexpr uint32_t value = 0x7C00u;
};
template <>
struct ExponentBits<cutlass::bfloat16_t> {
  static constexpr uint32_t value = 0x7F80u;
};

template <typename Elem>
__device__ __forceinline__ bool non_finite(Elem x) {
  constexpr uint32_t kExp = ExponentBits<Elem>::value;
  return (uint32_t(x.raw()) & kExp) == kExp;
}

// Whether one of the two 16-bit floats packed in `word` is inf or nan.
template <typename Elem>
__device__ __forceinline__ bool pair_non_finite(uint32_t word) {
  constexpr uint32_t kExp = ExponentBits<Elem>::value;
  return (word & kExp) == kExp || (word & (kExp << 16)) == (kExp << 16);
}

// Rows of a shared-memory tile [kRows <= 64, kCols] (a CuTe tensor of Elem, any swizzle that keeps 8-element
// vectors contiguous) that hold an inf or nan among the 16-byte vectors this thread reads: bit r = row r. The CTA's
// threads together read every vector once; the tile must be complete (after the barrier that follows its loads).
template <typename Elem, int kRows, int kCols, int kThreads, class Tile>
__device__ __forceinline__ uint64_t non_finite_rows(Tile const& tile) {
  static_assert(kRows <= 64 && kCols % 8 == 0, "one bit per row");
  constexpr int kVectorsPerRow = kCols / 8;
  uint64_t rows = 0;
#pragma unroll 2
  for (int v = threadIdx.x; v < kRows * kVectorsPerRow; v += kThreads) {
    const int row = v / kVectorsPerRow;
    const uint4 x = *reinterpret_cast<const uint4*>(&tile(row, (v % kVectorsPerRow) * 8));
    if (pair_non_finite<Elem>(x.x) || pair_non_finite<Elem>(x.y) || pair_non_finite<Elem>(x.z) ||
        pair_non_finite<Elem>(x.w)) {
      rows |= uint64_t(1) << row;
    }
  }
  return rows;
}

// Like non_finite_rows for a tile of any number of rows: whether this thread's vectors hold an inf or nan.
template <typename Elem, int kRows, int kCols, int kThreads, class Tile>
__device__ __forceinline__ bool tile_non_finite(Tile const& tile) {
  static_assert(kCols % 8 == 0, "16-byte vectors");
  constexpr int kVectorsPerRow = kCols / 8;
  bool bad = false;
#pragma unroll 2
  for (int v = threadIdx.x; v < kRows * kVectorsPerRow; v += kThreads) {
    const uint4 x = *reinterpret_cast<const uint4*>(&tile(v / kVectorsPerRow, (v % kVectorsPerRow) * 8));
    bad |= pair_non_finite<Elem>(x.x) || pair_non_finite<Elem>(x.y) || pair_non_finite<Elem>(x.z) ||
           pair_non_finite<Elem>(x.w);
  }
  return bad;
}

// Replaces every inf/nan entry of a shared-memory tile [kRows, kCols] by 0 (the CTA's threads share the work).
template <int kRows, int kCols, int kThreads, class Tile>
__device__ __forceinline__ void zero_non_finite(Tile& tile) {
  using Elem = typename Tile::value_type;
#pragma unroll 1
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const int row = i / kCols;
    const int column = i % kCols;
    if (non_finite(tile(row, column))) tile(row, column) = Elem(0.0f);
  }
}

// Replaces every inf/nan entry of a register fragment by 0.
template <class Fragment>
__device__ __forceinline__ void zero_non_finite_fragment(Fragment&& fragment) {
  CUTE_UNROLL
  for (int i = 0; i < cute::size(fragment); ++i) {
    if (non_finite(fragment(i))) fragment(i) = std::remove_reference_t<decltype(fragment(i))>(0.0f);
  }
}

// CTA-wide OR of every thread's `rows` through the shared 64-bit `word`. Every thread of the CTA calls it; the
// caller must pass a barrier after reading the result before it calls again (the next call resets `word`).
__device__ __forceinline__ uint64_t cta_or(uint64_t rows, unsigned long long* word) {
  if (threadIdx.x == 0) *word = 0ull;
  __syncthreads();
  if (rows != 0) atomicOr(word, static_cast<unsigned long long>(rows));
  __syncthreads();
  return *word;
}

// A shared bitmap of the result entries [kRows, kCols] (kCols a multiple of 32) that come out NaN: word
// w = row * kCols / 32 + column / 32, bit column % 32. Thread t owns the words w = t, t + kThreads, ... for clear()
// and mark(), so these need no atomics and no barrier between them; reading bits of other threads needs one.
template <int kRows, int kCols, int kThreads>
struct ReachedBits {
  static_assert(kCols % 32 == 0, "32 columns per word");
  static constexpr int kWordsPerRow = kCols / 32;
  static constexpr int kWords = kRows * kWordsPerRow;
  static constexpr int kBytes = kWords * 4;
  uint32_t* words;

  __device__ __forceinline__ void clear() const {
#pragma unroll 1
    for (int w = threadIdx.x; w < kWords; w += kThreads) words[w] = 0u;
  }

  // Sets the bit of (row, column) when, for a bit b set in `others`, the pair (row, b) is valid (`linked(row, b)`)
  // and operand(b, column) is inf or nan.
  template <class Operand, class Linked>
  __device__ __forceinline__ void mark(Operand const& operand, uint64_t others, Linked const& linked) const {
#pragma unroll 1
    for (int w = threadIdx.x; w < kWords; w += kThreads) {
      const int row = w / kWordsPerRow;
      const int column0 = (w % kWordsPerRow) * 32;
      uint32_t word = words[w];
      uint64_t rest = others;
      while (rest != 0) {
        const int b = __ffsll(static_cast<long long>(rest)) - 1;
        rest &= rest - 1;
        if (!linked(row, b)) continue;
#pragma unroll 1
        for (int c = 0; c < 32; ++c) {
          if (non_finite(operand(b, column0 + c))) word |= 1u << c;
        }
      }
      words[w] = word;
    }
  }

  __device__ __forceinline__ bool test(int row, int column) const {
    return (words[row * kWordsPerRow + column / 32] >> (column % 32)) & 1u;
  }
};

}  // namespace hstu_attn
