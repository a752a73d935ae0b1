"""Side-by-side throughput of jagged HSTU attention: our Triton kernels, Meta's Triton kernel, SDPA cuDNN/flash.

Usage (on a CUDA machine, from the repository root):

    PYTHONPATH=packages/hstu-attn/src python packages/hstu-attn/benchmarks/bench_attention.py \\
        [--peers .peers] [--out packages/hstu-attn/benchmarks/results] [--shapes NAME ...]

FLOPs are counted causal, as in ANCHORS.md: forward = 4 * sum_b(l_b (l_b + 1) / 2) * H * D, backward = 2.5x
forward. Times are `triton.testing.do_bench` medians; inputs are bf16 random normal with a fixed seed.
Meta's kernel (github.com/facebookresearch/generative-recommenders, fetched into an ignored `--peers` folder,
never committed) runs in child processes with its own full autotuning, so an illegal memory access (its backward
on jagged inputs) is recorded as a crash instead of ending the run; its backward is also measured at full
length (every sequence of length N) for the comparison. Before timing, every candidate kernel of both
implementations is compiled in parallel processes into Triton's disk cache (`--no-precompile` skips that).
SDPA (softmax attention, dense, causal) runs on the full-length shapes only.
The result rows go to `<out>/<device>.json` (keys case, backend, fwd_tflops, bwd_tflops, device, date, commit).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

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
# Full-length shapes of 32k tokens each, N from 128 to 4096: how the rate of one kernel depends on the sequence
# length alone (a jagged batch mixes the rates of its lengths).
LENGTH_PROFILE = [Shape(f"length profile full B{32768 // n} N{n} H4 D128", 32768 // n, n, 4, 128, n)
                  for n in (128, 256, 512, 1024, 2048, 4096)]  # fmt: skip


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


def median_ms(fn: Callable[[], object]) -> float:
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


def bench_cutlass(shape: Shape) -> tuple[float, float | None]:
    """Forward and backward of the SM80-style CUTLASS/CuTe kernels (hstu_attn.cutlass, built with
    HSTU_ATTN_BUILD_CUDA=1; HSTU_ATTN_CUTLASS_SM90=0, so an sm_90 device runs them too); the backward column stays
    empty at head dims without a CUTLASS backward kernel (256)."""
    with _cutlass_sm90_env("0"):
        return _time_cutlass(shape)


def bench_cutlass_sm90(shape: Shape) -> tuple[float | None, float | None]:
    """The Hopper (wgmma/TMA, warp-specialized) kernels (HSTU_ATTN_CUTLASS_SM90=1), head dims 64 and 128 only (other
    head dims would silently time the sm_80 kernels, so they give no row)."""
    if shape.head_dim not in (64, 128):
        return None, None
    with _cutlass_sm90_env("1"):
        return _time_cutlass(shape)


def _cutlass_sm90_env(value: str) -> contextlib.AbstractContextManager:
    """HSTU_ATTN_CUTLASS_SM90 set to `value` for the block (csrc/api.cu reads it on every call)."""
    return mock.patch.dict(os.environ, {"HSTU_ATTN_CUTLASS_SM90": value})


def _time_cutlass(shape: Shape) -> tuple[float, float | None]:
    from hstu_attn.cutlass import CUTLASS_BACKWARD_HEAD_DIMS, hstu_attn_cutlass_backward, hstu_attn_cutlass_forward

    x = make_inputs(shape)
    names = ("alpha", "scale", "causal", "num_targets", "contextual_seq_len", "max_attn_len")
    kw = {name: value for name, value in ours_kwargs(shape).items() if name in names}

    def fwd():
        return hstu_attn_cutlass_forward(x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw)

    def bwd():
        return hstu_attn_cutlass_backward(x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw)

    flops = forward_flops(x["lengths"], shape.heads, shape.head_dim)
    fwd_tflops = flops / median_ms(fwd) / 1e9
    if shape.head_dim not in CUTLASS_BACKWARD_HEAD_DIMS:
        return fwd_tflops, None
    return fwd_tflops, 2.5 * flops / median_ms(bwd) / 1e9


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


def meta_rate(shape: Shape, part: str, full: bool) -> float:
    """TFLOP/s of Meta's forward or backward on `shape` (its own autotuning included in the first call)."""
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
        return flops / ms / 1e9
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
    return 2.5 * flops / ms / 1e9


