"""Side-by-side throughput of jagged HSTU attention: our Triton kernels, Meta's Triton kernel, SDPA cuDNN/flash.

Usage (on a CUDA machine, from the repository root):

    PYTHONPATH=packages/hstu-attn/src python packages/hstu-attn/benchmarks/bench_attention.py \\
        [--peers .peers] [--out packages/hstu-attn/benchmarks/results] [--shapes NAME ...]

FLOPs are counted causal, as in ANCHORS.md: forward = 4 * sum_b(l_b (l_b + 1) / 2) * H * D, backward = 2.5x
forward. Times are `triton.testing.do_bench` medians; inputs are bf16 random normal with a fixed seed.
Meta's kernel (github.com/facebookresearch/generative-recommenders, fetched into an ignored `--peers` folder,
never committed) runs in child processes, so an illegal memory access (its backward on jagged inputs) is
recorded as a crash instead of ending the run; its backward is then also measured at full length.
SDPA (softmax attention, dense, causal) runs on the full-length shapes only.
The result rows go to `<out>/<device>.json` (keys case, backend, fwd_tflops, bwd_tflops, device, date, commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    max_len: int
    heads: int
    head_dim: int
    min_len: int  # == max_len for full-length shapes

    @property
    def jagged(self) -> bool:
        return self.min_len < self.max_len


SHAPES = [
    Shape("full B32 N1024 H4 D128", 32, 1024, 4, 128, 1024),
    Shape("jagged B32 N1024 H4 D128 U[128,1024]", 32, 1024, 4, 128, 128),
    Shape("full B8 N4096 H4 D128", 8, 4096, 4, 128, 4096),
    Shape("jagged B16 N4096 H4 D128 U[512,4096]", 16, 4096, 4, 128, 512),
    Shape("full B8 N4096 H4 D256", 8, 4096, 4, 256, 4096),
    Shape("jagged B64 N512 H4 D128 U[64,512]", 64, 512, 4, 128, 64),
    Shape("training full B32 N4096 H4 D256", 32, 4096, 4, 256, 4096),
]
SEED = 20261123


def make_inputs(shape: Shape, device: str = "cuda", full: bool = False) -> dict[str, Any]:
    """Jagged bf16 q, k, v, grad_out `[L, H, D]` and int64 offsets; lengths ~ U[min_len, max_len] (seeded)."""
    gen = torch.Generator().manual_seed(SEED)
    if full or not shape.jagged:
        lengths = torch.full((shape.batch,), shape.max_len, dtype=torch.int64)
    else:
        lengths = torch.randint(shape.min_len, shape.max_len + 1, (shape.batch,), generator=gen)
    offsets = torch.zeros(shape.batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    dims = (total, shape.heads, shape.head_dim)
    tensors = [torch.randn(dims, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(4)]
    return {
        "q": tensors[0],
        "k": tensors[1],
        "v": tensors[2],
        "grad_out": tensors[3],
        "seq_offsets": offsets.to(device),
        "lengths": lengths.tolist(),
    }


def forward_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    return 4.0 * sum(n * (n + 1) / 2 for n in lengths) * heads * head_dim


def median_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def ours_kwargs(shape: Shape) -> dict[str, Any]:
    return dict(
        alpha=1.0 / math.sqrt(shape.head_dim),
        scale=1.0 / shape.max_len,
        causal=True,
        num_targets=None,
        contextual_seq_len=0,
        max_attn_len=0,
        rab=None,
        position_weights=None,
        time_weights=None,
        timestamps=None,
        time_bucket_divisor=1.0,
    )


def bench_ours(shape: Shape, **variant: Any) -> tuple[float, float]:
    from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

    x = make_inputs(shape)
    kw = ours_kwargs(shape)
    fwd_variant = {k: v for k, v in variant.items() if k == "sort_by_length"}

    def fwd():
        return hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw, **fwd_variant)

    def bwd():
        return hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw, deterministic=False, **variant
        )

    flops = forward_flops(x["lengths"], shape.heads, shape.head_dim)
    fwd_ms, bwd_ms = median_ms(fwd), median_ms(bwd)
    return flops / fwd_ms / 1e9, 2.5 * flops / bwd_ms / 1e9


def bench_sdpa(shape: Shape, backend_name: str) -> tuple[float, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    gen = torch.Generator().manual_seed(SEED)
    dims = (shape.batch, shape.heads, shape.max_len, shape.head_dim)
    q, k, v, grad = (torch.randn(dims, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    with sdpa_kernel([backend]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        fwd_ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        bwd_ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    flops = forward_flops([shape.max_len] * shape.batch, shape.heads, shape.head_dim)
    return flops / fwd_ms / 1e9, 2.5 * flops / bwd_ms / 1e9


# ---- Meta's kernel, in child processes ----------------------------------------------------------------


def meta_worker(shape: Shape, part: str, full: bool) -> None:
    """Print one JSON line {"part": ..., "tflops": ...}: Meta's forward or backward on `shape`."""
    from generative_recommenders.ops.triton.triton_hstu_attention import (
        triton_hstu_attention_bwd,
        triton_hstu_attention_fwd,
    )

    x = make_inputs(shape, full=full)
    alpha = 1.0 / math.sqrt(shape.head_dim)
    flops = forward_flops(x["lengths"], shape.heads, shape.head_dim)
    common = dict(num_targets=None, max_attn_len=0, contextual_seq_len=0, sort_by_length_indices=None, enable_tma=False)
    if part == "fwd":
        ms = median_ms(
            lambda: triton_hstu_attention_fwd(
                N=shape.max_len, alpha=alpha, q=x["q"], k=x["k"], v=x["v"], seq_offsets=x["seq_offsets"], **common
            )
        )
        rate = flops / ms / 1e9
    else:
        dq, dk, dv = (torch.empty_like(x[name]) for name in ("q", "k", "v"))

        def bwd():
            return triton_hstu_attention_bwd(
                dout=x["grad_out"],
                q=x["q"],
                k=x["k"],
                v=x["v"],
                dq=dq,
                dk=dk,
                dv=dv,
                seq_offsets=x["seq_offsets"],
                N=shape.max_len,
                alpha=alpha,
                **common,
            )

        bwd()
        torch.cuda.synchronize()
        ms = median_ms(bwd)
        torch.cuda.synchronize()
        rate = 2.5 * flops / ms / 1e9
    print(json.dumps({"part": part, "tflops": rate}), flush=True)


