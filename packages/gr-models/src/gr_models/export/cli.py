"""`gr-export --checkpoint DIR --out PATH [--config run.yaml] [key.sub=value ...]`: export a checkpoint for serving.

The run config comes from the checkpoint (or `--config`), the model is rebuilt on the CPU in one process, the
checkpoint loaded, and `gr_models.export.export_model` writes `PATH/` (program.pt2, tables.pt, metadata.json,
loader.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from gr_models.logs import configure_logging

__all__ = ["main"]

_log = logging.getLogger("gr_models.export")


def _parser() -> argparse.ArgumentParser:
    from gr_models.cli import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="gr-export",
        description="Export a gr-train checkpoint (RankingGR or RetrievalGR) as a torch.export program, a snapshot "
        "of its embedding tables and a loader that scores batches.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. runs/NAME/checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="directory to create for the export")
    parser.add_argument("--users", type=int, default=8, help="evaluation users of the batch traced (8)")
    add_common_arguments(parser)
    return parser


def export_checkpoint(checkpoint: Path, out: Path, config_path: str | None, overrides: list[str], users: int) -> Path:
    """Rebuild the run's model on the CPU, load `checkpoint` into it and export it to `out`."""
    import gr_checkpoint
    from gr_models.eval_cli import checkpoint_config
    from gr_models.export.exporter import export_model
    from gr_models.trainer import build_model, build_train_dataset, load_config

    if out.exists():
        raise FileExistsError(f"--out {out} exists; gr-export writes a new directory")
    overrides = [*overrides, "device=cpu"]
    if config_path is not None:
        config = load_config(config_path, overrides)
    else:
        config = checkpoint_config(checkpoint, overrides)
    dataset = build_train_dataset(config.data, config.task)
    model = build_model(config, dataset.schema, torch.device("cpu"))
    gr_checkpoint.load(checkpoint, model)
    return export_model(model, dataset, out, users=users)


def main(argv: list[str] | None = None) -> int:
    from gr_models.cli import run_reporting_errors

    args = _parser().parse_args(argv)
    configure_logging(args.log_level)

    def run() -> int:
        written = export_checkpoint(Path(args.checkpoint), Path(args.out), args.config, args.overrides, args.users)
        _log.info("exported %s to %s", args.checkpoint, written)
        print(f"export written to {written}: program.pt2, tables.pt, metadata.json, loader.py", flush=True)
        return 0

    return run_reporting_errors("gr-export", args.debug, run)


if __name__ == "__main__":
    sys.exit(main())