def meta_worker(jobs: list[list]) -> None:
    """Print one JSON line per job [shape dict, part, full]."""
    for shape_dict, part, full in jobs:
        rate = meta_rate(Shape(**shape_dict), part, full)
        print(json.dumps({"name": shape_dict["name"], "part": part, "full": full, "tflops": rate}), flush=True)


def meta_precompile_worker(rank: int, world: int, head_dims: list[int]) -> None:
    """Compile every world-th of Meta's autotuning configurations (from `rank`) into Triton's disk cache.

    Tiny inputs with the same specializations as the benchmark shapes (batch 8: not a multiple of 16; 16: one).
    """
    from generative_recommenders.ops.triton import triton_hstu_attention as meta

    for tuner in (meta._hstu_attn_fwd, meta._hstu_attn_bwd):
        tuner.configs = tuner.configs[rank::world]
    for head_dim in head_dims:
        for batch in (8, 16):
            shape = Shape("precompile", batch, 64, 4, head_dim, 64)
            meta_rate(shape, "fwd", True)
            meta_rate(shape, "bwd", True)


def _child(
    args: list[str], peers: str | None, timeout: int, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if peers:
        env["PYTHONPATH"] = os.pathsep.join([peers, env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_meta(jobs: list[tuple[Shape, str, bool]], peers: str, timeout: int) -> tuple[dict, str]:
    """Run Meta jobs in one child process; returns ({(name, part, full): TFLOP/s}, status of the process)."""
    payload = json.dumps([[asdict(shape), part, full] for shape, part, full in jobs])
    try:
        proc = _child(["--meta-worker", payload], peers, timeout)
        out, status = proc.stdout, "ok"
        if proc.returncode != 0:
            err = proc.stderr or ""
            lines = err.strip().splitlines() or [""]
            reason = "illegal memory access" if "illegal memory access" in err else lines[-1]
            status = f"crash (exit {proc.returncode}): {reason[:160]}"
    except subprocess.TimeoutExpired as error:
        partial = error.stdout or ""
        out = partial.decode() if isinstance(partial, bytes) else partial
        status = f"timeout after {timeout}s"
    rates = {}
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rates[(row["name"], row["part"], row["full"])] = row["tflops"]
    return rates, status


def precompile(shapes: list[Shape], peers: str | None, with_meta: bool, memory_shape: Shape | None) -> None:
    """Fill Triton's disk cache in parallel processes so the timed run does not compile one kernel at a time."""
    import concurrent.futures

    jobs: list[tuple[list[str], dict]] = []
    classes = sorted({s.head_dim for s in shapes})
    for head_dim in classes:
        for candidate in range(6):
            env = {"HSTU_ATTN_TRITON_CANDIDATE": str(candidate)}
            jobs.append((["--ours-precompile", str(head_dim), "plain"], env))
            if memory_shape is not None and head_dim == memory_shape.head_dim:
                jobs.append((["--ours-precompile", str(head_dim), "bias"], env))
    if with_meta:
        world = 12
        dims = ",".join(str(d) for d in classes)
        jobs += [(["--meta-precompile", str(rank), str(world), dims], {}) for rank in range(world)]
    workers = min(len(jobs), os.cpu_count() or 4)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_child, args, peers, 900, env) for args, env in jobs]
        for (args, _), future in zip(jobs, futures):
            proc = future.result()
            if proc.returncode != 0:
                print(f"precompile {' '.join(args)} failed: {(proc.stderr or '').strip()[-300:]}", flush=True)


def ours_precompile_worker(head_dim: int, kind: str) -> None:
    """Compile our kernels (the candidate in HSTU_ATTN_TRITON_CANDIDATE) with the benchmark's specializations."""
    from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

    shape = Shape("precompile", 2, 1024, 4, head_dim, 1024)
    x = make_inputs(shape)
    kw = ours_kwargs(shape)
    if kind == "bias":
        kw.update(bias_tables(shape, x["q"].shape[0]))
    hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw)
    for atomic_dq in (True, False) if kind == "plain" else (True,):
        hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], shape.max_len, **kw,
            deterministic=False, atomic_dq=atomic_dq,
        )  # fmt: skip
    torch.cuda.synchronize()


