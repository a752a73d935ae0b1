"""Retrieval and ranking quality runs on ML-1M (users 1-2999), issue 26.

`run`: trains each named model (`packages/gr-models/configs/ml1m_retrieval_<model>.yaml`) for each seed under the
retrieval protocol of `gr_models.model.retrieval_protocol` (validation = each user's second-to-last rating), stops
when validation NDCG@10 has not improved for `--patience` epochs, and reports the test metrics of the best
validation epoch; rows (and mean +- std per model) go to `--out`, validation curves to `--curves`.

    python tools/quality.py run --models sasrec sasrec_full_softmax hstu hstu_large --seeds 1 2 3 \
        --out quality-ml1m.json --curves quality-ml1m-curves.json -- device=cuda

`curves`: per-epoch curves of config variants on the same seeds (the issue 26 ablation):

    python tools/quality.py curves --config packages/gr-models/configs/ml1m_retrieval_hstu.yaml --epochs 10 \
        --seeds 1 2 --variant base= --variant alpha1=hstu.alpha=1.0 --out curves.json -- device=cuda

Each `--variant NAME=OVERRIDE[;OVERRIDE...]` trains the config with those `key=value` overrides (after the common
ones given after `--`) for `--epochs` epochs of the training split, evaluating the held-out items after every
epoch (epoch 0: untrained). One epoch is one pass over the users (ceil(users / batch) steps). Rows of the output
JSON: variant, overrides, seed, epoch, every evaluation metric, device, date, commit.

`ranking`: per-task AUC of `RankingGR` (`configs/ml1m_ranking.yaml`: contextual user features, genres as item side
features, ratings as actions) against `DLRMBaseline` (`gr_models.model.dlrm`: TorchRec EmbeddingBagCollection of the
same features, dot interaction, MLP) on the same split and seeds, both trained by this runner's loop (same batches
in the same order, same optimizers and schedule). Test candidates: each user's last `data.holdout` ratings; the
`holdout` ratings before them are the validation candidates (early stopping on the mean validation AUC), training
candidates are the last `data.max_train_candidates` ratings before those. Rows go to `--out` after every seed.
`--models` also takes `hstu_all_positions` and `dlrm_all_positions`: both models trained on every training rating
(`data.max_train_candidates=0`; each rating scored from the user's earlier events), evaluated on the same candidates.

    python tools/quality.py ranking --seeds 1 2 3 --out quality-ml1m-ranking.json -- device=cuda

`plot`: validation NDCG@10 by epoch from a curves JSON of `run` (mean over seeds per model), with an optional
reference curve (a JSON list of {"epoch", "ndcg@10"} rows, or of {"model", "seed", "valid": [...]} like `run`'s):

    python tools/quality.py plot --curves quality-ml1m-curves.json --reference reference-curves.json --out plot.png

`merge --kind run|ranking|curves --out FILE INPUTS...`: one file from the outputs of parallel processes.

`run` and `ranking` take `--time-budget SECONDS` and/or `--end-at UNIX_TIME` (stop training a seed before an epoch
that would end past the budget, counted from the process start, or past that time; the runs still to come share the
time left evenly; the row reports the best epoch so far, marked `"stopped": "time budget"`; SIGTERM stops the same
way, marked "SIGTERM", and starts no further run) and `--max-users N` (train and evaluate on the first N users only:
smoke runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gr_models.configs.embedding_config import EmbeddingOptimizerParam
from gr_models.data.collate import BatchCollator
from gr_models.metrics.classification import MultiTaskBinaryMetrics
from gr_models.model.dlrm import DLRMBaseline
from gr_models.model.retrieval_protocol import RetrievalProtocol, evaluate_retrieval, movielens_splits
from gr_models.trainer import OptimizerBundle, Trainer
from gr_models.trainer.builders import build_model, build_train_dataset
from gr_models.trainer.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "packages" / "gr-models" / "configs"


def _shown_path(path: str | Path) -> str:
    """`path` as a result row records it: relative to the repository when inside it (rows name no machine path)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


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


