"""tools/quality.py on small ML-1M slices: the DLRM ranking baseline (features, no fbgemm op, it learns), the AUC the
ranking runner reports (against brute force), the time budget, `run` and `ranking` end to end, and `plot`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gr_models.data.collate import BatchCollator, collate_samples
from gr_models.data.sample import SequenceSample
from gr_models.data.schema import DatasetSchema
from gr_models.model import DLRMBaseline

ROOT = Path(__file__).resolve().parents[3]
ML1M = ROOT.parent / "shared" / "data" / "ml-1m"
needs_ml1m = pytest.mark.skipif(
    not (ML1M / "partial" / "ratings_users0001-2999.dat.gz").is_file(), reason="the shared ML-1M copy is absent"
)
SMALL = ["device=cpu", f"data.path={ML1M}", "data.max_sequence_length=24", "data.batch_size=32"]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "tools" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module
    spec.loader.exec_module(module)
    return module


SCHEMA = DatasetSchema(
    kind="ranking", item_feature_name="item", vocab_sizes={"user": 5, "item": 20, "genre": 4, "action": 4},
    max_sequence_length=10, contextual_feature_names=("user",), contextual_max_lengths={"user": 1},
    action_feature_name="action", side_feature_names=("genre",), max_num_candidates=2, task_names=("a", "b"),
)  # fmt: skip


def _batch():
    samples = [
        SequenceSample({"user": np.array([1])}, {"item": np.array([3, 4, 5, 6]), "action": np.array([1, 2, 3, 0]),
                                                 "genre": np.array([1, 2, 3, 1])}, num_candidates=2),
        SequenceSample({"user": np.array([2])}, {"item": np.array([7, 8]), "action": np.array([3, 1]),
                                                 "genre": np.array([2, 2])}, num_candidates=1),
    ]  # fmt: skip
    return collate_samples(samples, SCHEMA)


def test_dlrm_features_are_the_candidate_and_its_users_history_never_a_candidate_action() -> None:
    features = DLRMBaseline(SCHEMA, 8, [16]).candidate_features(_batch()).to_dict()
    assert features["user"].values().tolist() == [1, 1, 2]
    assert features["item"].values().tolist() == [5, 6, 8]
    assert features["genre"].values().tolist() == [3, 1, 2]
    assert features["history_item"].values().tolist() == [3, 4, 3, 4, 7]
    assert features["history_item"].lengths().tolist() == [2, 2, 1]
    assert features["history_genre"].values().tolist() == [1, 2, 1, 2, 2]
    assert features["history_action"].values().tolist() == [1, 2, 1, 2, 3]  # candidate actions 3, 0, 1 are labels


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def test_dlrm_calls_no_fbgemm_op() -> None:
    """The GPU machine has fbgemm-gpu-cpu only: an fbgemm op there would have no CUDA kernel."""
    model = DLRMBaseline(SCHEMA, 8, [16])
    with _OpRecorder() as recorder:
        losses, _ = model(_batch())
        losses.mean().backward()
    assert "aten" in recorder.namespaces and "fbgemm" not in recorder.namespaces, recorder.namespaces


def _brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(wins / (len(positives) * len(negatives)))


@needs_ml1m
@pytest.mark.slow
def test_dlrm_learns_on_a_slice_and_the_reported_auc_is_right(quality) -> None:
    config = quality.load_config(quality.CONFIGS / "ml1m_ranking.yaml", SMALL)
    train, valid, test = quality.ranking_splits(config, max_users=400)
    assert len(train) == len(test) == 400
    args = argparse.Namespace(max_epochs=4, patience=4)
    metrics, best_epoch, curve, stopped, steps = quality.train_ranking_model(
        "dlrm", config, (train, valid, test), args, quality._Deadline(None)
    )
    assert steps == 13 and stopped == "max epochs" and len(curve) == 5
    assert {"auc/rating>=4", "auc/rating>=5", "logloss/rating>=4"} <= set(metrics)
    assert curve[-1]["loss"] < curve[1]["loss"] - 0.01, [c["loss"] for c in curve[1:]]
    assert curve[best_epoch]["auc/mean"] > curve[0]["auc/mean"] + 0.02
    torch.manual_seed(0)
    model = quality.build_dlrm(config, train.schema, torch.device("cpu"))
    reported = quality.evaluate_ranking(model, test, batch_size=64)
    loader = torch.utils.data.DataLoader(test, batch_size=64, collate_fn=BatchCollator(test.schema))
    outputs = [model.evaluate_batch(b) for b in loader]
    logits = torch.cat([o["logits"] for o in outputs]).numpy()
    labels = torch.cat([o["labels"] for o in outputs]).numpy()
    for task, name in enumerate(test.schema.task_names):
        assert reported[f"auc/{name}"] == pytest.approx(_brute_force_auc(logits[:, task], labels[:, task]), abs=1e-9)


@needs_ml1m
@pytest.mark.slow
def test_dlrm_learns_from_every_training_rating(quality) -> None:
    """`dlrm_all_positions`: training batches without candidates (every rating scored from the earlier ones),
    evaluation on the held-out candidates as the other models."""
    overrides = quality.RANKING_MODELS["dlrm_all_positions"][1]
    config = quality.load_config(quality.CONFIGS / "ml1m_ranking.yaml", [*SMALL, *overrides])
    splits = quality.ranking_splits(config, max_users=200)
    assert collate_samples([splits[0][0]], splits[0].schema).num_candidates is None
    args = argparse.Namespace(max_epochs=2, patience=4)
    metrics, _, curve, stopped, _ = quality.train_ranking_model(
        "dlrm_all_positions", config, splits, args, quality._Deadline(None)
    )
    assert stopped == "max epochs" and len(curve) == 3 and curve[2]["loss"] < curve[1]["loss"]
    assert curve[2]["auc/mean"] > curve[0]["auc/mean"] + 0.02, [c["auc/mean"] for c in curve]
    assert {"auc/rating>=4", "auc/rating>=5"} <= set(metrics)


def test_time_budget_stops_before_an_epoch_that_would_not_fit(quality) -> None:
    assert quality._Deadline(None).allows(1e9)
    deadline = quality._Deadline(10.0)
    assert deadline.allows(1.0) and not deadline.allows(7.0)  # 1.5 x 7 s > 10 s
    deadline.start_item(2)  # the first of two runs gets half of the time left
    assert deadline.allows(3.0) and not deadline.allows(4.0) and deadline.reason == "time budget"


@needs_ml1m
def test_run_and_ranking_write_their_rows_and_plot_draws_the_curves(quality, tmp_path: Path) -> None:
    common = ["--seeds", "1", "--max-epochs", "1", "--max-users", "40"]
    quality.main(["run", "--models", "sasrec_full_softmax", *common, "--out", str(tmp_path / "run.json"),
                  "--curves", str(tmp_path / "curves.json"), "--", *SMALL])  # fmt: skip
    rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    assert [(r["model"], r["seed"], r["max_users"]) for r in rows] == [("sasrec_full_softmax", 1, 40)]
    assert 0 <= rows[0]["hr@10"] <= rows[0]["hr@50"] <= 1 and rows[0]["dataset"] == "ML-1M (users 1-2999)"
    quality.main(["ranking", "--models", "dlrm", *common, "--out", str(tmp_path / "ranking.json"), "--", *SMALL])
    ranking = json.loads((tmp_path / "ranking.json").read_text())["rows"]
    assert [(r["model"], r["task"]) for r in ranking] == [("dlrm", "rating>=4"), ("dlrm", "rating==5")]
    assert all(0 < r["auc"] < 1 for r in ranking)
    assert {r["config"] for r in ranking} == {"packages/gr-models/configs/ml1m_ranking.yaml"}  # no machine path
    (tmp_path / "reference.json").write_text(json.dumps([{"epoch": 0, "ndcg@10": 0.0}, {"epoch": 1, "ndcg@10": 0.1}]))
    quality.main(["plot", "--curves", str(tmp_path / "curves.json"), "--reference", str(tmp_path / "reference.json"),
                  "--out", str(tmp_path / "plot.png")])  # fmt: skip
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_mean_curves_average_per_epoch_rows_over_seeds_per_model_and_tie_order(quality) -> None:
    rows = [
        {"variant": "shipped", "model": "hstu", "seed": 1, "epoch": 1, "hr@10": 0.10},
        {"variant": "shipped", "model": "hstu", "seed": 2, "epoch": 1, "hr@10": 0.20},
        {"variant": "shipped", "model": "hstu", "seed": 1, "epoch": 2, "hr@10": 0.30},
        {"model": "hstu", "tie_order": "reference", "seed": 1, "epoch": 1, "hr@10": 0.40},
        {"variant": "xavier", "seed": 1, "epoch": 1, "ndcg@10": 0.5},
    ]
    curves = quality._mean_curves(rows, "hr@10")
    assert set(curves) == {"hstu", "hstu (reference tie order)"}
    assert curves["hstu"][0] == [1, 2] and curves["hstu"][1] == pytest.approx([0.15, 0.30])
    assert curves["hstu (reference tie order)"] == ([1], [0.40])
    run_entries = [{"model": "sasrec", "seed": 1, "valid": [{"epoch": 1, "hr@10": 0.2}, {"epoch": 2, "hr@10": 0.4}]}]
    assert quality._mean_curves(run_entries, "hr@10") == {"sasrec": ([1, 2], [0.2, 0.4])}
