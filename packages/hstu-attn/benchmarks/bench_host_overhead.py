"""Host overhead of the public `hstu_attn_varlen_func` against the Triton kernels' own time (CUDA only).

For each shape (jagged, lengths U[N/8, N]) it times with `triton.testing.do_bench` (median, ms):
  kernels       hstu_attn_triton_forward + hstu_attn_triton_backward called directly
  public        hstu_attn_varlen_func(...) then out.backward(grad) (value checks once per offsets tensor)
  public_checks the same with set_value_checks("always"): one device-to-host read per call (the old behaviour)
  public_op     the same through the torch.library custom op (the old eager dispatch)
and the host time of one public forward+backward with the GPU held busy (`torch.cuda._sleep`), so that only the
Python and launch work is counted (an empty autograd node's host time is the floor of any autograd call).

    python packages/hstu-attn/benchmarks/bench_host_overhead.py [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import triton.testing

import hstu_attn.interface as interface
from hstu_attn import hstu_attn_varlen_func, set_value_checks
from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

SHAPES = [  # batch, max length, heads, Dqk, Dv
    (32, 1024, 4, 128, 128),
    (32, 1024, 4, 64, 128),
    (32, 256, 4, 128, 128),
]


def _inputs(batch: int, max_len: int, heads: int, dqk: int, dv: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(max_len // 8, 1), max_len + 1, (batch,), generator=generator)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).cuda()
    total = int(lengths.sum())

    def tensor(dim: int) -> torch.Tensor:
        return (torch.randn(total, heads, dim, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()

    return {"q": tensor(dqk), "k": tensor(dqk), "v": tensor(dv), "seq_offsets": offsets, "max_seq_len": max_len}


def _kernel_options(inputs: dict) -> dict:
    return {
        "alpha": 1.0 / math.sqrt(inputs["q"].shape[2]),
        "scale": 1.0 / inputs["max_seq_len"],
        "causal": True,
        "num_targets": None,
        "contextual_seq_len": 0,
        "max_attn_len": 0,
        "rab": None,
        "position_weights": None,
        "time_weights": None,
        "timestamps": None,
        "time_bucket_divisor": 1.0,
    }


@contextlib.contextmanager
def _through_custom_op() -> Iterator[None]:
    eager = interface._EagerAttention.apply
    interface._EagerAttention.apply = lambda *args: interface._hstu_attn_forward(*args[:-1], *args[-1])  # type: ignore[method-assign]
    try:
        yield
    finally:
        interface._EagerAttention.apply = eager  # type: ignore[method-assign]


def _median_ms(fn: Callable[[], None], grads: list[torch.Tensor]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grads, return_mode="median"))


def _host_us(fn: Callable[[], None], calls: int = 50) -> float:
    """Host microseconds per call while the GPU is busy with a long sleep queued ahead of the calls."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of GPU cycles: every call below only queues its work
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - started
    torch.cuda.synchronize()
    return host / calls * 1e6


class _Empty(torch.autograd.Function):
    """No work: what one autograd node with these inputs costs the host (the floor of any autograd op)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.qk_shape = q.shape
        return torch.empty_like(v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad.new_empty(ctx.qk_shape), grad.new_empty(ctx.qk_shape), grad


def measure(shape: tuple[int, int, int, int, int]) -> dict:
    inputs = _inputs(*shape)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[2], device="cuda").to(torch.bfloat16)
    options = _kernel_options(inputs)
    plain = (q.detach(), k.detach(), v.detach(), inputs["seq_offsets"], inputs["max_seq_len"])

    def kernels() -> None:
        hstu_attn_triton_forward(*plain, **options)
        hstu_attn_triton_backward(grad, *plain, **options, deterministic=False)

    def kernel_forward() -> None:
        hstu_attn_triton_forward(*plain, **options)

    def public() -> None:
        hstu_attn_varlen_func(**inputs).backward(grad)

    def public_forward() -> None:
        with torch.no_grad():
            hstu_attn_varlen_func(**inputs)

    grads = [q, k, v]
    row: dict = {"shape": dict(zip(("batch", "max_len", "heads", "dqk", "dv"), shape)), "tokens": q.shape[0]}
    row["kernels_ms"] = _median_ms(kernels, grads)
    row["kernel_forward_ms"] = _median_ms(kernel_forward, grads)
    row["public_ms"] = _median_ms(public, grads)
    row["public_forward_ms"] = _median_ms(public_forward, grads)
    row["public_host_us"] = _host_us(public)
    row["kernels_host_us"] = _host_us(kernels)
    row["autograd_floor_host_us"] = _host_us(lambda: _Empty.apply(q, k, v).backward(grad))
    previous = set_value_checks("always")
    try:
        row["public_checks_ms"] = _median_ms(public, grads)
    finally:
        set_value_checks(previous)
    with _through_custom_op():
        row["public_op_ms"] = _median_ms(public, grads)
        row["public_op_host_us"] = _host_us(public)
    row["public_over_kernels"] = row["public_ms"] / row["kernels_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--commit", default=None, help="the commit measured (when the checkout has no history)")
    args = parser.parse_args()
    commit = (
        args.commit
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    result = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": [],
    }
    print(f"{'shape':28s} {'kernels':>8s} {'public':>8s} {'ratio':>6s} {'checks':>8s} {'op':>8s} {'host us':>8s}")
    for shape in SHAPES:
        row = measure(shape)
        result["rows"].append(row)
        print(
            f"{shape!s:28s} {row['kernels_ms']:8.3f} {row['public_ms']:8.3f} {row['public_over_kernels']:6.2f} "
            f"{row['public_checks_ms']:8.3f} {row['public_op_ms']:8.3f} {row['public_host_us']:8.1f}",
            flush=True,
        )
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
