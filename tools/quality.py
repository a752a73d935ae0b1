"""Retrieval quality runs on ML-1M (users 1-2999).

`run`: trains each named model (`packages/gr-models/configs/ml1m_retrieval_<model>.yaml`) for each seed under the
retrieval protocol of `gr_models.model.retrieval_protocol` (validation = each user's second-to-last rating), stops
when validation NDCG@10 has not improved for `--patience` epochs, and reports the test metrics of the best
validation epoch; rows (and mean +- std per model) go to `--out`, validation curves to `--curves`.

    python tools/quality.py run --models sasrec hstu hstu_large --seeds 1 2 3 --out quality-ml1m.json \
        --curves quality-ml1m-curves.json -- device=cuda

`curves`: per-epoch curves of config variants on the same seeds (the issue 26 ablation):

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
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gr_models.data.collate import BatchCollator
from gr_models.model.retrieval_protocol import RetrievalProtocol, evaluate_retrieval, movielens_splits
from gr_models.trainer import OptimizerBundle, Trainer
from gr_models.trainer.builders import build_model, build_train_dataset
from gr_models.trainer.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "packages" / "gr-models" / "configs"


def _commit() -> str:
    """The checkout's short commit (+dirty), or $GR_COMMIT where there is no git (the GPU machine's copy)."""
    if os.environ.get("GR_COMMIT"):
        return os.environ["GR_COMMIT"]
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


def _dataset_name(ratings_path: str | None) -> str:
    if ratings_path is None:
        return "ML-1M"
    if "ratings_users0001-2999" in str(ratings_path):
        return "ML-1M (users 1-2999)"
    return f"ML-1M ({Path(ratings_path).name})"


def _device(config: RunConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _train_epoch(model, bundle: OptimizerBundle, dataset, config: RunConfig, epoch: int) -> float:
    """One pass over the training users in a (seed, epoch) order; returns the mean loss."""
    order = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.batch_size, shuffle=True, generator=order,
        collate_fn=BatchCollator(dataset.schema),
    )  # fmt: skip
    model.train()
    losses = []
    for batch in loader:
        loss = model(batch)[0].mean()
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(model.dense_parameters()), config.optim.grad_clip)
        for optimizer in bundle.optimizers:
            optimizer.step()
        bundle.scheduler.step()
        bundle.zero_grad()
        losses.append(loss.item())
    return float(np.mean(losses))


def train_with_early_stopping(
    config: RunConfig, max_epochs: int, patience: int
) -> tuple[dict[str, float], int, list[dict[str, float]], RetrievalProtocol]:
    """Test metrics at the best validation NDCG@10 epoch, that epoch, the validation curve, the protocol."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    options = config.data.options
    protocol = RetrievalProtocol(
        tie_order=options.get("tie_order", "file"), validation=True,
        max_sequence_length=config.data.max_sequence_length, filter_seen=config.retrieval.eval_exclude_history,
        top_k=(10, 50, 200),
    )  # fmt: skip
    splits = movielens_splits(config.data.path, protocol, ratings_path=options.get("ratings_path"))
    device = _device(config)
    model = build_model(config, splits.train.schema, device)
    steps_per_epoch = math.ceil(len(splits.train) / config.data.batch_size)
    bundle = OptimizerBundle(model, config.optim, max_epochs * steps_per_epoch)
    evaluate = functools.partial(
        evaluate_retrieval, model, protocol=protocol, excluded_items=splits.excluded_items,
        batch_size=config.data.eval_batch_size,
    )  # fmt: skip
    curve = [{"epoch": 0, **evaluate(splits.valid)}]
    best = (curve[0]["ndcg@10"], 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    for epoch in range(1, max_epochs + 1):
        loss = _train_epoch(model, bundle, splits.train, config, epoch)
        curve.append({"epoch": epoch, "loss": loss, **evaluate(splits.valid)})
        print(f"  epoch {epoch}: loss {loss:.4f} valid ndcg@10 {curve[-1]['ndcg@10']:.4f}", flush=True)
        if curve[-1]["ndcg@10"] > best[0]:
            best = (curve[-1]["ndcg@10"], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    return evaluate(splits.test), best[1], curve, protocol


def run(args: argparse.Namespace) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = _commit()
    rows: list[dict[str, Any]] = []
    curves_out: list[dict[str, Any]] = []
    for name in args.models:
        for seed in args.seeds:
            config = load_config(CONFIGS / f"ml1m_retrieval_{name}.yaml", [*args.overrides, f"seed={seed}"])
            started = time.perf_counter()
            print(f"{name} seed {seed}", flush=True)
            test, best_epoch, curve, protocol = train_with_early_stopping(config, args.max_epochs, args.patience)
            device = _device(config)
            facts = {
                "model": name, "dataset": _dataset_name(config.data.options.get("ratings_path")),
                "tie_order": protocol.tie_order, "filter_seen": protocol.filter_seen,
                **{k: round(v, 5) for k, v in test.items()}, "epochs": best_epoch, "seed": seed,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "date": date,
                "commit": commit, "seconds": round(time.perf_counter() - started, 1), "protocol": protocol.describe(),
            }  # fmt: skip
            rows.append(facts)
            curves_out.append({"model": name, "seed": seed, "valid": curve})
            print(
                f"{name} seed {seed}: best epoch {best_epoch}, test "
                + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
            )
            _write(args, rows, curves_out)
    for name in args.models:
        values = [r["hr@10"] for r in rows if r["model"] == name]
        print(f"{name}: HR@10 {np.mean(values):.4f} +- {np.std(values):.4f} over {len(values)} seeds")


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], curves_out: list[dict[str, Any]]) -> None:
    summary = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        summary[name] = {
            metric: {"mean": float(np.mean([r[metric] for r in mine])), "std": float(np.std([r[metric] for r in mine]))}
            for metric in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr", "epochs")
        } | {"seeds": len(mine)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    if args.curves:
        Path(args.curves).write_text(json.dumps(curves_out, indent=1) + "\n")


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
    r = sub.add_parser("run", help="early-stopped runs of the ML-1M configs, test metrics at the best epoch")
    r.add_argument("--models", nargs="+", default=["sasrec", "hstu", "hstu_large"])
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--max-epochs", type=int, default=200)
    r.add_argument("--patience", type=int, default=10)
    r.add_argument("--out", required=True)
    r.add_argument("--curves", default=None, help="JSON of the validation curves")
    r.add_argument("overrides", nargs="*", help="key=value overrides for every model (after --)")
    args = parser.parse_args(argv)
    if args.command == "curves":
        curves(args)
    elif args.command == "run":
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
