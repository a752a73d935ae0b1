"""`gr-train --config run.yaml [key.sub=value ...]`: train a ranking or retrieval GR and report its metrics.

`--print-config` prints the merged config and exits; `--eval-only` evaluates a checkpoint instead of training
(see `gr_models.eval_cli`). Errors in the config, the data or a checkpoint are printed as one line (the full
traceback with `--debug`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

import gr_parallel
from gr_models.logs import LOG_LEVELS, configure_logging
from gr_models.trainer import Trainer, load_config
from gr_models.trainer.config import RunConfig, config_to_yaml
from gr_models.trainer.config_checks import describe_config

_log = logging.getLogger("gr_models.cli")

# what a user can cause: bad config keys or values, bad or missing data files, bad checkpoints, unsupported setups
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    NotImplementedError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
)


def config_help() -> str:
    """The config sections and keys with their defaults, generated from the `RunConfig` dataclasses."""
    return "config keys (section.key = default  (type; allowed values)), set in the YAML file or as overrides:\n" + (
        "\n".join(describe_config(RunConfig))
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, the overrides, `--log-level` and `--debug` (shared by gr-train, gr-eval and gr-export)."""
    parser.add_argument("--config", help="YAML run configuration (see packages/gr-models/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the file")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="gr_models' log level (INFO)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr-train",
        description="Train a generative recommender (HSTU ranking/retrieval GR or the SASRec baseline).\n"
        "Overrides use dotted keys, e.g.  train.max_steps=50 device=cuda hstu.num_layers=4",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate a checkpoint (--checkpoint DIR, default the run's newest) and write its metrics to a new "
        "file under <output_dir>/eval/ instead of training",
    )
    parser.add_argument("--checkpoint", help="with --eval-only: the checkpoint directory to evaluate")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint of output_dir, an error when there is none (without --resume a "
        "run resumes when train.resume is on, the default, and a checkpoint exists)",
    )
    return parser


def run_reporting_errors(prog: str, debug: bool, action: Callable[[], int]) -> int:
    """Run `action`; a user error (`USER_ERRORS`) becomes one line on stderr and exit status 2 (re-raised with
    `debug`)."""
    try:
        return action()
    except USER_ERRORS as error:
        if debug:
            raise
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}{where}: error: {message}  (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    return run_reporting_errors("gr-train", args.debug, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    if args.eval_only:
        from gr_models.eval_cli import evaluate_and_report

        return evaluate_and_report(config, args.checkpoint)
    if args.checkpoint:
        raise ValueError("--checkpoint is for --eval-only (training resumes from output_dir's newest checkpoint)")
    if args.resume:
        _require_checkpoint(config)
    trainer = Trainer(config)
    try:
        _train(trainer)
    finally:
        if trainer.world.owns_process_group:
            gr_parallel.destroy_global_state()
    return 0


def _require_checkpoint(config: RunConfig) -> None:
    """`--resume`: turn `train.resume` on, and fail (before any process group) when there is nothing to resume."""
    import gr_checkpoint
    from gr_models.trainer.trainer import CHECKPOINT_DIR

    config.train.resume = True
    root = config.run_dir / CHECKPOINT_DIR
    if gr_checkpoint.latest_checkpoint(root) is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root} (output_dir={config.run_dir})")


def format_metrics(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items()))


def _train(trainer: Trainer) -> None:
    """Train, logging the run's header and printing its results on rank 0 only."""
    config, world = trainer.config, trainer.world
    parameters = sum(p.numel() for p in trainer.model.parameters())
    layout = f"{world.world_size} processes (tensor parallel {world.world_size // world.dp_size}) | "
    if world.is_main:
        _log.info(
            "gr-train: %s | task=%s model=%s device=%s | %s%d training users, %d evaluation users | "
            "%s parameters on rank 0 | output %s",
            config.name, config.task, config.model, trainer.device, layout if world.world_size > 1 else "",
            len(trainer.train_dataset), len(trainer.eval_dataset), f"{parameters:,}", trainer.run_dir,
        )  # fmt: skip
    if world.world_size > 1 and world.is_main:
        placement = trainer.model.embedding.table_placement()
        _log.info(
            "embedding tables: %s",
            "; ".join(
                f"{kind} {sorted(n for n, k in placement.items() if k == kind)}" for kind in ("sharded", "replicated")
            ),
        )
    result = trainer.train()
    if not world.is_main:
        return
    throughput = result.throughput
    print(f"\nfinal metrics after {result.step} steps:\n{format_metrics(result.metrics)}")
    print(
        f"throughput: {throughput['samples_per_s']:.1f} samples/s, {throughput['tokens_per_s']:.0f} tokens/s "
        f"({throughput['train_seconds']:.1f} s of training)"
    )
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