class _Deadline:
    """When training must stop: `--time-budget` seconds after the process started (shared evenly by the runs still
    to come, see `start_item`), or once SIGTERM arrived."""

    def __init__(self, budget_s: float | None, *, end_at: float | None = None, handle_sigterm: bool = False) -> None:
        self.end = time.monotonic() + budget_s if budget_s else math.inf
        if end_at is not None:  # a Unix time
            self.end = min(self.end, time.monotonic() + (end_at - time.time()))
        self.item_end = self.end
        self.terminated = False
        if handle_sigterm:
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.terminated = True
        print("SIGTERM: stopping after the current epoch", flush=True)

    def start_item(self, items_left: int) -> None:
        """A run starts with `items_left` runs (itself included) still to go: it gets their share of the time left."""
        now = time.monotonic()
        self.item_end = now + (self.end - now) / max(1, items_left)

    def allows(self, epoch_seconds: float) -> bool:
        """True when another epoch of about `epoch_seconds` (plus the final test evaluation) fits."""
        return not self.terminated and time.monotonic() + 1.5 * epoch_seconds < min(self.end, self.item_end)

    @property
    def reason(self) -> str:
        return "SIGTERM" if self.terminated else "time budget"


def _first_users(dataset, max_users: int | None):
    """The first `max_users` users of `dataset` (all with None), keeping `.schema`."""
    if max_users is None or max_users >= len(dataset):
        return dataset
    subset = torch.utils.data.Subset(dataset, range(max_users))
    subset.schema = dataset.schema  # type: ignore[attr-defined]
    return subset


def _train_epoch(model, bundle: OptimizerBundle, dataset, config: RunConfig, epoch: int) -> float:
    """One pass over the training users in a (seed, epoch) order; returns the mean loss."""
    order = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.batch_size, shuffle=True, generator=order,
        collate_fn=BatchCollator(dataset.schema),
    )  # fmt: skip
    model.train()
    losses = []  # on the device: no host synchronization per step
    for batch in loader:
        loss = model(batch)[0].mean()
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(model.dense_parameters()), config.optim.grad_clip)
        for optimizer in bundle.optimizers:
            optimizer.step()
        bundle.scheduler.step()
        bundle.zero_grad()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


