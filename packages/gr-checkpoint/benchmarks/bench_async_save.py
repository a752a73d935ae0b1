"""How long a checkpoint blocks the training loop: synchronous vs asynchronous ``gr_checkpoint.save``.

The model (CPU, one process): an MLP of ``--layers`` ``hidden x hidden`` linear layers trained with
Adam, and a standalone ``DynamicEmbeddingCollection`` table of ``--rows`` rows of ``--dim`` floats
with fused Adam (two state columns per value), filled before timing. A loop trains
``--steps-between`` steps, then saves (``save_step`` with ``keep_last=2``), ``--saves`` times per
mode; the modes alternate for ``--rounds`` rounds (this machine is shared: medians over rounds).
``blocked`` is the time the loop is held: the save call (for the asynchronous save: the host copy)
plus the wait for the previous asynchronous save if it is still writing (``call`` and ``wait``
separately); ``train_step`` is the mean step time in the loop (with the asynchronous save it shares
the CPU with the writer thread); ``loop`` is the wall time of the whole loop including the last
save's completion.

    python benchmarks/bench_async_save.py                   # prints a table, writes results/async_save-cpu.json
    python benchmarks/bench_async_save.py --rows 65536 --saves 3 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import gr_checkpoint
from dynamicemb import DynamicEmbeddingCollection, DynamicEmbOptimizerArgs, DynamicEmbOptimizerType

RESULTS = Path(__file__).resolve().parent / "results" / "async_save-cpu.json"


def git_commit() -> str:
    """The short commit of the checkout holding this file, or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class Model(nn.Module):
    def __init__(self, rows: int, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.table = DynamicEmbeddingCollection(
            tables=[EmbeddingConfig(name="items", embedding_dim=dim, num_embeddings=rows, feature_names=["item"])],
            optimizer=DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.01),
        )
        self.project = nn.Linear(dim, hidden)
        self.mlp = nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(layers)])

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.project(self.table(features)["item"].values())).square().mean()


def build(args: argparse.Namespace) -> tuple[Model, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Model(args.rows, args.dim, args.hidden, args.layers)
    (table,) = model.table.dynamic_embedding_tables().values()
    keys = torch.randperm(args.rows * 4)[: args.rows].to(torch.int64)
    for chunk in keys.split(1 << 16):
        table.import_rows(chunk, torch.randn(chunk.numel(), args.dim), None, torch.ones_like(chunk))
    dense = [p for name, p in model.named_parameters() if not name.startswith("table")]
    optimizer = torch.optim.Adam(dense, lr=1e-4)
    return model, optimizer


def batch(step: int, args: argparse.Namespace) -> KeyedJaggedTensor:
    ids = torch.randint(0, args.rows * 4, (args.batch,), generator=torch.Generator().manual_seed(step))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=ids, lengths=torch.ones(args.batch, dtype=torch.int)
    )


def train_step(model: Model, optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    optimizer.zero_grad()
    model(batch(step, args)).backward()
    optimizer.step()
    return time.perf_counter() - started


def run_mode(asynchronous: bool, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model, optimizer = build(args)
    step, waits, calls, steps = 0, [], [], []
    gr_checkpoint.save_step(root, step, model, optimizer, keep_last=2, asynchronous=asynchronous)  # warm-up
    gr_checkpoint.wait_for_saves()
    loop_started = time.perf_counter()
    for _ in range(args.saves):
        for _ in range(args.steps_between):
            step += 1
            steps.append(train_step(model, optimizer, step, args))
        started = time.perf_counter()
        gr_checkpoint.wait_for_saves()  # the previous asynchronous save, if still writing (save would wait too)
        waited = time.perf_counter()
        gr_checkpoint.save_step(root, step, model, optimizer, keep_last=2, asynchronous=asynchronous)
        waits.append(waited - started)
        calls.append(time.perf_counter() - waited)
    gr_checkpoint.wait_for_saves()
    loop = time.perf_counter() - loop_started
    latest = gr_checkpoint.latest_checkpoint(root)
    assert latest is not None and gr_checkpoint.read_manifest(latest).step == step
    size = sum(f.size for f in (gr_checkpoint.read_manifest(latest).files or {}).values())
    blocked = [w + c for w, c in zip(waits, calls)]
    return {
        "mode": "asynchronous" if asynchronous else "synchronous",
        "blocked_ms_median": 1e3 * statistics.median(blocked),
        "blocked_ms_max": 1e3 * max(blocked),
        "call_ms_median": 1e3 * statistics.median(calls),
        "wait_for_previous_ms_median": 1e3 * statistics.median(waits),
        "train_step_ms_mean": 1e3 * statistics.mean(steps),
        "loop_s": loop,
        "checkpoint_mb": size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 18, help="dynamic table rows")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="ids per training step")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--steps-between", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for round_ in range(args.rounds):
            for asynchronous in (False, True):
                root = Path(folder) / f"{'async' if asynchronous else 'sync'}{round_}"
                runs[asynchronous].append(run_mode(asynchronous, args, root))
    rows = []
    for found in runs.values():
        medians = {key: statistics.median(r[key] for r in found) for key in found[0] if key != "mode"}
        rows.append({"mode": found[0]["mode"], **medians, "rounds": found})
    dense_params = args.dim * args.hidden + args.hidden + args.layers * (args.hidden * args.hidden + args.hidden)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("dir", "out")}, "dense_params": dense_params}
    settings["torch_threads"] = torch.get_num_threads()
    result = {
        "benchmark": "bench_async_save",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only (no GPU)",
        "settings": settings,
        "rows": rows,
    }
    print(f"median of {args.rounds} rounds, {args.saves} saves each")
    header = ("mode", "blocked ms", "(max)", "call ms", "wait ms", "train step ms", "loop s", "MiB")
    print(f"{header[0]:<13}" + "".join(f"{h:>14}" for h in header[1:]))
    keys = ("blocked_ms_median", "blocked_ms_max", "call_ms_median", "wait_for_previous_ms_median")
    for row in rows:
        values = [row[k] for k in keys] + [row["train_step_ms_mean"], row["loop_s"], row["checkpoint_mb"]]
        print(f"{row['mode']:<13}" + "".join(f"{v:>14.1f}" for v in values))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
