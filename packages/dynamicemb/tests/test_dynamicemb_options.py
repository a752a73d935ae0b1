"""Table options, eviction aliases and initializers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dynamicemb import (
    DynamicEmbCheckMode,
    DynamicEmbeddingTable,
    DynamicEmbEvictStrategy,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
    PyDictStorage,
)
from dynamicemb.embedding_table import infer_max_capacity
from dynamicemb.initializer import EmbeddingInitializer
from dynamicemb.options import options_to_json


def test_evict_strategy_aliases_are_score_strategies() -> None:
    assert DynamicEmbEvictStrategy.LRU.score_strategy is DynamicEmbScoreStrategy.TIMESTAMP
    assert DynamicEmbEvictStrategy.LFU.score_strategy is DynamicEmbScoreStrategy.LFU
    options = DynamicEmbTableOptions(score_strategy=DynamicEmbEvictStrategy.EPOCH_LRU)
    assert options.score_strategy is DynamicEmbScoreStrategy.STEP
    assert DynamicEmbCheckMode.WARN is DynamicEmbCheckMode.WARNING


def test_defaults_follow_the_seed_api() -> None:
    options = DynamicEmbTableOptions()
    assert options.training and not options.caching
    assert options.initializer_args.mode is DynamicEmbInitializerMode.UNIFORM
    assert options.eval_initializer_args.mode is DynamicEmbInitializerMode.CONSTANT
    assert options.eval_initializer_args.value == 0.0
    assert options.score_strategy is DynamicEmbScoreStrategy.TIMESTAMP
    assert (options.bucket_capacity, options.max_load_factor, options.global_hbm_for_values) == (128, 0.5, 0)
    assert options.safe_check_mode is DynamicEmbCheckMode.IGNORE
    assert options.init_capacity is None and options.max_capacity is None and options.external_storage is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bucket_capacity", 100, "power of two"),
        ("max_load_factor", 0.0, "max_load_factor"),
        ("global_hbm_for_values", -1, "global_hbm_for_values"),
        ("max_capacity", 0, "max_capacity"),
        ("index_type", torch.float32, "index_type"),
    ],
)
def test_bad_options_are_refused(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DynamicEmbTableOptions(**{field: value})


def test_options_serialize_to_json() -> None:
    options = DynamicEmbTableOptions(
        external_storage=PyDictStorage(value_dim=3),
        admit_strategy=FrequencyAdmissionStrategy(4),
        index_type=torch.int32,
        score_strategy=DynamicEmbScoreStrategy.STEP,
    )
    data = json.loads(json.dumps(options_to_json(options)))
    assert data["score_strategy"] == "STEP"
    assert data["initializer_args"]["mode"] == "UNIFORM"
    assert data["external_storage"] == {"type": "PyDictStorage"}
    assert data["admit_strategy"] == {"type": "FrequencyAdmissionStrategy", "threshold": 4}
    assert data["index_type"] == "int32"


def test_capacity_is_inferred_from_num_embeddings() -> None:
    assert infer_max_capacity(1000, 128) == 1024
    assert infer_max_capacity(10, 128) == 128
    assert infer_max_capacity(1000, 128, world_size=3) == 512
    table = DynamicEmbeddingTable(
        name="t", dim=2, num_embeddings=1000, options=DynamicEmbTableOptions(init_capacity=200, bucket_capacity=16)
    )
    assert (table.max_capacity, table.init_capacity, table.capacity) == (1024, 256, 256)


def _draw(args: DynamicEmbInitializerArgs, n: int = 20000, num_embeddings: int = 100) -> torch.Tensor:
    torch.manual_seed(0)
    return EmbeddingInitializer(
        args, dim=8, num_embeddings=num_embeddings, dtype=torch.float32, device=torch.device("cpu")
    )(n)


def test_initializer_modes() -> None:
    constant = _draw(DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.25), n=3)
    assert torch.equal(constant, torch.full((3, 8), 0.25))
    bound = 1 / math.sqrt(100)
    uniform = _draw(DynamicEmbInitializerArgs())  # default UNIFORM in +-1/sqrt(num_embeddings)
    assert uniform.min() >= -bound and uniform.max() <= bound and uniform.max() > 0.9 * bound
    explicit = _draw(DynamicEmbInitializerArgs(lower=2.0, upper=3.0))
    assert explicit.min() >= 2.0 and explicit.max() <= 3.0
    normal = _draw(DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL, mean=1.0, std_dev=0.5))
    assert abs(normal.mean().item() - 1.0) < 0.01 and abs(normal.std().item() - 0.5) < 0.01
    truncated = _draw(
        DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.TRUNCATED_NORMAL, std_dev=1.0, lower=-0.5, upper=1.0)
    )
    assert truncated.min() >= -0.5 and truncated.max() <= 1.0 and truncated.std() > 0.3
    bf16 = EmbeddingInitializer(
        DynamicEmbInitializerArgs(), dim=8, num_embeddings=4, dtype=torch.bfloat16, device=torch.device("cpu")
    )(2)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (2, 8)


def test_initializer_args_are_validated() -> None:
    with pytest.raises(ValueError, match="std_dev"):
        DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL, std_dev=-1.0)
    with pytest.raises(ValueError, match="lower"):
        DynamicEmbInitializerArgs(lower=1.0, upper=0.0)
