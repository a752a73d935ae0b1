// The fused relative bias (HstuAttnRelativeBias) of one (sequence, head), evaluated per score element, and the
// shared-memory sums of its gradient that the backward adds into the fp32 table gradients.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "hstu_attn_cutlass.h"

namespace hstu_attn {

// Kernel variants by bias: none, a materialized rab (prefetched into registers in the forward), or the fused
// relative bias (with an optional rab read per element, as the backward reads rab).
enum BiasKind { kNoBias = 0, kRabBias = 1, kRelativeBias = 2 };

__device__ __forceinline__ int timestamp_bytes(int dtype) {
  switch (dtype) {
    case HSTU_ATTN_TIMESTAMPS_INT32:
    case HSTU_ATTN_TIMESTAMPS_FP32: return 4;
    case HSTU_ATTN_TIMESTAMPS_INT64:
    case HSTU_ATTN_TIMESTAMPS_FP64: return 8;
    default: return 2;
  }
}

// |t_key - t_query| in fp32, the difference taken in the timestamps' type as PyTorch takes it: integers wrap (two's
// complement, and |INT_MIN| stays negative), fp16/bf16 round the fp32 difference to their type.
__device__ __forceinline__ float time_magnitude(const void* timestamps, int dtype, int query, int key) {
  switch (dtype) {
    case HSTU_ATTN_TIMESTAMPS_INT32: {
      const auto* t = static_cast<const uint32_t*>(timestamps);
      const auto delta = int32_t(__ldg(t + key) - __ldg(t + query));
      return float(delta < 0 ? int32_t(0u - uint32_t(delta)) : delta);
    }
    case HSTU_ATTN_TIMESTAMPS_INT64: {
      const auto* t = static_cast<const unsigned long long*>(timestamps);
      const auto delta = static_cast<long long>(__ldg(t + key) - __ldg(t + query));
      return float(delta < 0 ? static_cast<long long>(0ull - static_cast<unsigned long long>(delta)) : delta);
    }
    case HSTU_ATTN_TIMESTAMPS_FP32: {
      const auto* t = static_cast<const float*>(timestamps);
      return fabsf(__ldg(t + key) - __ldg(t + query));
    }
    case HSTU_ATTN_TIMESTAMPS_FP64: {
      const auto* t = static_cast<const double*>(timestamps);
      return float(fabs(__ldg(t + key) - __ldg(t + query)));
    }
    case HSTU_ATTN_TIMESTAMPS_FP16: {
      const auto* t = static_cast<const __half*>(timestamps);
      return fabsf(__half2float(__float2half_rn(__half2float(t[key]) - __half2float(t[query]))));
    }
    default: {  // HSTU_ATTN_TIMESTAMPS_BF16
      const auto* t = static_cast<const __nv_bfloat16*>(timestamps);
      return fabsf(__bfloat162float(__float2bfloat16_rn(__bfloat162float(t[key]) - __bfloat162float(t[query]))));
    }
  }
}

// Warp-collective: the sum of x over the lanes in `peers` (this lane's group, from __match_any_sync), complete at the
// group's lowest lane (a tree over the group's ranks; every lane of the warp takes part in every shuffle).
__device__ __forceinline__ float sum_over_peers(unsigned peers, float x) {
  const int lane = int(threadIdx.x % 32);
  int rank = __popc(peers & ((1u << lane) - 1u));  // this lane's rank in its group
  unsigned higher = peers & ~((2u << lane) - 1u);  // the group's lanes above this one (for lane 31: none)
  while (__any_sync(0xffffffffu, higher != 0)) {
    const int next = __ffs(higher);  // 1 + the next remaining lane above, 0 if none
    const float above = __shfl_sync(0xffffffffu, x, next > 0 ? next - 1 : lane);
    if (next > 0) x += above;
    higher &= ~__ballot_sync(0xffffffffu, rank & 1);  // odd ranks were added into the lane below: done
    rank >>= 1;
  }
  return x;
}

struct RelativeBiasRows {
  const float* position;   // this head's row of the position table, or nullptr
  const float* time;       // this head's row of the time table, or nullptr
  const char* timestamps;  // at the sequence's first token
  int reach;
  int num_buckets;
  int timestamps_dtype;
  float inv_divisor;

  __device__ __forceinline__ RelativeBiasRows(const HstuAttnRelativeBias& bias, int64_t start, int head)
      : position(bias.position_weights == nullptr ? nullptr : bias.position_weights + head * bias.position_head_stride),
        time(bias.time_weights == nullptr ? nullptr : bias.time_weights + head * bias.time_head_stride),
        timestamps(bias.timestamps == nullptr ? nullptr
                                              : static_cast<const char*>(bias.timestamps) +
                                                    start * timestamp_bytes(bias.timestamps_dtype)),
        reach(bias.position_reach),
        num_buckets(bias.num_time_buckets),
        timestamps_dtype(bias.timestamps_dtype),
        inv_divisor(bias.inv_time_bucket_divisor) {}

  __device__ __forceinline__ int position_column(int query, int key) const {
    return min(max(key - query, -reach), reach) + reach;
  }

  // clamp(floor(log(max(|t_key - t_query|, 1)) / divisor), 0, NB - 1), the division as a product with the fp32
  // reciprocal (PyTorch on CUDA divides by a scalar so).
  __device__ __forceinline__ int time_bucket(int query, int key) const {
    const float magnitude = fmaxf(time_magnitude(timestamps, timestamps_dtype, query, key), 1.0f);
    const float bucket = floorf(logf(magnitude) * inv_divisor);
    return int(fminf(fmaxf(bucket, 0.0f), float(num_buckets - 1)));
  }