def _early_stopped(model, bundle, train, config: RunConfig, validate, score: str, max_epochs: int, patience: int,
                   deadline: _Deadline) -> tuple[int, list[dict[str, float]], str]:  # fmt: skip
    """Train up to `max_epochs` epochs, keeping the weights of the best `validate()[score]` epoch (loaded back at the
    end); returns (best epoch, validation curve from epoch 0, why training stopped)."""
    curve = [{"epoch": 0, **validate()}]
    best = (curve[0][score], 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    stopped, slowest = "max epochs", 0.0
    for epoch in range(1, max_epochs + 1):
        if not deadline.allows(slowest):
            stopped = deadline.reason
            break
        started = time.perf_counter()
        loss = _train_epoch(model, bundle, train, config, epoch)
        curve.append({"epoch": epoch, "loss": loss, **validate()})
        slowest = max(slowest, time.perf_counter() - started)
        print(f"  epoch {epoch} ({slowest:.1f}s max): loss {loss:.4f} valid {score} {curve[-1][score]:.4f}", flush=True)
        if curve[-1][score] > best[0]:
            best = (curve[-1][score], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= patience:
            stopped = "patience"
            break
    model.load_state_dict(best[2])
    return best[1], curve, stopped


def train_with_early_stopping(
    config: RunConfig, max_epochs: int, patience: int, deadline: _Deadline | None = None, max_users: int | None = None
) -> tuple[dict[str, float], int, list[dict[str, float]], RetrievalProtocol, str]:
    """Test metrics at the best validation NDCG@10 epoch, that epoch, the validation curve, the protocol, and why
    training stopped."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    options = config.data.options
    protocol = RetrievalProtocol(
        tie_order=options.get("tie_order", "file"), validation=True,
        max_sequence_length=config.data.max_sequence_length, filter_seen=config.retrieval.eval_exclude_history,
        top_k=(10, 50, 200),
    )  # fmt: skip
    splits = movielens_splits(config.data.path, protocol, ratings_path=options.get("ratings_path"))
    train, valid, test = (_first_users(d, max_users) for d in (splits.train, splits.valid, splits.test))
    device = _device(config)
    model = build_model(config, splits.train.schema, device)
    steps_per_epoch = math.ceil(len(train) / config.data.batch_size)
    bundle = OptimizerBundle(model, config.optim, max_epochs * steps_per_epoch)
    evaluate = functools.partial(
        evaluate_retrieval, model, protocol=protocol, excluded_items=splits.excluded_items,
        batch_size=config.data.eval_batch_size,
    )  # fmt: skip
    best_epoch, curve, stopped = _early_stopped(
        model, bundle, train, config, lambda: evaluate(valid), "ndcg@10", max_epochs, patience,
        deadline or _Deadline(None),
    )  # fmt: skip
    return evaluate(test), best_epoch, curve, protocol, stopped


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run(args: argparse.Namespace) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = _commit()
    deadline = _Deadline(args.time_budget, end_at=args.end_at, handle_sigterm=True)
    rows: list[dict[str, Any]] = []
    curves_out: list[dict[str, Any]] = []
    items = [(name, seed) for name in args.models for seed in args.seeds]
    for index, (name, seed) in enumerate(items):
        if deadline.terminated:
            break
        deadline.start_item(len(items) - index)
        config = load_config(CONFIGS / f"ml1m_retrieval_{name}.yaml", [*args.overrides, f"seed={seed}"])
        started = time.perf_counter()
        print(f"{name} seed {seed}", flush=True)
        test, best_epoch, curve, protocol, stopped = train_with_early_stopping(
            config, args.max_epochs, args.patience, deadline, args.max_users
        )
        facts = {
            "model": name, "dataset": _dataset_name(config.data.options.get("ratings_path")),
            "tie_order": protocol.tie_order, "filter_seen": protocol.filter_seen,
            **{k: round(v, 5) for k, v in test.items()}, "epochs": best_epoch, "seed": seed,
            "device": _device_name(_device(config)), "date": date, "commit": commit,
            "seconds": round(time.perf_counter() - started, 1), "epochs_trained": curve[-1]["epoch"],
            "max_epochs": args.max_epochs, "patience": args.patience, "stopped": stopped,
            "protocol": protocol.describe(),
        }  # fmt: skip
        if args.max_users is not None:
            facts["max_users"] = args.max_users
        rows.append(facts)
        curves_out.append({"model": name, "seed": seed, "valid": curve})
        print(
            f"{name} seed {seed}: best epoch {best_epoch} ({stopped}), test "
            + ", ".join(f"{k} {v:.4f}" for k, v in test.items()),
            flush=True,
        )
        _write(args, rows, curves_out)
    for name in args.models:
        values = [r["hr@10"] for r in rows if r["model"] == name]
        if values:
            print(f"{name}: HR@10 {np.mean(values):.4f} +- {np.std(values):.4f} over {len(values)} seeds")


def _summary(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    summary = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        summary[name] = {
            metric: {"mean": float(np.mean([r[metric] for r in mine])), "std": float(np.std([r[metric] for r in mine]))}
            for metric in metrics
        } | {"seeds": len(mine)}
    return summary


def _run_payload(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr", "epochs")
    return {"rows": rows, "summary": _summary(rows, metrics)}


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], curves_out: list[dict[str, Any]]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(_run_payload(rows), indent=1) + "\n")
    if args.curves:
        Path(args.curves).write_text(json.dumps(curves_out, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------------- ranking

RANKING_TASKS = {"rating>=4": "rating>=4", "rating>=5": "rating==5"}  # ML-1M ratings are integers 1..5
# --models choice: (row name, config overrides). hstu_all_positions trains on every history rating of the same
# training events (each item token scores its own rating before seeing it) instead of the last 8 as candidates;
# dlrm_all_positions trains the DLRM baseline on the same samples (each rating from the user's earlier events).
RANKING_MODELS = {
    "hstu": ("hstu_ranking", []),
    "dlrm": ("dlrm", []),
    "hstu_all_positions": ("hstu_ranking_all_positions", ["data.max_train_candidates=0"]),
    "dlrm_all_positions": ("dlrm_all_positions", ["data.max_train_candidates=0"]),
}


@torch.no_grad()
def evaluate_ranking(model, dataset, batch_size: int) -> dict[str, float]:
    """Per-task AUC (and accuracy, log-loss) of `model` on the candidates of `dataset`, plus "auc/mean"."""
    was_training = model.training
    model.eval()
    task_names = list(dataset.schema.task_names)
    metrics = MultiTaskBinaryMetrics(task_names, sync_dist=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=BatchCollator(dataset.schema))
    for batch in loader:
        result = model.evaluate_batch(batch)
        metrics.update(result["logits"].cpu(), result["labels"].cpu())
    model.train(was_training)
    values = metrics.compute()
    values["auc/mean"] = float(np.mean([values[f"auc/{t}"] for t in task_names]))
    return values


def ranking_splits(config: RunConfig, max_users: int | None = None):
    """(train, validation, test) datasets: test candidates are each user's last `holdout` ratings, validation
    candidates the `holdout` before them, training candidates the ones before those (see the module docstring)."""
    data = config.data
    held_out = dataclasses.replace(data, options={**data.options, "exclude_last_events": data.holdout})
    train = build_train_dataset(held_out, "ranking")
    test = build_train_dataset(data, "ranking").with_split("eval")
    return tuple(_first_users(d, max_users) for d in (train, train.with_split("eval"), test))


def build_dlrm(config: RunConfig, schema, device: torch.device) -> DLRMBaseline:
    """The DLRM baseline with the GR config's width, head widths, activation and table optimizer."""
    table = config.embeddings.default
    betas = table.get("betas", [0.9, 0.999])
    optimizer = EmbeddingOptimizerParam(
        optimizer_str=table.get("optimizer", "adam"),
        learning_rate=float(table.get("learning_rate", config.optim.learning_rate)),
        adam_beta1=float(betas[0]), adam_beta2=float(betas[1]), weight_decay=float(table.get("weight_decay", 0.0)),
    )  # fmt: skip
    return DLRMBaseline(
        schema, config.hstu.hidden_size, config.ranking.prediction_head_hidden, table_optimizer=optimizer,
        activation=config.ranking.activation, device=device,
    )  # fmt: skip


def train_ranking_model(kind: str, config: RunConfig, splits, args: argparse.Namespace, deadline: _Deadline):
    """Build `kind` (a `RANKING_MODELS` key) from `config.seed` and train it with early stopping on the mean validation
    AUC; returns (test metrics at the best epoch, best epoch, validation curve, why it stopped, steps per epoch)."""
    train, valid, test = splits
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = _device(config)
    is_dlrm = kind.startswith("dlrm")
    model = build_dlrm(config, train.schema, device) if is_dlrm else build_model(config, train.schema, device)
    steps_per_epoch = math.ceil(len(train) / config.data.batch_size)
    bundle = OptimizerBundle(model, config.optim, args.max_epochs * steps_per_epoch)
    batch_size = config.data.eval_batch_size
    best_epoch, curve, stopped = _early_stopped(
        model, bundle, train, config, lambda: evaluate_ranking(model, valid, batch_size), "auc/mean",
        args.max_epochs, args.patience, deadline,
    )  # fmt: skip
    return evaluate_ranking(model, test, batch_size), best_epoch, curve, stopped, steps_per_epoch


def ranking(args: argparse.Namespace) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    commit = _commit()
    deadline = _Deadline(args.time_budget, end_at=args.end_at, handle_sigterm=True)
    rows: list[dict[str, Any]] = []
    curves_out: list[dict[str, Any]] = []
    items = [(seed, kind) for seed in args.seeds for kind in args.models]
    for index, (seed, kind) in enumerate(items):
        if deadline.terminated:
            break
        deadline.start_item(len(items) - index)
        config = load_config(args.config, [*args.overrides, *RANKING_MODELS[kind][1], f"seed={seed}"])
        splits = ranking_splits(config, args.max_users)
        started = time.perf_counter()
        print(f"{kind} seed {seed}", flush=True)
        test, best_epoch, curve, stopped, steps = train_ranking_model(kind, config, splits, args, deadline)
        for task, label in RANKING_TASKS.items():
            rows.append({
                "model": RANKING_MODELS[kind][0],
                "dataset": _dataset_name(config.data.options.get("ratings_path")), "task": label,
                "auc": round(test[f"auc/{task}"], 5), "log_loss": round(test[f"logloss/{task}"], 5),
                "seed": seed, "epochs": best_epoch, "epochs_trained": curve[-1]["epoch"],
                "steps_per_epoch": steps, "max_epochs": args.max_epochs, "patience": args.patience,
                "stopped": stopped, "device": _device_name(_device(config)), "date": date, "commit": commit,
                "seconds": round(time.perf_counter() - started, 1), "config": _shown_path(args.config),
                **({"max_users": args.max_users} if args.max_users is not None else {}),
            })  # fmt: skip
        curves_out.append({"model": rows[-1]["model"], "seed": seed, "valid": curve})
        aucs = ", ".join(f"{k} {test[k]:.4f}" for k in sorted(test) if k.startswith("auc"))
        print(f"{kind} seed {seed}: best epoch {best_epoch} ({stopped}), test {aucs}", flush=True)
        _write_ranking(args, rows, curves_out)


def _ranking_payload(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for task in RANKING_TASKS.values():
            values = [r["auc"] for r in rows if r["model"] == model and r["task"] == task]
            summary.setdefault(model, {})[task] = {
                "auc_mean": float(np.mean(values)), "auc_std": float(np.std(values)), "seeds": len(values)
            }  # fmt: skip
    return {"rows": rows, "summary": summary}


def _write_ranking(args: argparse.Namespace, rows: list[dict[str, Any]], curves_out: list[dict[str, Any]]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(_ranking_payload(rows), indent=1) + "\n")
    if args.curves:
        Path(args.curves).write_text(json.dumps(curves_out, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------- merge


def merge(args: argparse.Namespace) -> None:
    """One results file from the files of several `run` or `ranking` processes (rows concatenated, summary
    recomputed), or one curves file (entries concatenated); missing inputs are reported and skipped."""
    present = [Path(p) for p in args.inputs if Path(p).is_file()]
    for missing in sorted(set(args.inputs) - {str(p) for p in present}):
        print(f"merge: {missing} is missing (its process wrote nothing)", flush=True)
    loaded = [json.loads(p.read_text()) for p in present]
    if args.kind == "curves":
        payload: Any = [entry for part in loaded for entry in part]
    else:
        rows = [row for part in loaded for row in part["rows"]]
        payload = _run_payload(rows) if args.kind == "run" else _ranking_payload(rows)
        print(json.dumps(payload["summary"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------- plot


def _curve_name(row: dict[str, Any]) -> str:
    """A per-epoch row's curve: its model, and its tie order where the row names one other than "file"."""
    name = str(row.get("model", row.get("variant", "ours")))
    tie_order = row.get("tie_order", "file")
    return name if tie_order == "file" else f"{name} ({tie_order} tie order)"


def _mean_curves(entries: list[dict[str, Any]], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{curve: (epochs, mean of `metric` over the seeds that reached each epoch)}.

    `entries` are `run`-style curve entries (`{'model', 'seed', 'valid': [per-epoch points]}`) or per-epoch rows
    as `curves` writes them (`{'epoch', metric, 'seed', 'model' or 'variant'[, 'tie_order']}`).
    """
    by_model: dict[str, dict[int, list[float]]] = {}
    for entry in entries:
        points = entry.get("valid", [entry])
        name = entry["model"] if "valid" in entry else _curve_name(entry)
        for point in points:
            if metric in point:
                by_model.setdefault(name, {}).setdefault(int(point["epoch"]), []).append(point[metric])
    return {
        model: (sorted(points), [float(np.mean(points[e])) for e in sorted(points)])
        for model, points in by_model.items()
    }


def _reference_curves(path: str, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list) and data and "valid" in data[0]:
        return {f"reference {m}": c for m, c in _mean_curves(data, metric).items()}
    if isinstance(data, list) and data and "epoch" in data[0]:
        grouped: dict[str, list[dict[str, Any]]] = {}
        for row in data:
            grouped.setdefault(str(row.get("model", "reference")), []).append(row)
        return {
            (name if name.startswith("reference") else f"reference {name}"): (
                [int(r["epoch"]) for r in rows], [float(r[metric]) for r in rows]
            )
            for name, rows in grouped.items()
        }  # fmt: skip
    raise ValueError(
        f"reference curves {path}: expected a JSON list of {{'epoch', '{metric}'[, 'model']}} rows or of "
        "{'model', 'seed', 'valid': [...]} entries"
    )


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _mean_curves(json.loads(Path(args.curves).read_text()), args.metric)
    if not curves:
        raise ValueError(f"{args.curves} has no '{args.metric}' points")
    if args.reference:
        curves |= _reference_curves(args.reference, args.metric)
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, (epochs, values) in curves.items():
        axis.plot(epochs, values, label=name, linestyle="--" if name.startswith("reference") else "-")
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"{args.split} {args.metric.upper()}")
    axis.set_title(args.title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    plt.close(figure)
    print(f"wrote {args.out}: " + ", ".join(f"{n} ({len(e)} epochs)" for n, (e, _) in curves.items()))


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
    k = sub.add_parser("ranking", help="per-task AUC of RankingGR vs a DLRM baseline on ML-1M, same split and seeds")
    k.add_argument("--config", default=str(CONFIGS / "ml1m_ranking.yaml"))
    k.add_argument("--models", nargs="+", default=["hstu", "dlrm"], choices=list(RANKING_MODELS))
    k.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    k.add_argument("--max-epochs", type=int, default=50)
    k.add_argument("--patience", type=int, default=5)
    k.add_argument("--out", required=True)
    k.add_argument("--curves", default=None, help="JSON of the validation curves")
    k.add_argument("overrides", nargs="*", help="key=value overrides of the config (after --)")
    for command in (r, k):
        command.add_argument("--time-budget", type=float, default=None, help="seconds from the process start")
        command.add_argument("--end-at", type=float, default=None, help="Unix time by which training must end")
        command.add_argument("--max-users", type=int, default=None, help="first N users only (smoke runs)")
    p = sub.add_parser("plot", help="validation NDCG@10 by epoch from a curves JSON (and a reference)")
    p.add_argument("--curves", required=True, help="curves JSON of `run`")
    p.add_argument("--reference", default=None, help="reference curves JSON (see the module docstring)")
    p.add_argument("--metric", default="ndcg@10")
    p.add_argument("--split", default="validation", help="the split the curves were evaluated on (axis label)")
    p.add_argument("--title", default="ML-1M (users 1-2999), validation")
    p.add_argument("--out", required=True, help="image file (.png, .svg, ...)")
    m = sub.add_parser("merge", help="merge the JSONs of several run / ranking processes (or their curves)")
    m.add_argument("--kind", required=True, choices=["run", "ranking", "curves"])
    m.add_argument("--out", required=True)
    m.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    {"curves": curves, "run": run, "ranking": ranking, "merge": merge, "plot": plot}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
