"""Configs: defaults and clear errors on bad values."""

from __future__ import annotations

import pytest
import torch

from gr_models.configs import (
    DynamicShardedEmbeddingConfig,
    EmbeddingOptimizerParam,
    KernelBackend,
    RankingConfig,
    RetrievalConfig,
    ShardedEmbeddingConfig,
    get_hstu_config,
)
from gr_models.utils.tensor_initializer import (
    ConstantInitializer,
    NormalInitializer,
    TruncatedNormalInitializer,
    UniformInitializer,
    XavierUniformInitializer,
)


def _table(name: str = "item", features=("item",), **kwargs) -> ShardedEmbeddingConfig:
    return ShardedEmbeddingConfig(feature_names=list(features), table_name=name, vocab_size=10, dim=4, **kwargs)


def test_get_hstu_config_accepts_names_and_enums() -> None:
    config = get_hstu_config(8, 4, 2, 1, dtype="bfloat16", kernel_backend="triton")
    assert config.dtype is torch.bfloat16 and config.kernel_backend is KernelBackend.TRITON
    assert config.position_encoding is not None and config.relative_bias is None
    assert get_hstu_config(8, 4, 2, 1, use_position_encoding=False).position_encoding is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"dtype": "float64"}, "unknown dtype"),
        ({"max_attn_len": -1}, "max_attn_len"),
    ],
)
def test_bad_hstu_values_fail_clearly(kwargs, message) -> None:
    arguments = {"hidden_size": 8, "kv_channels": 4, "num_attention_heads": 2, "num_layers": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        get_hstu_config(**arguments)


def test_prediction_head_arch_forms() -> None:
    assert RankingConfig([_table()], [[16, 1], [8, 1]]).num_tasks == 2
    assert RankingConfig([_table()], [16, 3]).num_tasks == 3
    with pytest.raises(ValueError, match="must end in 1"):
        RankingConfig([_table()], [[16, 2]])
    with pytest.raises(ValueError, match="disagrees"):
        RankingConfig([_table()], [16, 3], num_tasks=2)


def test_tables_and_features_must_be_unique() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        RankingConfig([_table(), _table()], [4, 1])
    with pytest.raises(ValueError, match="served by two tables"):
        RetrievalConfig([_table("a", ["item"]), _table("b", ["item"])])
    with pytest.raises(ValueError, match="sharding_type"):
        _table(sharding_type="row_wise")
    with pytest.raises(ValueError, match="global_hbm_for_values"):
        DynamicShardedEmbeddingConfig(["item"], "item", 10, 4, global_hbm_for_values=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        EmbeddingOptimizerParam("adam", 0.0)


def test_retrieval_config_validation() -> None:
    assert RetrievalConfig([_table()], eval_top_k=(50, 10, 10)).eval_top_k == (10, 50)
    with pytest.raises(ValueError, match="negative_sampling"):
        RetrievalConfig([_table()], negative_sampling="hard")
    with pytest.raises(ValueError, match="temperature"):
        RetrievalConfig([_table()], temperature=0.0)


def test_initializers_fill_tensors_as_documented() -> None:
    torch.manual_seed(0)
    uniform = UniformInitializer()(torch.empty(1000, 16))
    assert uniform.abs().max() <= 0.25 and uniform.abs().max() > 0.2
    assert UniformInitializer(-2.0, -1.0)(torch.empty(100, 4)).max() <= -1.0
    assert abs(NormalInitializer(std=0.5)(torch.empty(20000, 4)).std().item() - 0.5) < 0.02
    assert TruncatedNormalInitializer(mean=1.0, std=0.1)(torch.empty(1000, 4)).sub(1.0).abs().max() <= 0.2
    assert ConstantInitializer(3.0)(torch.empty(2, 2)).eq(3.0).all()
    xavier = XavierUniformInitializer()(torch.empty(6, 10))
    assert xavier.abs().max() <= (6 / 16) ** 0.5
    with pytest.raises(ValueError, match="both low and high"):
        UniformInitializer(low=-1.0)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        XavierUniformInitializer()(torch.empty(3))
