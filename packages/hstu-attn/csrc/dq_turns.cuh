// The deterministic dQ of the SM80-style backward (bwd_kernel.cuh): which query blocks a key block's CTA visits, and
// the turn order in which the CTAs add into one query block's dQ rows. tests/test_cutlass_dq_turns.py compiles
// dq_turns_check.cu (host code) against this header and checks the order against a brute-force count and a
// simulation of the launch.
#pragma once

#include <cuda_runtime.h>

namespace hstu_attn {

// The first query block that key block n_block can meet: under a causal mask with no contextual rows every valid
// pair has query >= key, so the blocks before n_block * kBlockN / kBlockM hold none; otherwise block 0.
template <int kBlockM, int kBlockN>
__host__ __device__ __forceinline__ int first_m_block(int n_block, bool causal_start) {
  return causal_start ? n_block * kBlockN / kBlockM : 0;
}

// Deterministic dQ: the CTA of key block n_block adds into query block m_block's dQ rows only after the CTAs of every
// higher key block of its (sequence, head) that visit m_block have added theirs; each counter counts them. Those CTAs
// have lower blockIdx.x (the grid runs key blocks from the last), so they were launched before this one and never
// wait on it. A CTA passes its turn at every query block it visits, with or without pairs to add.
template <int kBlockM, int kBlockN>
struct DqTurns {
  int* counters;     // this (sequence, head)'s counters, one per query block; nullptr: fp32 atomics instead
  int n_block;       // this CTA's key block
  int last_n_block;  // the sequence's last key block
  bool causal_start; // whether key block n visits only query blocks from n * kBlockN / kBlockM on

  // The number of CTAs that add into query block m_block before this one: the key blocks above n_block, up to the
  // last, whose first_m_block is <= m_block (first_m_block(n) <= m  <=>  n <= ((m + 1) kBlockM - 1) / kBlockN).
  __host__ __device__ __forceinline__ int turn(int m_block) const {
    int last = last_n_block;
    const int last_reaching = ((m_block + 1) * kBlockM - 1) / kBlockN;
    if (causal_start && last_reaching < last) last = last_reaching;
    return last > n_block ? last - n_block : 0;
  }

  // Every thread of the CTA returns once the CTAs before this one have added into query block m_block. A wait past
  // kMaxWaitNs (far longer than any backward takes) can only be a broken turn order: it traps (the launch fails with
  // an error) instead of hanging the device.
  static constexpr unsigned long long kMaxWaitNs = 30ull * 1000 * 1000 * 1000;
  __device__ __forceinline__ void wait(int m_block, int tid) const {
    if (tid == 0) {
      const int want = turn(m_block);
      const unsigned long long started = global_nanoseconds();
      int seen;
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(counters + m_block) : "memory");
      while (seen != want) {
        if (global_nanoseconds() - started > kMaxWaitNs) __trap();
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(counters + m_block) : "memory");
      }
    }
    __syncthreads();
  }

  static __device__ __forceinline__ unsigned long long global_nanoseconds() {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
  }

  // After every thread's dQ stores for query block m_block: the next CTA may add.
  __device__ __forceinline__ void pass(int m_block, int tid) const {
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counters + m_block) : "memory");
    }
  }
};

}  // namespace hstu_attn