  // The bias of (query, key), both inside the sequence; `bucket` gets the time bucket (untouched without times).
  __device__ __forceinline__ float value(int query, int key, int& bucket) const {
    float bias = 0.0f;
    if (position != nullptr) bias += __ldg(position + position_column(query, key));
    if (time != nullptr) {
      bucket = time_bucket(query, key);
      bias += __ldg(time + bucket);
    }
    return bias;
  }
};

// The backward's sums of dS per table column before they reach the fp32 gradients in global memory: per score tile,
// one shared float per relative distance key - query of the tile (kBlockM + kBlockN - 1 of them), added into the
// position gradient after the tile; per CTA, one float per time bucket (in shared memory up to kMaxSharedBuckets
// buckets, else the global row itself; each warp first sums its lanes of one bucket), added into the time gradient at
// the end.
template <int kBlockM, int kBlockN, int kNThreads>
struct RelativeBiasGradients {
  static constexpr int kMaxSharedBuckets = 2048;
  static constexpr int kDistances = kBlockM + kBlockN - 1;
  static constexpr int kWindowFloats = kBlockM + kBlockN;  // kDistances rounded up to an even count

  float* position_window;  // shared [kWindowFloats], or nullptr (no position gradient wanted)
  float* position_grad;    // this head's global row, or nullptr
  float* time_sums;        // shared [num_buckets] or the global row, or nullptr (no time gradient wanted)
  float* time_grad;        // this head's global row, or nullptr
  int reach;
  int num_buckets;

  static __host__ __device__ int shared_bytes(int num_buckets) {
    return (kWindowFloats + (num_buckets <= kMaxSharedBuckets ? num_buckets : 0)) * int(sizeof(float));
  }

  // `shared`: shared_bytes() of free shared memory, 4-byte aligned. Zeroes the shared sums; a barrier must follow
  // before the first add.
  __device__ __forceinline__ RelativeBiasGradients(float* shared, const HstuAttnBwdParams& p, int head, int tid)
      : position_window(p.dposition_weights == nullptr ? nullptr : shared),
        position_grad(p.dposition_weights == nullptr
                          ? nullptr
                          : p.dposition_weights + head * p.relative_bias.position_head_stride),
        time_sums(nullptr),
        time_grad(p.dtime_weights == nullptr ? nullptr : p.dtime_weights + head * p.relative_bias.time_head_stride),
        reach(p.relative_bias.position_reach),
        num_buckets(p.relative_bias.num_time_buckets) {
    if (time_grad != nullptr) time_sums = time_in_shared() ? shared + kWindowFloats : time_grad;
    for (int i = tid; i < kWindowFloats; i += kNThreads) shared[i] = 0.0f;
    if (time_grad != nullptr && time_in_shared()) {
      for (int i = tid; i < num_buckets; i += kNThreads) time_sums[i] = 0.0f;
    }
  }

  __device__ __forceinline__ bool time_in_shared() const { return num_buckets <= kMaxSharedBuckets; }

  // dS of one valid pair of the tile whose first query is m0 and first key n0, into its distance's sum. (Lanes of a
  // warp hold at most a few pairs of one distance, so plain shared atomics.)
  __device__ __forceinline__ void add_position(int query, int key, int m0, int n0, float ds) const {
    if (position_window != nullptr) atomicAdd(position_window + (key - n0) - (query - m0) + kBlockM - 1, ds);
  }

  // Warp-collective (every lane of the warp calls it, converged): each lane's dS into its time bucket's sum, bucket
  // < 0 for a lane without a valid pair. Lanes of one bucket are summed with shuffles first and their lowest lane adds
  // the sum, one atomic per bucket and warp (neighbouring pairs often share a log bucket).
  __device__ __forceinline__ void add_time(int bucket, float ds) const {
    if (time_sums == nullptr) return;  // CTA-uniform
    const unsigned peers = __match_any_sync(0xffffffffu, bucket);
    const float sum = sum_over_peers(peers, ds);
    if (bucket >= 0 && int(threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(time_sums + bucket, sum);
  }

  // After a barrier that follows the tile's adds: the tile's distance sums into the position gradient (clamped
  // columns), the window zeroed for the next tile (a barrier must come before the next tile's adds).
  __device__ __forceinline__ void flush_tile(int m0, int n0, int tid) const {
    if (position_window == nullptr) return;
    for (int i = tid; i < kDistances; i += kNThreads) {
      const float sum = position_window[i];
      if (sum != 0.0f) {
        const int distance = n0 - m0 + i - (kBlockM - 1);
        atomicAdd(position_grad + min(max(distance, -reach), reach) + reach, sum);
        position_window[i] = 0.0f;
      }
    }
  }

  // After a barrier that follows the last add: the per-bucket sums into the time gradient.
  __device__ __forceinline__ void flush_time(int tid) const {
    if (time_grad == nullptr || !time_in_shared()) return;
    for (int i = tid; i < num_buckets; i += kNThreads) {
      const float sum = time_sums[i];
      if (sum != 0.0f) atomicAdd(time_grad + i, sum);
    }
  }
};

}  // namespace hstu_attn
