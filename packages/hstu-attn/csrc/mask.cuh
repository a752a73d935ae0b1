// The valid-pair rule of hstu_attn.reference, for one sequence, evaluated per score element.
#pragma once

#include <type_traits>

namespace hstu_attn {

struct SequenceMask {
  int length;          // n
  int history;         // u = n - num_targets
  int contextual;      // c
  int window;          // w, 0 = unlimited
  bool causal;

  __device__ __forceinline__ bool valid(int i, int j) const {
    if (i >= length || j >= length) return false;
    const bool diagonal = i == j;
    const bool history_column = j < history;
    const int row_position = min(i, history);
    bool attends = diagonal || (history_column && (!causal || j < row_position));
    if (window > 0) attends = attends && (diagonal || abs(row_position - j) <= window);
    if (contextual > 0) attends = attends || (history_column && (i < contextual || j < contextual));
    return attends;
  }

  // Key columns [begin, end) that can hold a valid pair for query rows [m0, m0 + rows).
  __device__ __forceinline__ int column_begin(int m0) const {
    if (window > 0 && contextual == 0) return max(0, min(m0, history) - window);
    return 0;
  }
  __device__ __forceinline__ int column_end(int m0, int rows) const {
    int end = min(m0 + rows, length);  // the diagonal
    if (!causal || m0 < contextual) end = max(end, history);
    return min(end, length);
  }

  // Whether every pair of a tile (rows from m0, columns [n0, n0 + cols)) is valid, so the tile skips the mask.
  // Rows past the sequence end are never stored, so they do not matter here.
  __device__ __forceinline__ bool tile_all_valid(int m0, int n0, int cols) const {
    const int last_column = n0 + cols - 1;
    return window == 0 && last_column < history && (!causal || last_column < m0);
  }
};

// The SiLU of every score element, so each costs two MUFU ops (ex2.approx, rcp.approx) and no branch: __frcp_rn's
// IEEE reciprocal adds a refinement and a slow-path branch per element, which dominated the tile's elementwise work.
// rcp.approx's relative error (2^-23) is far below the bf16/fp16 rounding of P. exp(-x) = inf gives sigmoid 0.
__device__ __forceinline__ float approx_reciprocal(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
// 2^x with ex2.approx.ftz (no denormal rescaling, which __expf adds per element); 2^(+inf) = inf.
__device__ __forceinline__ float approx_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float sigmoid(float x) {
  constexpr float kLog2e = 1.4426950408889634f;
  return approx_reciprocal(1.0f + approx_exp2(-kLog2e * x));
}
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
// d SiLU(x) / dx = s (1 + x (1 - s)), s = sigmoid(x).
__device__ __forceinline__ float silu_derivative(float x) {
  const float s = sigmoid(x);
  return s * (1.0f + x * (1.0f - s));
}

// Calls body(std::true_type) for a tile whose pairs are all valid and body(std::false_type) otherwise, so the
// elementwise loop of an unmasked tile compiles without the per-element mask (no branch per element).
template <class Body>
__device__ __forceinline__ void with_tile_mask(bool all_valid, Body&& body) {
  if (all_valid) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

}  // namespace hstu_attn
