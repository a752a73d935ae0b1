"""`gr-train --config run.yaml [key.sub=value ...]`: train a ranking or retrieval GR and report its metrics."""

from __future__ import annotations

import argparse
import sys

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
    parameters = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"gr-train: {config.name} | task={config.task} model={config.model} device={trainer.device} | "
        f"{len(trainer.train_dataset)} training users, {len(trainer.eval_dataset)} evaluation users | "
        f"{parameters:,} parameters | output {trainer.run_dir}",
        flush=True,
    )
    result = trainer.train()
    throughput = result.throughput
    print(f"\nfinal metrics after {result.step} steps:\n{_format_metrics(result.metrics)}")
    print(
        f"throughput: {throughput['samples_per_s']:.1f} samples/s, {throughput['tokens_per_s']:.0f} tokens/s "
        f"({throughput['train_seconds']:.1f} s of training)"
    )
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
