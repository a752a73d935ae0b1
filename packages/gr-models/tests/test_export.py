"""gr-export: the exported program + table snapshot + loader, run in a fresh process that does not import gr_models,
give exactly (fp32, bitwise) the checkpoint's evaluation scores, for ranking (dynamic item table, contextual
features, time encoding, relative time bias) and retrieval; unsupported models and existing outputs are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gr_checkpoint
from gr_models.cli import main as gr_train
from gr_models.data.collate import collate_samples
from gr_models.eval_cli import checkpoint_config
from gr_models.export import batch_features
from gr_models.export.cli import main as gr_export
from gr_models.logs import remove_logging
from gr_models.metrics.classification import MultiTaskBinaryMetrics
from gr_models.trainer import Trainer

COMMON = [
    "device=cpu",
    "data.options={num_users: 40, num_items: 30, num_clusters: 2, min_events: 6, max_events: 12}",
    "data.max_sequence_length=10",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "hstu.hidden_size=8",
    "hstu.kv_channels=4",
    "hstu.num_layers=2",
    "hstu.kernel_backend=pytorch",
    "train.max_steps=4",
    "train.eval_every=0",
    "train.checkpoint_every=4",
    "train.progress_bar=false",
]
RANKING = [
    "task=ranking",
    "data.holdout=2",
    "data.max_train_candidates=2",
    "hstu.position_encoding={use_time_encoding: true, time_bucket_fn: log}",
    "hstu.relative_bias={max_relative_position: 16, use_time: true}",
    "embeddings.tables={item_id: {type: dynamic, capacity: 64}}",
]
RETRIEVAL = ["task=retrieval", "retrieval.num_negatives=8", "embeddings.default={optimizer: adam}"]

SCORE_IN_FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import loader
scorer = loader.load(sys.argv[1])
results = [scorer.score(features, num_candidates) for features, num_candidates in torch.load(sys.argv[2])]
assert "gr_models" not in sys.modules, "the loader imported gr_models"
torch.save(results, sys.argv[3])
"""


@pytest.fixture(autouse=True)
def _drop_cli_logging() -> Iterator[None]:
    yield
    remove_logging()


def _train_and_export(tmp_path: Path, overrides: list[str]) -> tuple[Trainer, Path]:
    """Train 4 steps with gr-train, export the checkpoint with gr-export; the trainer holds the checkpoint's model."""
    run_dir = tmp_path / "run"
    assert gr_train([*COMMON, *overrides, f"output_dir={run_dir}"]) == 0
    checkpoint = run_dir / "checkpoints" / "step_4"
    out = tmp_path / "export"
    assert gr_export(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loader.py", "metadata.json", "program.pt2", "tables.pt"]
    trainer = Trainer(checkpoint_config(checkpoint))
    gr_checkpoint.load(checkpoint, trainer.model)
    trainer.model.eval()
    return trainer, out


def _eval_batches(trainer: Trainer) -> list:
    """The whole evaluation split in batches of 16, and two odd sizes (one user, seven users)."""
    dataset = trainer.eval_dataset
    starts = list(range(0, len(dataset), 16))
    chunks = [range(s, min(s + 16, len(dataset))) for s in starts] + [range(3, 4), range(5, 12)]
    return [collate_samples([dataset[i] for i in chunk], dataset.schema) for chunk in chunks]


def _score_in_fresh_process(tmp_path: Path, out: Path, batches: list) -> list:
    inputs, results = tmp_path / "batches.pt", tmp_path / "scores.pt"
    torch.save([(batch_features(b), b.num_candidates) for b in batches], inputs)
    script = tmp_path / "score.py"
    script.write_text(SCORE_IN_FRESH_PROCESS)
    subprocess.run([sys.executable, str(script), str(out), str(inputs), str(results)], check=True, timeout=300)
    return torch.load(results)


@pytest.mark.slow
def test_ranking_export_reproduces_the_checkpoint_evaluation_exactly(tmp_path: Path) -> None:
    trainer, out = _train_and_export(tmp_path, RANKING)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["time_encoding"] and meta["token_times"] and meta["contextual_len"] == 2  # these paths are covered
    assert set(torch.load(out / "tables.pt")[meta["table_of"]["item_id"]]) == {"keys", "values", "missing"}
    batches = _eval_batches(trainer)
    exported = _score_in_fresh_process(tmp_path, out, batches)
    task_names = list(trainer.eval_dataset.schema.task_names)
    metrics = MultiTaskBinaryMetrics(task_names)
    full_split = len(batches) - 2
    with torch.no_grad():
        for index, (batch, logits) in enumerate(zip(batches, exported)):
            expected = trainer.model.evaluate_batch(batch)
            assert torch.equal(logits, expected["logits"]), f"batch {index}"
            if index < full_split:
                metrics.update(logits, expected["labels"])
    assert metrics.compute() == trainer.evaluate(max_batches=None)


def test_retrieval_export_reproduces_the_checkpoint_scores_exactly(tmp_path: Path) -> None:
    trainer, out = _train_and_export(tmp_path, RETRIEVAL)
    batches = _eval_batches(trainer)
    exported = _score_in_fresh_process(tmp_path, out, batches)
    with torch.no_grad():
        for index, (batch, (scores, users)) in enumerate(zip(batches, exported)):
            expected = trainer.model.evaluate_batch(batch)
            assert users.tolist() == list(range(batch.batch_size))  # every user has history in these batches
            assert torch.equal(scores, expected["scores"]), f"batch {index}"


def test_sasrec_and_existing_outputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    overrides = [*COMMON, *RETRIEVAL, "model=sasrec", "train.max_steps=1", "train.checkpoint_every=1"]
    assert gr_train([*overrides, f"output_dir={run_dir}"]) == 0
    checkpoint = str(run_dir / "checkpoints" / "step_1")
    capsys.readouterr()
    assert gr_export(["--checkpoint", checkpoint, "--out", str(tmp_path / "x")]) == 2
    assert "export supports RankingGR and RetrievalGR (HSTU), not SASRec" in capsys.readouterr().err
    assert gr_export(["--checkpoint", checkpoint, "--out", str(run_dir)]) == 2
    assert "exists; gr-export writes a new directory" in capsys.readouterr().err
