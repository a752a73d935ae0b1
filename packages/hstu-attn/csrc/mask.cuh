// The valid-pair rule of hstu_attn.reference, for one sequence, evaluated per score element.
#pragma once

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

__device__ __forceinline__ float silu(float x) { return x * __frcp_rn(1.0f + __expf(-x)); }

}  // namespace hstu_attn
