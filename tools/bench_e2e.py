"""End-to-end training throughput of the ranking GR on one GPU (issue 16).

Trains `gr_models.RankingGR` (dynamic item and user tables through dynamicemb, a static action table, bf16 HSTU
layers, `hstu_attn` AUTO backend, AdamW) on synthetic batches with its own step loop, at NVIDIA's per-GPU
configuration ("nvidia": hidden 1024, 8 layers, 4 heads x 256, batch 32, up to 4096 tokens) and at the demo's
model size ("small"). Each variant of the step (see VARIANTS) runs on the same model and batches, one after the
other, so each row shows what one change is worth. The rows before "+ fused LayerNorm gate" run the HSTU layers'
post-attention `dropout(LayerNorm(attn) * u)` as plain PyTorch ops (`fused_norm_gate=False`, as measured before
that kernel existed), and so does the torch.compile variant; that row runs it as one Triton kernel
(`hstu_attn.norm_gate`) forward and one backward. Reported per variant: median step time, tokens/s, achieved
TFLOP/s, MFU against 989 TFLOP/s and against a bf16 8192^3 matmul measured in the same run, a step breakdown
from CUDA events, peak memory; then a torch.profiler summary of the last variant, or of those named by
--profile-variants (kernel classes, GPU busy share; the fused kernels count as "norm").

FLOPs per step (the units of NVIDIA's figures; ../shared/ANCHORS.md counts attention this way):
    attention: 3.5 * 4 * sum_b(l_b (l_b + 1) / 2) * H * D    (causal forward, backward 2.5 x forward)
    linear:    6 * (P_layers * tokens + P_head * scored rows)  (weights of the HSTU and head linear layers)
Embedding lookups, norms and elementwise work are not counted.

    python tools/bench_e2e.py --configs small nvidia --out results.json      (CUDA machine)
    python tools/bench_e2e.py --configs tiny --device cpu --steps 2          (CPU smoke run)
    python tools/bench_e2e.py --configs nvidia --variants 4 5 --profile-variants 4 5   (plain vs fused norm gate)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import hstu_attn.interface as attention_interface
from gr_models.configs import DynamicShardedEmbeddingConfig, RankingConfig, ShardedEmbeddingConfig, get_hstu_config
from gr_models.configs.embedding_config import EmbeddingOptimizerParam
from gr_models.data.batch import RankingBatch
from gr_models.model import RankingGR
from hstu_attn import set_value_checks

PEAK_TFLOPS = 989.0


@dataclasses.dataclass
class BenchConfig:
    name: str
    hidden: int
    head_dim: int
    heads: int
    layers: int
    batch: int
    max_tokens: int  # user token + 2 x history items + candidates
    candidates: int
    item_rows: int  # dynamic item table capacity (rows)
    user_rows: int
    item_vocab: int  # ids drawn Zipf(1) over this many items
    head_hidden: int
    num_tasks: int = 2
    dropout: float = 0.1


CONFIGS = {
    "nvidia": BenchConfig("nvidia", 1024, 256, 4, 8, 32, 4096, 32, 2**21, 2**20, 2**20, 512),
    "small": BenchConfig("small", 64, 32, 2, 2, 64, 136, 8, 2**16, 2**14, 500, 128),
    "tiny": BenchConfig("tiny", 32, 32, 1, 1, 2, 24, 2, 2**10, 2**10, 100, 16),
}


# ------------------------------------------------------------------------------------------------ data
def token_lengths(config: BenchConfig, mode: str, generator: torch.Generator) -> torch.Tensor:
    """`[B]` token lengths in [max/4, max] (zipf: P(l) ~ 1/l), [max/2, max] (uniform) or all max (fixed)."""
    high = config.max_tokens
    u = torch.rand(config.batch, generator=generator, dtype=torch.float64)
    if mode == "zipf":
        low = high / 4
        return (low * (high / low) ** u).floor().clamp(max=high).to(torch.int64)
    if mode == "uniform":
        return (high / 2 + u * (high / 2 + 1)).floor().clamp(max=high).to(torch.int64)
    if mode == "fixed":
        return torch.full((config.batch,), high, dtype=torch.int64)
    raise ValueError(f"unknown lengths mode {mode!r}; expected zipf, uniform or fixed")


def zipf_ids(n: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """`n` ids whose popularity ranks follow P(r) ~ 1/r over `vocab` items, scattered over int64 by a hash."""
    ranks = (vocab ** torch.rand(n, generator=generator, dtype=torch.float64)).floor().to(torch.int64) - 1
    return (ranks * 0x9E3779B1) % (1 << 40)


def make_batch(config: BenchConfig, mode: str, generator: torch.Generator) -> RankingBatch:
    """A ranking batch in page-locked memory (when CUDA is available): user, item and action features."""
    tokens = token_lengths(config, mode, generator)
    candidates = torch.full((config.batch,), config.candidates, dtype=torch.int64)
    history = ((tokens - 1 - candidates) // 2).clamp(min=1)
    items = history + candidates
    total_items = int(items.sum())
    labels = torch.randint(0, 2, (int(candidates.sum()), config.num_tasks), generator=generator)
    actions = torch.randint(0, 2**config.num_tasks, (total_items,), generator=generator)
    is_candidate = torch.arange(total_items) >= (torch.cumsum(items, 0) - candidates).repeat_interleave(items)
    actions[is_candidate] = (labels << torch.arange(config.num_tasks)).sum(dim=1)
    users = torch.randint(0, config.user_rows * 4, (config.batch,), generator=generator)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "action"],
        values=torch.cat([users, zipf_ids(total_items, config.item_vocab, generator), actions]),
        lengths=torch.cat([torch.ones(config.batch, dtype=torch.int64), items, items]),
    )
    max_items = (config.max_tokens - 1 - config.candidates) // 2 + config.candidates
    batch = RankingBatch(
        features=features,
        batch_size=config.batch,
        feature_to_max_seqlen={"user": 1, "item": max_items, "action": max_items},
        contextual_feature_names=["user"],
        item_feature_name="item",
        action_feature_name="action",
        max_num_candidates=config.candidates,
        num_candidates=candidates,
        labels=labels.to(torch.float32),
    )
    return batch.pin_memory() if torch.cuda.is_available() else batch


def sequence_lengths(batch: RankingBatch) -> torch.Tensor:
    """`[B]` token lengths the model builds: user token + item and action per history event + candidates."""
    items = batch.features["item"].lengths().to(torch.int64)
    return 1 + 2 * (items - batch.num_candidates) + batch.num_candidates


# ------------------------------------------------------------------------------------------------ model
def build_model(config: BenchConfig, device: torch.device) -> RankingGR:
    hstu = get_hstu_config(
        hidden_size=config.hidden,
        kv_channels=config.head_dim,
        num_attention_heads=config.heads,
        num_layers=config.layers,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        kernel_backend="auto",
        dropout=config.dropout,
        use_position_encoding=False,
    )
    sparse_adam = EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=1e-3)

    def dynamic(feature: str, rows: int) -> DynamicShardedEmbeddingConfig:
        return DynamicShardedEmbeddingConfig(
            feature_names=[feature],
            table_name=f"{feature}_table",
            vocab_size=rows,
            dim=config.hidden,
            optimizer_param=sparse_adam,
        )

    tables = [
        dynamic("item", config.item_rows),
        dynamic("user", config.user_rows),
        ShardedEmbeddingConfig(
            feature_names=["action"],
            table_name="action_table",
            vocab_size=2**config.num_tasks,
            dim=config.hidden,
            sharding_type="data_parallel",
        ),
    ]
    task = RankingConfig(embedding_configs=tables, prediction_head_arch=[config.head_hidden, config.num_tasks])
    return RankingGR(hstu, task, device=device)


def linear_parameters(model: RankingGR) -> tuple[int, int]:
    """(weights of the HSTU layers' linear layers, weights of the prediction head's linear layers)."""
    layers = sum(m.weight.numel() for m in model.hstu_block.modules() if isinstance(m, torch.nn.Linear))
    head = sum(m.weight.numel() for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    return layers, head


def step_flops(config: BenchConfig, lengths: torch.Tensor, params: tuple[int, int], scored: int) -> float:
    causal_pairs = float((lengths * (lengths + 1) // 2).sum())
    attention = 3.5 * 4 * causal_pairs * config.heads * config.head_dim
    return attention + 6.0 * (params[0] * float(lengths.sum()) + params[1] * scored)


# ------------------------------------------------------------------------------------------------ variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the training step. The first is what the gr-models Trainer did at commit 3b86d70."""

    name: str
    attention_host: str  # "old": custom-op dispatch + value checks every call; "new": Function + checks per tensor
    sync_every_step: bool  # float(loss), float(grad norm) and torch.cuda.synchronize() every step
    fused_adam: bool
    prefetch: bool  # next batch copied to the GPU on a side stream while this step runs
    compile_layers: bool = False
    fused_norm_gate: bool = False  # HSTUConfig.fused_norm_gate of every layer during this variant


