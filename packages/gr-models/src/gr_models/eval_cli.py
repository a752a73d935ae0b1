"""`gr-eval --checkpoint DIR [--config run.yaml] [key.sub=value ...]`: evaluate a checkpoint on a data set.

The run config comes from the checkpoint (gr-train stores it there) unless `--config` is given; overrides apply
on top (e.g. `data.path=other.parquet train.eval_batches=null`). The metrics go to a new JSON file
(`<run>/eval/<checkpoint>.json` for a checkpoint `<run>/checkpoints/<checkpoint>`, else under `output_dir`; or
`<checkpoint>-2.json` ... when that exists; or `--out`); the training
run's `metrics.json` is never touched, and an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gr_parallel
from gr_models.logs import configure_logging
from gr_models.trainer import Trainer, load_config
from gr_models.trainer.config import RunConfig, config_from_tree
from gr_models.trainer.config_checks import ConfigError

__all__ = ["checkpoint_config", "evaluate_and_report", "evaluate_checkpoint", "main", "new_metrics_path"]

_log = logging.getLogger("gr_models.eval")


def checkpoint_config(checkpoint: Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config stored in a gr-train checkpoint's extra state, with `overrides` applied and checked."""
    from gr_checkpoint.extra_state import read_extra_state

    if not (checkpoint / "manifest.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no manifest.json)")
    state = read_extra_state(checkpoint) if (checkpoint / "extra_state.pt").is_file() else None
    tree = state.get("config") if isinstance(state, dict) else None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"checkpoint {checkpoint} holds no run config (written before gr-train stored it): pass --config"
        )
    return config_from_tree(tree, overrides)


def new_metrics_path(directory: Path, stem: str) -> Path:
    """`directory/<stem>.json`, or `<stem>-2.json`, `<stem>-3.json` ...: the first name not yet taken."""
    directory.mkdir(parents=True, exist_ok=True)
    candidate, number = directory / f"{stem}.json", 1
    while candidate.exists():
        number += 1
        candidate = directory / f"{stem}-{number}.json"
    return candidate


def _eval_dir(checkpoint: Path, run_dir: Path) -> Path:
    """`<run>/eval` next to `<run>/checkpoints/<checkpoint>` (where the run directory is now), else under
    `run_dir`."""
    if checkpoint.resolve().parent.name == "checkpoints":
        return checkpoint.resolve().parent.parent / "eval"
    return run_dir / "eval"


def _write_new(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as JSON to `path`, which must not exist (opened exclusively)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
    return path


def evaluate_checkpoint(config: RunConfig, checkpoint: Path | None = None) -> tuple[dict[str, float], Path, Trainer]:
    """Build the model of `config`, load `checkpoint` (default: the newest of `config.output_dir`) and evaluate it
    on the config's evaluation split (`train.eval_batches` batches per rank, None: all). Returns the metrics, the
    checkpoint used and the trainer (its `world` is initialized; the caller tears it down)."""
    import gr_checkpoint

    trainer = Trainer(config)
    path = Path(checkpoint) if checkpoint is not None else trainer.latest_checkpoint()
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {trainer.run_dir / 'checkpoints'}: pass --checkpoint DIR")
    gr_checkpoint.load(path, trainer.model)
    return trainer.evaluate(), path, trainer


def evaluate_and_report(config: RunConfig, checkpoint: str | Path | None, out: str | Path | None = None) -> int:
    """Evaluate, print the metrics and write them to a new file (rank 0); returns the exit status."""
    from gr_models.cli import format_metrics

    started = time.perf_counter()
    metrics, path, trainer = evaluate_checkpoint(config, Path(checkpoint) if checkpoint is not None else None)
    try:
        if not trainer.world.is_main:
            return 0
        target = Path(out) if out is not None else new_metrics_path(_eval_dir(path, trainer.run_dir), path.name)
        payload = {
            "checkpoint": str(path.resolve()),
            "dataset": config.data.dataset,
            "data_path": config.data.path,
            "eval_batches": config.train.eval_batches,
            "device": str(trainer.device),
            "world_size": trainer.world.world_size,
            "seconds": time.perf_counter() - started,
            "metrics": metrics,
            "config": config.to_dict(),
        }
        _write_new(target, payload)
        print(f"metrics of {path}:\n{format_metrics(metrics)}\nwritten to {target}", flush=True)
        return 0
    finally:
        if trainer.world.owns_process_group:
            gr_parallel.destroy_global_state()


def _parser() -> argparse.ArgumentParser:
    from gr_models.cli import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="gr-eval",
        description="Evaluate a gr-train checkpoint; the metrics go to a new JSON file (never overwriting one).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/NAME/checkpoints/step_N)")
    parser.add_argument("--out", help="metrics file to create (default <output_dir>/eval/<checkpoint>.json)")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gr_models.cli import run_reporting_errors

    args = _parser().parse_args(argv)
    configure_logging(args.log_level)

    def run() -> int:
        checkpoint = Path(args.checkpoint)
        if args.out is not None and Path(args.out).exists():
            raise FileExistsError(f"--out {args.out} exists; gr-eval never overwrites a metrics file")
        if args.config is not None:
            config = load_config(args.config, args.overrides)
        else:
            config = checkpoint_config(checkpoint, args.overrides)
        with torch.no_grad():
            return evaluate_and_report(config, checkpoint, args.out)

    return run_reporting_errors("gr-eval", args.debug, run)


if __name__ == "__main__":
    sys.exit(main())
