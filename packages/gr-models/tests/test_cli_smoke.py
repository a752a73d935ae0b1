"""`gr-train` end to end: a 20-step run from a YAML file with overrides prints metrics and writes its records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gr_models.cli import main
from gr_models.logs import remove_logging


@pytest.fixture(autouse=True)
def _drop_cli_logging() -> Iterator[None]:
    """main() installs a log handler on the stdout of its test; remove it so later tests do not write there."""
    yield
    remove_logging()


CONFIG = """
name: smoke
task: ranking
device: cpu
data:
  dataset: synthetic
  options: {num_users: 96, num_items: 40, num_clusters: 2, min_events: 6, max_events: 20, num_tasks: 2}
  max_sequence_length: 12
  holdout: 2
  max_train_candidates: 2
  batch_size: 16
hstu: {hidden_size: 16, kv_channels: 8, num_attention_heads: 2, num_layers: 1}
optim: {learning_rate: 3e-3, warmup_steps: 2, schedule: linear}
train: {max_steps: 20, eval_every: 10, log_every: 5, checkpoint_every: 10}
"""


def test_gr_train_runs_twenty_steps_and_writes_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "smoke.yaml"
    config.write_text(CONFIG)
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), f"output_dir={run_dir}", "train.progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert "final metrics after 20 steps" in out
    assert "auc/click" in out and "auc/quality_1" in out
    assert "samples/s" in out and "tokens/s" in out

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["step"] == 20
    assert set(record["metrics"]) >= {"auc/click", "auc/quality_1", "logloss/click", "accuracy/click"}
    assert record["throughput"]["samples_per_s"] > 0
    assert [s for s, _ in record["history"]["train/loss"]] == [5, 10, 15, 20]
    assert [s for s, _ in record["history"]["eval/auc/click"]] == [0, 10, 20]
    assert record["config"]["optim"]["learning_rate"] == pytest.approx(3e-3)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_10", "step_20"]


def test_gr_train_rejects_unknown_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train: {max_step: 3}\n")
    assert main(["--config", str(config)]) == 2
    assert "unknown config key(s) ['max_step'] in 'train'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['max_step'\] in 'train'"):
        main(["--config", str(config), "--debug"])