VARIANTS = [
    Variant("trainer-like", "old", True, False, False),
    Variant("+ attention host path", "new", True, False, False),
    Variant("+ no per-step host sync", "new", False, False, False),
    Variant("+ fused AdamW", "new", False, True, False),
    Variant("+ prefetch to device", "new", False, True, True),
    Variant("+ fused LayerNorm gate", "new", False, True, True, fused_norm_gate=True),
]
COMPILED = Variant("+ torch.compile HSTU layers", "new", False, True, True, compile_layers=True)


def norm_gate_setting(variant: Variant, device: torch.device) -> bool | None:
    """The layers' `fused_norm_gate` for a variant: as asked on CUDA and under TRITON_INTERPRET=1, else None (the
    plain path: the kernel needs CUDA or the interpreter)."""
    if variant.fused_norm_gate and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return variant.fused_norm_gate


@contextlib.contextmanager
def norm_gate_fusion(model: RankingGR, fused: bool | None) -> Iterator[None]:
    """Every HSTU layer's `config.fused_norm_gate` set to `fused` inside the block, restored after."""
    configs = {id(layer.config): layer.config for layer in model.hstu_block.layers}
    previous = {key: config.fused_norm_gate for key, config in configs.items()}
    for config in configs.values():
        config.fused_norm_gate = fused
    try:
        yield
    finally:
        for key, config in configs.items():
            config.fused_norm_gate = previous[key]


