"""Retrieval quality runs on ML-1M: per-epoch curves of config variants on the same seeds.

    python tools/quality.py curves --config packages/gr-models/configs/ml1m_retrieval_hstu.yaml --epochs 10 \
        --seeds 1 2 --variant base= --variant alpha1=hstu.alpha=1.0 --out curves.json -- device=cuda

Each `--variant NAME=OVERRIDE[;OVERRIDE...]` trains the config with those `key=value` overrides (after the common
ones given after `--`) for `--epochs` epochs of the training split, evaluating the held-out items after every
epoch (epoch 0: untrained). One epoch is one pass over the users (ceil(users / batch) steps). Rows of the output
JSON: variant, overrides, seed, epoch, every evaluation metric, device, date, commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gr_models.trainer import Trainer
from gr_models.trainer.builders import build_train_dataset
from gr_models.trainer.config import load_config


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise ValueError(f"--variant {text!r} must look like NAME=key=value[;key=value...] (or NAME=)")
    return name, [o for o in overrides.split(";") if o]


def run_curve(
    config_path: str, overrides: list[str], seed: int, epochs: int, run_dir: Path
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train `epochs` epochs; returns one metrics dict per epoch (0 = untrained) and run facts."""
    config = load_config(config_path, [*overrides, f"seed={seed}"])
    dataset = build_train_dataset(config.data, config.task)
    steps_per_epoch = math.ceil(len(dataset) / config.data.batch_size)
    config.train.max_steps = epochs * steps_per_epoch
    config.train.eval_every = steps_per_epoch
    config.train.checkpoint_every = 0
    config.train.resume = False
    config.train.progress_bar = False
    config.output_dir = str(run_dir)
    started = time.perf_counter()
    trainer = Trainer(config, train_dataset=dataset)
    trainer.train()
    history = trainer.recorder.history
    per_epoch: list[dict[str, float]] = [{} for _ in range(epochs + 1)]
    for tag, points in history.items():
        if not tag.startswith("eval/"):
            continue
        for step, value in points:
            per_epoch[step // steps_per_epoch][tag.removeprefix("eval/")] = value
    facts = {
        "steps_per_epoch": steps_per_epoch,
        "users": len(dataset),
        "seconds": time.perf_counter() - started,
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
    }
    return per_epoch, facts


def curves(args: argparse.Namespace) -> None:
    variants = [_parse_variant(v) for v in args.variant] or [("base", [])]
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = _commit()
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in variants:
            for seed in args.seeds:
                per_epoch, facts = run_curve(
                    args.config, [*args.overrides, *overrides], seed, args.epochs, Path(scratch) / f"{name}-{seed}"
                )
                for epoch, metrics in enumerate(per_epoch):
                    rows.append(
                        {"variant": name, "overrides": overrides, "seed": seed, "epoch": epoch, **metrics, **facts,
                         "config": args.config, "common_overrides": args.overrides, "date": date, "commit": commit}
                    )  # fmt: skip
                summary = " ".join(f"{m.get('hr@10', float('nan')):.3f}" for m in per_epoch)
                print(f"{name} seed {seed} ({facts['seconds']:.0f}s): hr@10 by epoch {summary}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="per-epoch evaluation curves of config variants")
    c.add_argument("--config", required=True)
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--seeds", type=int, nargs="+", default=[1])
    c.add_argument("--variant", action="append", default=[], help="NAME=key=value[;key=value...]")
    c.add_argument("--out", required=True)
    c.add_argument("overrides", nargs="*", help="key=value overrides for every variant (after --)")
    args = parser.parse_args(argv)
    if args.command == "curves":
        curves(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
