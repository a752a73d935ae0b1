// Host check of dq_turns.cuh (built and run by tests/test_cutlass_dq_turns.py; not part of the library): for every
// sequence length up to a bound, key and query block sizes of the backward's instantiations, and a causal start or
// not, (1) each CTA's turn at each query block it visits equals the number of higher key blocks that visit it, and
// (2) a simulation of the launch (key blocks from the last, at most R CTAs resident, each waiting for its turn at
// its next query block) finishes with every counter at the number of CTAs that visit its block. Prints "ok" and
// exits 0, or names the first failing case and exits 1.
#include <cstdio>
#include <vector>

#include "dq_turns.cuh"

namespace {

template <int kBlockM, int kBlockN>
bool check_length(int length, bool causal_start, int resident) {
  using Turns = hstu_attn::DqTurns<kBlockM, kBlockN>;
  const int last = (length - 1) / kBlockN;
  const int m_end = (length + kBlockM - 1) / kBlockM;
  auto first = [&](int n) { return hstu_attn::first_m_block<kBlockM, kBlockN>(n, causal_start); };
  for (int n = 0; n <= last; ++n) {
    const Turns turns{nullptr, n, last, causal_start};
    for (int m = first(n); m < m_end; ++m) {
      int before = 0;
      for (int higher = n + 1; higher <= last; ++higher) before += first(higher) <= m ? 1 : 0;
      if (turns.turn(m) != before) {
        std::printf("turn: blocks %dx%d length %d causal_start %d key block %d query block %d: %d, want %d\n",
                    kBlockM, kBlockN, length, int(causal_start), n, m, turns.turn(m), before);
        return false;
      }
    }
  }
  std::vector<int> counters(m_end, 0), next(last + 1);
  for (int n = 0; n <= last; ++n) next[n] = first(n);
  int launched = 0, finished = 0;  // launch order: key block last - i is the i-th CTA
  std::vector<int> active;
  while (finished <= last) {
    while (launched <= last && int(active.size()) < resident) active.push_back(last - launched++);
    bool progressed = false;
    for (size_t i = 0; i < active.size();) {
      const int n = active[i];
      if (next[n] >= m_end) {
        active.erase(active.begin() + i);
        ++finished;
        progressed = true;
        continue;
      }
      if (counters[next[n]] == Turns{nullptr, n, last, causal_start}.turn(next[n])) {
        ++counters[next[n]++];
        progressed = true;
      }
      ++i;
    }
    if (!progressed) {
      std::printf("deadlock: blocks %dx%d length %d causal_start %d resident %d\n", kBlockM, kBlockN, length,
                  int(causal_start), resident);
      return false;
    }
  }
  for (int m = 0; m < m_end; ++m) {
    int visitors = 0;
    for (int n = 0; n <= last; ++n) visitors += first(n) <= m ? 1 : 0;
    if (counters[m] != visitors) {
      std::printf("count: blocks %dx%d length %d query block %d: %d, want %d\n", kBlockM, kBlockN, length, m,
                  counters[m], visitors);
      return false;
    }
  }
  return true;
}

template <int kBlockM, int kBlockN>
bool check_all(int max_length) {
  for (int length = 1; length <= max_length; ++length) {
    for (int causal_start = 0; causal_start < 2; ++causal_start) {
      for (int resident = 1; resident <= 3; ++resident) {
        if (!check_length<kBlockM, kBlockN>(length, causal_start != 0, resident)) return false;
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  // The instantiations of bwd_hdim64.cu (64 x 64) and bwd_hdim128.cu (64 x 128), and a taller query block.
  const bool ok = check_all<64, 64>(1100) && check_all<64, 128>(1100) && check_all<128, 64>(700);
  std::printf(ok ? "ok\n" : "");
  return ok ? 0 : 1;
}
