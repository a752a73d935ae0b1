"""tools/bench_e2e.py: its step variants train the same model to the same losses on the same batches (CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "tools" / "bench_e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


def _losses(bench, variant, batches: list) -> list[float]:
    torch.manual_seed(0)
    model = bench.build_model(bench.CONFIGS["tiny"], torch.device("cpu"))
    trainer = bench.Trainer(model, torch.device("cpu"))
    prefetcher = bench.Prefetcher(batches, torch.device("cpu")) if variant.prefetch else None
    with bench.attention_host_path(variant.attention_host):
        return [float(trainer.step(prefetcher.next() if prefetcher else batch, variant, None)) for batch in batches]


def test_step_variants_give_the_losses_of_the_trainer_like_step() -> None:
    bench = _bench_module()
    config = bench.CONFIGS["tiny"]
    generator = torch.Generator().manual_seed(3)
    batches = [bench.make_batch(config, "zipf", generator) for _ in range(3)]
    baseline = _losses(bench, bench.VARIANTS[0], batches)
    for variant in bench.VARIANTS[1:]:
        assert _losses(bench, variant, batches) == baseline, variant.name
    assert baseline[0] != baseline[-1]  # the steps train: the same batches' losses move


def test_flops_follow_the_readme_formula() -> None:
    bench = _bench_module()
    config = bench.CONFIGS["tiny"]
    lengths = torch.tensor([3, 5])
    attention = 3.5 * 4 * (6 + 15) * config.heads * config.head_dim
    assert bench.step_flops(config, lengths, (100, 10), 4) == attention + 6 * (100 * 8 + 10 * 4)