def run_meta(shape: Shape, part: str, full: bool, peers: str, timeout: int) -> tuple[float | None, str]:
    """Run `meta_worker` in a child process; returns (TFLOP/s or None, status text)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([peers, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--meta-worker", json.dumps(asdict(shape)), part] + (["--full"] if full else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout}s"
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return float(json.loads(line)["tflops"]), "ok"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    reason = "illegal memory access" if "illegal memory access" in (proc.stderr or "") else tail[0][:160]
    return None, f"crash (exit {proc.returncode}): {reason}"


# ---- memory: fused relative bias vs materialized rab --------------------------------------------------


def bench_bias_memory(shape: Shape) -> dict[str, Any]:
    """Peak extra memory of forward+backward with the fused position+time bias vs the same bias materialized."""
    from hstu_attn.relative_bias import RelativeBias
    from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

    x = make_inputs(shape)
    gen = torch.Generator().manual_seed(SEED + 1)
    heads, n = shape.heads, shape.max_len
    pos = (0.1 * torch.randn(heads, 2 * n - 1, generator=gen)).cuda()
    tim = (0.1 * torch.randn(heads, 64, generator=gen)).cuda()
    ts = torch.randint(0, 1000, (x["q"].shape[0],), generator=gen).cumsum(0).cuda()
    kw = ours_kwargs(shape)
    kw.update(position_weights=pos, time_weights=tim, timestamps=ts, time_bucket_divisor=0.301)
    flops = forward_flops(x["lengths"], shape.heads, shape.head_dim)
    result: dict[str, Any] = {}

    def measure(label: str, run) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        result[f"{label}_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    def fused() -> None:
        hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw)
        hstu_attn_triton_backward(x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw, deterministic=False)

    def materialized() -> None:
        bias = RelativeBias(position_weights=pos, time_weights=tim, timestamps=ts, time_bucket_divisor=0.301)
        rab = bias.materialize(x["seq_offsets"], n, heads).to(torch.bfloat16).contiguous()
        kw_rab = dict(ours_kwargs(shape), rab=rab)
        hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw_rab)
        hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw_rab, deterministic=False
        )

    fused()
    materialized()
    measure("fused_bias", fused)
    measure("materialized_rab", materialized)
    fwd_ms = median_ms(lambda: hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw))
    bwd_ms = median_ms(
        lambda: hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw, deterministic=False
        )
    )
    result["fused_bias_fwd_tflops"] = flops / fwd_ms / 1e9
    result["fused_bias_bwd_tflops"] = 2.5 * flops / bwd_ms / 1e9
    q_bytes = x["q"].numel() * x["q"].element_size()
    result["q_mib"] = q_bytes / 2**20
    result["rab_mib"] = shape.batch * heads * n * n * 2 / 2**20
    return result


# ---- driver --------------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=".peers", help="folder holding Meta's generative_recommenders package")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--shapes", nargs="*", help="substrings selecting shapes by name (default: all)")
    parser.add_argument("--backends", nargs="*", default=["ours", "meta", "sdpa_cudnn", "sdpa_flash"])
    parser.add_argument("--variants", action="store_true", help="also time our scheduling/dq variants")
    parser.add_argument("--memory-shape", default="jagged B16 N4096", help="shape (substring) for the memory rows")
    parser.add_argument("--meta-timeout", type=int, default=400)
    parser.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    parser.add_argument("--meta-worker", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("part", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.meta_worker:
        meta_worker(Shape(**json.loads(args.meta_worker)), args.part, args.full)
        return

    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    shapes = [s for s in SHAPES if not args.shapes or any(p in s.name for p in args.shapes)]
    rows: list[dict[str, Any]] = []

    def add(case: str, backend: str, fwd: float | None, bwd: float | None, **extra: Any) -> None:
        row = {"case": case, "backend": backend, "fwd_tflops": fwd, "bwd_tflops": bwd}
        row.update(extra)
        row.update(device=device, date=date, commit=args.commit)
        rows.append(row)
        fmt = lambda x: "-" if x is None else f"{x:7.1f}"  # noqa: E731
        print(f"{case:40s} {backend:24s} fwd {fmt(fwd)}  bwd {fmt(bwd)}  {extra if extra else ''}", flush=True)

    for shape in shapes:
        if "ours" in args.backends:
            add(shape.name, "ours_triton", *bench_ours(shape))
            if args.variants:
                add(shape.name, "ours_triton_no_sort", *bench_ours(shape, sort_by_length=False))
                add(shape.name, "ours_triton_dq_kernel", *bench_ours(shape, atomic_dq=False))
        if "meta" in args.backends:
            fwd, fwd_status = run_meta(shape, "fwd", False, args.peers, args.meta_timeout)
            bwd, bwd_status = run_meta(shape, "bwd", False, args.peers, args.meta_timeout)
            extra: dict[str, Any] = {"fwd_status": fwd_status, "bwd_status": bwd_status}
            if shape.jagged and bwd is None:
                full_bwd, full_status = run_meta(shape, "bwd", True, args.peers, args.meta_timeout)
                extra.update(bwd_full_length_tflops=full_bwd, bwd_full_length_status=full_status)
            add(shape.name, "meta_triton", fwd, bwd, **extra)
        if not shape.jagged:
            for name in ("cudnn", "flash"):
                if f"sdpa_{name}" in args.backends:
                    try:
                        add(shape.name, f"sdpa_{name}", *bench_sdpa(shape, name))
                    except RuntimeError as error:
                        add(shape.name, f"sdpa_{name}", None, None, status=str(error)[:160])
    memory_shapes = [s for s in SHAPES if args.memory_shape in s.name]
    if memory_shapes and "ours" in args.backends:
        shape = memory_shapes[0]
        mem = bench_bias_memory(shape)
        add(shape.name, "ours_triton_fused_bias", mem.pop("fused_bias_fwd_tflops"), mem.pop("fused_bias_bwd_tflops"), **mem)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{device_slug(device)}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