# ---- memory: fused relative bias vs materialized rab --------------------------------------------------


def bias_tables(shape: Shape, num_tokens: int) -> dict[str, Any]:
    """Fused relative-bias arguments: per-head position table over every distance, 64 time buckets."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return dict(
        position_weights=(0.1 * torch.randn(shape.heads, 2 * shape.max_len - 1, generator=gen)).cuda(),
        time_weights=(0.1 * torch.randn(shape.heads, 64, generator=gen)).cuda(),
        timestamps=torch.randint(0, 1000, (num_tokens,), generator=gen).cumsum(0).cuda(),
        time_bucket_divisor=0.301,
    )


def bench_bias_memory(shape: Shape) -> dict[str, Any]:
    """Peak extra memory of forward+backward with the fused position+time bias vs the same bias materialized
    as a `[B, H, N, N]` rab (bf16, with its gradient), plus the fused-bias throughput."""
    from hstu_attn.relative_bias import RelativeBias
    from hstu_attn.triton import hstu_attn_triton_backward, hstu_attn_triton_forward

    x = make_inputs(shape)
    n = shape.max_len
    tables = bias_tables(shape, x["q"].shape[0])
    kw = dict(ours_kwargs(shape), **tables)
    flops = forward_flops(x["lengths"], shape.heads, shape.head_dim)
    result: dict[str, Any] = {}

    def fused() -> None:
        hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw)
        hstu_attn_triton_backward(x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw, deterministic=False)

    def materialized() -> None:
        bias = RelativeBias(
            position_weights=tables["position_weights"],
            time_weights=tables["time_weights"],
            timestamps=tables["timestamps"],
            time_bucket_divisor=tables["time_bucket_divisor"],
        )
        with torch.no_grad():
            rab = bias.materialize(x["seq_offsets"], n, shape.heads).to(torch.bfloat16).contiguous()
        kw_rab = dict(ours_kwargs(shape), rab=rab)
        hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw_rab)
        hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw_rab, deterministic=False
        )

    for label, run in (("fused_bias", fused), ("materialized_rab", materialized)):
        run()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        result[f"{label}_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    fwd_ms = median_ms(lambda: hstu_attn_triton_forward(x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw))
    bwd_ms = median_ms(
        lambda: hstu_attn_triton_backward(
            x["grad_out"], x["q"], x["k"], x["v"], x["seq_offsets"], n, **kw, deterministic=False
        )
    )
    result["fused_bias_fwd_tflops"] = flops / fwd_ms / 1e9
    result["fused_bias_bwd_tflops"] = 2.5 * flops / bwd_ms / 1e9
    result["qkv_grad_out_mib"] = round(4 * x["q"].numel() * x["q"].element_size() / 2**20, 1)
    result["dense_bias_bf16_mib"] = round(shape.batch * shape.heads * n * n * 2 / 2**20, 1)
    return result


# ---- driver --------------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=".peers", help="folder holding Meta's generative_recommenders package")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--shapes", nargs="*", help="substrings selecting shapes by name (default: all)")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=["ours", "meta", "sdpa_cudnn", "sdpa_flash"],
        help="ours (Triton), cutlass (needs the HSTU_ATTN_BUILD_CUDA=1 build), cutlass_sm90 (Hopper kernels), meta, "
        "sdpa_cudnn, sdpa_flash",
    )
    parser.add_argument("--variants", action="store_true", help="also time our scheduling/dq variants")
    parser.add_argument("--memory-shape", default="jagged B32 N1024", help="shape (name substring) of the memory row")
    parser.add_argument("--no-precompile", action="store_true", help="compile kernels lazily, one at a time")
    parser.add_argument("--meta-timeout", type=int, default=420)
    parser.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    parser.add_argument("--length-profile", action="store_true", help="run the LENGTH_PROFILE shapes instead")
    parser.add_argument("--meta-worker", help=argparse.SUPPRESS)
    parser.add_argument("--meta-precompile", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--ours-precompile", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.meta_worker:
        meta_worker(json.loads(args.meta_worker))
        return
    if args.meta_precompile:
        rank, world, dims = args.meta_precompile
        meta_precompile_worker(int(rank), int(world), [int(d) for d in dims.split(",")])
        return
    if args.ours_precompile:
        ours_precompile_worker(int(args.ours_precompile[0]), args.ours_precompile[1])
        return

    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    catalogue = LENGTH_PROFILE if args.length_profile else SHAPES
    shapes = [s for s in catalogue if not args.shapes or any(p in s.name for p in args.shapes)]
    memory_shape = next((s for s in SHAPES if args.memory_shape in s.name), None) if "ours" in args.backends else None
    rows: list[dict[str, Any]] = []
    os.makedirs(args.out, exist_ok=True)
    suffix = "-length-profile" if args.length_profile else ""
    path = os.path.join(args.out, f"{device_slug(device)}{suffix}.json")

    def add(case: str, backend: str, fwd: float | None, bwd: float | None, **extra: Any) -> None:
        row = {"case": case, "backend": backend, "fwd_tflops": fwd, "bwd_tflops": bwd}
        row.update(extra)
        row.update(device=device, date=date, commit=args.commit)
        rows.append(row)
        with open(path, "w") as f:  # rewritten after every row: a run cut short keeps what it measured
            json.dump(rows, f, indent=1)
        fmt = lambda x: "      -" if x is None else f"{x:7.1f}"
        print(f"{case:40s} {backend:24s} fwd {fmt(fwd)}  bwd {fmt(bwd)}  {extra if extra else ''}", flush=True)

    if not args.no_precompile:
        started = time.time()
        precompile(shapes, args.peers, "meta" in args.backends, memory_shape if "ours" in args.backends else None)
        print(f"precompiled in {time.time() - started:.0f}s", flush=True)

    for shape in shapes:  # ours and SDPA first: their rows are on disk before Meta's long autotuning starts
        if "ours" in args.backends:
            add(shape.name, "ours_triton", *bench_ours(shape))
            if args.variants:
                add(shape.name, "ours_triton_sort_by_length", *bench_ours(shape, sort_by_length=True))
                add(shape.name, "ours_triton_atomic_dq", *bench_ours(shape, atomic_dq=True))
                add(shape.name, "ours_triton_dq_kernel", *bench_ours(shape, atomic_dq=False))
        if "cutlass" in args.backends:
            add(shape.name, "ours_cutlass", *bench_cutlass(shape))
        if "cutlass_sm90" in args.backends and shape.head_dim in (64, 128):
            add(shape.name, "ours_cutlass_sm90", *bench_cutlass_sm90(shape))
        if not shape.jagged:
            for name in ("cudnn", "flash"):
                if f"sdpa_{name}" in args.backends:
                    try:
                        add(shape.name, f"sdpa_{name}", *bench_sdpa(shape, name))
                    except RuntimeError as error:
                        add(shape.name, f"sdpa_{name}", None, None, status=str(error)[:160])

    if memory_shape is not None:
        mem = bench_bias_memory(memory_shape)
        add(
            memory_shape.name,
            "ours_triton_fused_bias",
            mem.pop("fused_bias_fwd_tflops"),
            mem.pop("fused_bias_bwd_tflops"),
            **mem,
        )

    if "meta" in args.backends:
        meta_rates: dict = {}
        meta_status: dict[str, str] = {}
        # one process for everything that should not crash; each jagged backward in its own process
        safe = [(s, "fwd", False) for s in shapes] + [(s, "bwd", True) for s in shapes]
        rates, status = run_meta(safe, args.peers, args.meta_timeout)
        meta_rates.update(rates)
        meta_status["safe"] = status
        for shape in shapes:
            if shape.jagged:
                rates, status = run_meta([(shape, "bwd", False)], args.peers, 90)
                meta_rates.update(rates)
                meta_status[shape.name] = status
        for shape in shapes:
            fwd = meta_rates.get((shape.name, "fwd", False))
            full_bwd = meta_rates.get((shape.name, "bwd", True))
            if shape.jagged:
                bwd = meta_rates.get((shape.name, "bwd", False))
                extra: dict[str, Any] = {
                    "bwd_status": "ok" if bwd is not None else meta_status.get(shape.name, "missing"),
                    "bwd_full_length_tflops": full_bwd,
                    "status": meta_status["safe"],
                }
                add(shape.name, "meta_triton", fwd, bwd, **extra)
            else:
                add(shape.name, "meta_triton", fwd, full_bwd, status=meta_status["safe"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