@contextlib.contextmanager
def attention_host_path(kind: str) -> Iterator[None]:
    if kind == "new":
        yield
        return
    eager = attention_interface._EagerAttention.apply
    attention_interface._EagerAttention.apply = lambda *a: attention_interface._hstu_attn_forward(*a[:-1], *a[-1])  # type: ignore
    previous = set_value_checks("always")
    try:
        yield
    finally:
        attention_interface._EagerAttention.apply = eager  # type: ignore[method-assign]
        set_value_checks(previous)


class Timeline:
    """CUDA events at the phase boundaries of one step (no host sync; read after the run)."""

    PHASES = ("data", "embedding_forward", "dense_forward", "dense_backward", "embedding_backward", "optimizer")

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.enabled and name not in self.marks:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event

    def durations_ms(self) -> dict[str, float]:
        order = ["start", "data_done", "embedding_done", "forward_done", "dense_backward_done", "backward_done", "end"]
        times = {}
        for phase, (a, b) in zip(self.PHASES, itertools.pairwise(order)):
            if a in self.marks and b in self.marks:
                times[phase] = self.marks[a].elapsed_time(self.marks[b])
        return times


class Trainer:
    """The bench's own step loop around one model (the gr-models Trainer is not used: see the module docstring)."""

    def __init__(self, model: RankingGR, device: torch.device) -> None:
        self.model = model
        self.device = device
        params = list(model.dense_parameters())
        self.params = params
        fused_ok = device.type == "cuda"
        self.optimizers = {
            False: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01),
            True: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused_ok),
        }
        self.timeline: Timeline | None = None
        embedding = model.embedding
        embedding.register_forward_pre_hook(lambda *_: self._mark("data_done"))
        embedding.register_forward_hook(self._after_embedding)

    def _mark(self, name: str) -> None:
        if self.timeline is not None:
            self.timeline.mark(name)

    def _after_embedding(self, module: Any, inputs: Any, outputs: dict) -> None:
        self._mark("embedding_done")
        if self.timeline is None:
            return
        for jagged in outputs.values():
            values = jagged.values()
            if values.requires_grad:
                values.register_hook(lambda grad: self._mark("dense_backward_done"))

    def step(self, batch: RankingBatch, variant: Variant, timeline: Timeline | None) -> torch.Tensor:
        """One optimizer step on a batch already on the device (or on the host: then the copy is timed as data)."""
        self.timeline = timeline
        self._mark("start")
        batch = batch.to(self.device, non_blocking=variant.prefetch)
        losses, _ = self.model(batch)
        loss = losses.mean()
        self._mark("forward_done")
        loss.backward()
        self._mark("backward_done")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        optimizer = self.optimizers[variant.fused_adam]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._mark("end")
        if variant.sync_every_step:
            float(loss.detach())
            float(grad_norm)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.timeline = None
        return loss.detach()


