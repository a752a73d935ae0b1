"""In one process: what a GR model does about the world it is built in (the multi-process runs are in
test_trainer_distributed.py and integration_tests/test_tutorial_torchrun.py)."""

from __future__ import annotations

import pytest
import torch

import gr_models.model.base as base
from gr_models.configs import KernelBackend, RankingConfig, ShardedEmbeddingConfig, get_hstu_config
from gr_models.data.utils import FeatureConfig, RankingBatch
from gr_models.model.ranking_gr import RankingGR
from gr_models.modules.embedding_sharding import fused_tables_unsupported_reason


def _model() -> RankingGR:
    hstu = get_hstu_config(8, 4, 2, 1, dtype=torch.float32, kernel_backend=KernelBackend.PYTORCH)
    return RankingGR(hstu, RankingConfig([ShardedEmbeddingConfig(["item"], "item", 20, 8)], [[4, 1]]), device="cpu")


def _batch() -> RankingBatch:
    return RankingBatch.random(4, [FeatureConfig(["item"], [20], 6)], "item", max_num_candidates=2)


def test_a_model_built_in_one_process_stays_whole() -> None:
    model = _model()
    assert not model.is_distributed
    assert model.embedding.table_placement() == {"item": "local"}
    losses, _ = model(_batch())
    assert torch.isfinite(losses).all()


def test_a_model_built_before_the_process_group_refuses_to_train_a_silent_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    monkeypatch.setattr(base, "_world_size", lambda: 2)  # as if gr_parallel.initialize_distributed() ran since
    with pytest.raises(RuntimeError, match=r"built before the process group of 2 ranks existed.*after"):
        model(_batch())


def test_static_tables_are_sharded_only_where_fbgemm_can_train_them() -> None:
    cpu = torch.device("cpu")
    assert fused_tables_unsupported_reason(cpu, "rowwise_adagrad") is None
    assert fused_tables_unsupported_reason(cpu, "sgd") is None
    assert "no fused adam" in fused_tables_unsupported_reason(cpu, "adam")
