"""GPU probe: which time bucket does the CUTLASS forward give each (query, key) pair, against PyTorch's
`bucketize_time_delta` on CUDA and on the CPU and against float64 logs? (Issue 15: the SM80 relative-bias
`many_buckets` test case, 3000 buckets of width 0.004, exceeds its max-error bound; this tells whether bucket
assignments differ.)

The kernel's bucket of each pair is read back through the output: q = k = 0, one head, a time table whose column b
holds 20 + (b mod 32) (then 20 + b // 32), scale 1, non-causal, and v one-hot over a window of 128 keys, so that
out[i, d] = silu(table[bucket(i, key0 + d)]) ~ table[...] (fp16; silu(x) = x within 2e-9 for x >= 20).

    python3 tools/gpu/relative_bucket_probe.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from hstu_attn import RelativeBias
from hstu_attn.cutlass import hstu_attn_cutlass_forward
from hstu_attn.relative_bias import bucketize_time_delta

LENGTHS = (300, 1, 0, 77, 129, 64, 0, 513)  # the test's
NUM_BUCKETS, DIVISOR, MAX_GAP = 3000, 0.004, 5000


def timestamps(seed: int) -> torch.Tensor:
    """The test's own `_timestamps` (tests/test_cutlass_gpu.py) for int64."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packages" / "hstu-attn" / "tests"))
    import test_cutlass_gpu

    return test_cutlass_gpu._timestamps(LENGTHS, torch.int64, seed=seed, max_gap=MAX_GAP)


def kernel_columns(times: torch.Tensor, column_values: torch.Tensor) -> list[torch.Tensor]:
    """Per sequence, `[n, n]` of column_values[bucket(i, j)] as the kernel sees it."""
    total = times.numel()
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device="cuda")
    q = torch.zeros(total, 1, 128, device="cuda", dtype=torch.float16)
    bias = RelativeBias(None, column_values.float().view(1, -1).cuda(), times, DIVISOR)
    per_sequence = [torch.empty(n, n, device="cuda") for n in LENGTHS]
    for key0 in range(0, max(LENGTHS), 128):
        v = torch.zeros_like(q)
        for s, n in enumerate(LENGTHS):
            start = int(offsets[s])
            for d in range(min(128, n - key0) if n > key0 else 0):
                v[start + key0 + d, 0, d] = 1.0
        out = hstu_attn_cutlass_forward(
            q, q, v, offsets, max(LENGTHS), alpha=1.0, scale=1.0, causal=False, num_targets=None,
            contextual_seq_len=0, max_attn_len=0, relative_bias=bias,
        )  # fmt: skip
        for s, n in enumerate(LENGTHS):
            width = min(128, n - key0) if n > key0 else 0
            start = int(offsets[s])
            per_sequence[s][:, key0 : key0 + width] = out[start : start + n, 0, :width].float()
    return per_sequence


def main() -> None:
    seed = len(LENGTHS) + 64 + 3 * 2 + 5 * 2 + 10 + NUM_BUCKETS  # the test's seed for many_buckets
    times = timestamps(seed)
    columns = torch.arange(NUM_BUCKETS)
    low = kernel_columns(times, 20 + columns % 32)
    high = kernel_columns(times, 20 + columns // 32)
    offsets = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    pairs = differ_cuda = differ_cpu = differ_f64 = torch_cuda_vs_cpu = 0
    for s, n in enumerate(LENGTHS):
        if n == 0:
            continue
        t = times[offsets[s] : offsets[s] + n]
        delta = t.view(1, n) - t.view(n, 1)  # [query, key]: t_key - t_query
        kernel = (high[s].round() - 20) * 32 + (low[s].round() - 20)
        cuda = bucketize_time_delta(delta, DIVISOR, NUM_BUCKETS).float()
        cpu = bucketize_time_delta(delta.cpu(), DIVISOR, NUM_BUCKETS).float().cuda()
        exact = delta.abs().clamp_min(1).double().log().div(DIVISOR).floor().clamp(0, NUM_BUCKETS - 1).float()
        pairs += n * n
        differ_cuda += int((kernel != cuda).sum())
        differ_cpu += int((kernel != cpu).sum())
        differ_f64 += int((kernel != exact).sum())
        torch_cuda_vs_cpu += int((cuda != cpu).sum())
        if s == 0 and (kernel != cuda).any():
            i, j = (kernel != cuda).nonzero()[0].tolist()
            m = float(delta[i, j].abs())
            print(f"example: |dt| {m:.0f}, kernel {kernel[i, j]:.0f}, torch cuda {cuda[i, j]:.0f}, "
                  f"log*250 float64 {math.log(m) / DIVISOR:.6f}")  # fmt: skip
    print(f"pairs {pairs}; kernel bucket differs from torch CUDA: {differ_cuda}, from torch CPU: {differ_cpu}, "
          f"from float64 logs: {differ_f64}; torch CUDA vs CPU: {torch_cuda_vs_cpu}")  # fmt: skip


if __name__ == "__main__":
    main()
