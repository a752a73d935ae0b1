"""`gr-train --config run.yaml [key.sub=value ...]`: train a ranking or retrieval GR and report its metrics."""

from __future__ import annotations

import argparse
import sys

import gr_parallel
from gr_models.trainer import Trainer, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr-train",
        description="Train a generative recommender (HSTU ranking/retrieval GR or the SASRec baseline).",
        epilog="Overrides use dotted keys, e.g.  train.max_steps=50 device=cuda hstu.num_layers=4",
    )
    parser.add_argument("--config", help="YAML run configuration (see packages/gr-models/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the file")
    return parser


def _format_metrics(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items()))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    try:
        _train(trainer)
    finally:
        if trainer.world.owns_process_group:
            gr_parallel.destroy_global_state()
    return 0


def _train(trainer: Trainer) -> None:
    """Train, printing the run's header and results on rank 0 only."""
    config, world = trainer.config, trainer.world
    say = print if world.is_main else _silent
    parameters = sum(p.numel() for p in trainer.model.parameters())
    layout = f"{world.world_size} processes (tensor parallel {world.world_size // world.dp_size}) | "
    say(
        f"gr-train: {config.name} | task={config.task} model={config.model} device={trainer.device} | "
        f"{layout if world.world_size > 1 else ''}"
        f"{len(trainer.train_dataset)} training users, {len(trainer.eval_dataset)} evaluation users | "
        f"{parameters:,} parameters on rank 0 | output {trainer.run_dir}",
        flush=True,
    )
    if world.world_size > 1:
        placement = trainer.model.embedding.table_placement()
        say(
            "embedding tables: "
            + "; ".join(
                f"{kind} {sorted(n for n, k in placement.items() if k == kind)}" for kind in ("sharded", "replicated")
            )
        )
    result = trainer.train()
    throughput = result.throughput
    say(f"\nfinal metrics after {result.step} steps:\n{_format_metrics(result.metrics)}")
    say(
        f"throughput: {throughput['samples_per_s']:.1f} samples/s, {throughput['tokens_per_s']:.0f} tokens/s "
        f"({throughput['train_seconds']:.1f} s of training)"
    )
    for kind, path in result.files.items():
        say(f"{kind}: {path}")


def _silent(*args: object, **kwargs: object) -> None:
    """`print` on ranks other than 0."""


if __name__ == "__main__":
    sys.exit(main())