class Prefetcher:
    """Copies batch i+1 to the device on a side stream while step i runs."""

    def __init__(self, batches: list[RankingBatch], device: torch.device) -> None:
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.index = 0
        self.ready = self._copy(0)

    def _copy(self, index: int) -> RankingBatch:
        batch = self.batches[index % len(self.batches)]
        if self.stream is None:
            return batch.to(self.device)
        with torch.cuda.stream(self.stream):
            return batch.to(self.device, non_blocking=True)

    def next(self) -> RankingBatch:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.ready.record_stream(torch.cuda.current_stream(self.device))
        batch = self.ready
        self.index += 1
        self.ready = self._copy(self.index)
        return batch


# ------------------------------------------------------------------------------------------------ measurement
def matmul_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    import triton.testing

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = float(triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median"))
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def run_variant(
    trainer: Trainer,
    batches: list[RankingBatch],
    variant: Variant,
    args: argparse.Namespace,
    config: BenchConfig,
    params: tuple[int, int],
    ceiling: float | None,
) -> dict:
    device = trainer.device
    if variant.compile_layers:
        for layer in trainer.model.hstu_block.layers:
            layer.compile(dynamic=True)
    prefetcher = Prefetcher(batches, device) if variant.prefetch else None
    losses: list[torch.Tensor] = []
    timelines: list[Timeline] = []
    step_ms: list[float] = []
    flops = tokens = 0.0
    fused = norm_gate_setting(variant, device)
    with attention_host_path(variant.attention_host), norm_gate_fusion(trainer.model, fused):
        for i in range(args.warmup + args.steps):
            host_batch = batches[i % len(batches)]
            batch = prefetcher.next() if prefetcher is not None else host_batch
            timed = i >= args.warmup
            timeline = Timeline(device) if timed else None
            started = time.perf_counter()
            losses.append(trainer.step(batch, variant, timeline))
            if timed:
                assert timeline is not None
                timelines.append(timeline)
                lengths = sequence_lengths(host_batch)
                flops += step_flops(config, lengths, params, int(host_batch.num_candidates.sum()))
                tokens += float(lengths.sum())
            if i == args.warmup - 1 and device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                loop_start = time.perf_counter()
            if device.type != "cuda" and timed:
                step_ms.append((time.perf_counter() - started) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - loop_start
        step_ms = [t.marks["start"].elapsed_time(t.marks["end"]) for t in timelines]
        # the whole loop's wall time per step also counts host gaps between steps
        step_ms_wall = wall / args.steps * 1e3
    else:
        step_ms_wall = statistics.mean(step_ms)
    phases: dict[str, list[float]] = {}
    for t in timelines:
        for phase, ms in t.durations_ms().items():
            phases.setdefault(phase, []).append(ms)
    seconds = step_ms_wall * args.steps / 1e3
    tflops = flops / seconds / 1e12
    row = {
        "variant": variant.name,
        "fused_norm_gate": fused,
        "steps": args.steps,
        "step_ms_wall": step_ms_wall,
        "step_ms_median_events": statistics.median(step_ms) if step_ms else None,
        "tokens_per_step": tokens / args.steps,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": config.batch * args.steps / seconds,
        "tflops": tflops,
        "mfu_vs_989": tflops / PEAK_TFLOPS,
        "mfu_vs_matmul": None if ceiling is None else tflops / ceiling,
        "breakdown_ms_median": {p: statistics.median(v) for p, v in phases.items()},
        "last_losses": [float(x) for x in losses[-3:]],
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


KERNEL_CLASSES = [
    ("attention_forward", ("hstu_attn_forward",)),
    ("attention_backward", ("hstu_attn_backward",)),
    ("embedding_kernels", ("lookup_kernel", "insert_kernel", "gather_rows", "scatter_rows", "_fused_update", "evict")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("optimizer", ("multi_tensor", "fused_adam", "_fused_adamw", "adam")),
    ("norm", ("layer_norm", "LayerNorm")),
    ("reduce_sort_index", ("reduce", "sort", "scan", "index", "gather", "scatter", "unique", "radix", "cub")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_")),
    ("memcpy_memset", ("memcpy", "memset", "Memcpy", "Memset")),
]


def _classify(name: str) -> str:
    for label, needles in KERNEL_CLASSES:
        if any(n in name for n in needles):
            return label
    return "other"


def profile_steps(trainer: Trainer, batches: list[RankingBatch], variant: Variant, steps: int, out: Path | None):
    """torch.profiler over `steps` steps: kernel time by class, GPU busy share and the top kernels/ops."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.device
    prefetcher = Prefetcher(batches, device) if variant.prefetch else None
    fused = norm_gate_setting(variant, device)
    with attention_host_path(variant.attention_host), norm_gate_fusion(trainer.model, fused):
        for i in range(2):
            trainer.step(prefetcher.next() if prefetcher else batches[i % len(batches)], variant, None)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            for i in range(steps):
                trainer.step(prefetcher.next() if prefetcher else batches[i % len(batches)], variant, None)
            torch.cuda.synchronize(device)
            wall_us = (time.perf_counter() - started) * 1e6
    intervals, by_class, by_kernel = [], {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        by_class[_classify(event.name)] = by_class.get(_classify(event.name), 0.0) + (end - start)
        by_kernel[event.name] = by_kernel.get(event.name, 0.0) + (end - start)
    intervals.sort()
    busy, current_start, current_end = 0.0, None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    if out is not None:
        out.with_suffix(".profile.txt").write_text(table)
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {
        "variant": variant.name,
        "steps": steps,
        "wall_ms_per_step": wall_us / steps / 1e3,
        "gpu_busy_ms_per_step": busy / steps / 1e3,
        "gpu_busy_share_of_wall": busy / wall_us if wall_us else None,
        "gpu_busy_share_of_kernel_span": busy / span if span else None,
        "kernel_ms_per_step_by_class": {k: v / steps / 1e3 for k, v in sorted(by_class.items(), key=lambda x: -x[1])},
        "top_kernels_ms_per_step": [(name[:90], t / steps / 1e3) for name, t in top],
    }


def attention_launch_configs() -> dict:
    """The Triton attention launch configurations chosen so far, per kernel and tuning key."""
    try:
        from hstu_attn.triton import api
    except ImportError:
        return {}
    kernels = {"forward": api._forward, "backward_dkdv": api._backward_dkdv, "backward_dq": api._backward_dq}
    return {name: {str(key[:2]): dataclasses.asdict(c) for key, c in k.chosen.items()} for name, k in kernels.items()}


def _portable_argument(argument: str) -> str:
    """A command-line argument as the results JSON records it: a path under $OUT (the device call's output folder)
    as `$OUT/...`, an absolute path inside the repository relative to it, anything else unchanged."""
    out = os.environ.get("OUT")
    if out and argument.startswith(out.rstrip("/") + "/"):
        return "$OUT/" + argument[len(out.rstrip("/")) + 1 :]
    root = Path(__file__).resolve().parents[1]
    if argument.startswith("/") and Path(argument).resolve().is_relative_to(root):
        return str(Path(argument).resolve().relative_to(root))
    return argument


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_files": git("status", "--porcelain").count("\n")}


def measure_variant(entry: dict, name: str, trainer: Trainer, batches: list, variant: Variant, *rest: Any) -> None:
    try:
        row = run_variant(trainer, batches, variant, *rest)
    except Exception as error:  # keep the other variants and configs: the caller reads the JSON
        entry["variants"].append({"variant": variant.name, "error": f"{type(error).__name__}: {error}"})
        traceback.print_exc()
        return
    entry["variants"].append(row)
    phases = " ".join(f"{k}={v:.1f}" for k, v in row["breakdown_ms_median"].items())
    print(
        f"[{name}] {variant.name:30s} {row['step_ms_wall']:8.2f} ms/step {row['tokens_per_s'] / 1e3:9.1f}K tok/s "
        f"{row['tflops']:7.1f} TFLOP/s MFU {row['mfu_vs_989']:.1%} peak {row.get('peak_memory_gib', 0):.1f} GiB "
        f"{phases}",
        flush=True,
    )


def profiled_variants(variants: list[Variant], chosen: list[str] | None) -> list[Variant]:
    """The variants named (or indexed in VARIANTS) by --profile-variants, in run order; by default the last one."""
    if not chosen:
        return variants[-1:]
    return [v for v in variants if v.name in chosen or str(VARIANTS.index(v)) in chosen]


def bench_config(name: str, args: argparse.Namespace, device: torch.device, result: dict, save: Callable) -> None:
    config = dataclasses.replace(CONFIGS[name])
    if name == "nvidia" and device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 100e9:
        config = dataclasses.replace(config, item_rows=2**20, user_rows=2**19)  # an 80 GB card
    for override in ("item_rows", "user_rows"):
        if getattr(args, override):
            config = dataclasses.replace(config, **{override: getattr(args, override)})
    entry: dict = {"config": dataclasses.asdict(config), "lengths": args.lengths, "variants": []}
    result["configs"][name] = entry
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    entry["build_seconds"] = time.perf_counter() - started
    params = linear_parameters(model)
    entry["linear_parameters"] = {"hstu_layers": params[0], "head": params[1]}
    entry["parameters_total_dense"] = sum(p.numel() for p in model.dense_parameters())
    generator = torch.Generator().manual_seed(1)
    batches = [make_batch(config, args.lengths, generator) for _ in range(args.pool)]
    entry["mean_tokens_per_sequence"] = float(torch.cat([sequence_lengths(b) for b in batches]).float().mean())
    trainer = Trainer(model, device)
    chosen = args.variants
    variants = [v for i, v in enumerate(VARIANTS) if chosen is None or v.name in chosen or str(i) in chosen]
    for variant in variants:
        measure_variant(entry, name, trainer, batches, variant, args, config, params, result.get("matmul_tflops"))
        save()
    if args.profile and device.type == "cuda" and variants:
        for index, variant in enumerate(profiled_variants(variants, args.profile_variants)):
            key = "profile" if index == 0 else f"profile_{index}"  # "profile": the first profiled variant
            try:
                out = (
                    args.out.with_name(f"{args.out.stem}-{name}" + (f"-{index}" if index else "")) if args.out else None
                )
                entry[key] = profile_steps(trainer, batches, variant, args.profile, out)
                print(json.dumps(entry[key], indent=1), flush=True)
            except Exception as error:
                entry[key] = {"variant": variant.name, "error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
            save()
    if args.compile:  # last: compiling changes the layers in place
        measure_variant(entry, name, trainer, batches, COMPILED, args, config, params, result.get("matmul_tflops"))
        save()
    entry["attention_launch_configs"] = attention_launch_configs()
    save()
    del trainer, model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small", "nvidia"], choices=sorted(CONFIGS))
    parser.add_argument("--lengths", default="zipf", choices=["zipf", "uniform", "fixed"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--pool", type=int, default=6, help="distinct batches, cycled")
    parser.add_argument(
        "--variants", nargs="*", default=None, help="names or indexes of the variants to run (default all)"
    )
    parser.add_argument("--compile", action="store_true", help="also run the torch.compile variant last")
    parser.add_argument("--profile", type=int, default=3, help="profiled steps per profiled variant (0: none)")
    parser.add_argument(
        "--profile-variants",
        nargs="*",
        default=None,
        help="names or indexes of the variants to profile (default the last run), e.g. 4 5: plain and fused norm gate",
    )
    parser.add_argument("--item-rows", type=int, default=None)
    parser.add_argument("--user-rows", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON written after every variant")
    parser.add_argument("--commit", default=None, help="the commit measured (when the checkout has no history)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    device = torch.device(args.device)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **git_state(),
        **({"commit": args.commit} if args.commit else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python tools/bench_e2e.py " + " ".join(_portable_argument(a) for a in sys.argv[1:]),
        "peak_tflops": PEAK_TFLOPS,
        "configs": {},
    }

    def save() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))

    try:
        result["matmul_tflops"] = matmul_tflops(device)
        print(f"bf16 8192^3 matmul: {result['matmul_tflops']} TFLOP/s", flush=True)
    except Exception as error:
        result["matmul_tflops"] = None
        result["matmul_error"] = f"{type(error).__name__}: {error}"
    save()
    for name in args.configs:
        try:
            bench_config(name, args, device, result, save)
        except Exception as error:
            result["configs"].setdefault(name, {})["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            save()


if __name__ == "__main__":
    main()
