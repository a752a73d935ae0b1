"""Trainer pieces: learning-rate schedules, config overrides, token counting, dense/sparse parameter split."""

from __future__ import annotations

import pytest
import torch

from gr_models.data.batch import FeatureConfig, RankingBatch
from gr_models.data.schema import DatasetSchema
from gr_models.trainer import build_model, load_config, lr_multiplier, sequence_tokens
from gr_models.trainer.builders import build_embedding_configs
from gr_models.trainer.config import OptimSection


def test_warmup_then_cosine_and_linear_schedules() -> None:
    cosine = OptimSection(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, cosine, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(9, cosine, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(14, cosine, 14) == pytest.approx(0.1)
    linear = OptimSection(schedule="linear")
    assert lr_multiplier(5, linear, 10) == pytest.approx(0.5)
    assert lr_multiplier(3, OptimSection(), 10) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(3, OptimSection(schedule="step"), 10)


def test_overrides_parse_yaml_values_and_validate_types() -> None:
    config = load_config(None, ["hstu.num_layers=3", "optim.learning_rate=1e-3", "train.eval_batches=null"])
    assert config.hstu.num_layers == 3 and config.optim.learning_rate == 1e-3 and config.train.eval_batches is None
    assert str(config.run_dir) == "runs/run"
    with pytest.raises(ValueError, match=r"'hstu\.num_layers' must be int"):
        load_config(None, ["hstu.num_layers=three"])
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        load_config(None, ["hstu.num_layers"])
    with pytest.raises(ValueError, match="SASRec baseline is a retrieval model"):
        load_config(None, ["model=sasrec"])


def test_sequence_tokens_counts_contextual_interleaved_history_and_candidates() -> None:
    batch = RankingBatch.random(
        4,
        [FeatureConfig(["user"], [5], 2), FeatureConfig(["item", "action"], [9, 2], 10)],
        "item",
        ["user"],
        "action",
        max_num_candidates=3,
        generator=torch.Generator().manual_seed(0),
    )
    items = int(batch.item_lengths().sum())
    candidates = int(batch.num_candidates.sum())
    contextual = int(batch.feature_lengths("user").sum())
    assert sequence_tokens(batch) == contextual + 2 * (items - candidates) + candidates


def _schema(**vocab) -> DatasetSchema:
    return DatasetSchema(
        kind="ranking",
        item_feature_name="item",
        vocab_sizes={"item": 50, "action": 2, **vocab},
        max_sequence_length=8,
        action_feature_name="action",
        task_names=("click",),
    )


def test_tables_follow_the_schema_and_hashed_features_need_dynamic_tables() -> None:
    config = load_config(None, ["embeddings.tables={item: {type: dynamic, capacity: 128}}", "hstu.hidden_size=8"])
    tables = {t.table_name: t for t in build_embedding_configs(config, _schema())}
    assert tables["item_table"].vocab_size == 128 and type(tables["item_table"]).__name__.startswith("Dynamic")
    assert tables["action_table"].vocab_size == 2 and tables["action_table"].dim == 8
    unbounded = DatasetSchema(
        kind="ranking",
        item_feature_name="item",
        vocab_sizes={"item": 0, "action": 2},
        max_sequence_length=8,
        action_feature_name="action",
        task_names=("click",),
    )
    with pytest.raises(ValueError, match="give it a dynamic table"):
        build_embedding_configs(load_config(None, []), unbounded)
    with pytest.raises(ValueError, match="not id features"):
        build_embedding_configs(load_config(None, ["embeddings.tables={genre: {}}"]), _schema())


def test_dense_parameters_exclude_static_tables() -> None:
    config = load_config(None, ["hstu.hidden_size=8", "hstu.kv_channels=4", "hstu.num_layers=1"])
    model = build_model(config, _schema(), torch.device("cpu"))
    dense = {id(p) for p in model.dense_parameters()}
    tables = [w for _, w in model.embedding.static_parameters()]
    assert tables and all(id(w) not in dense for w in tables)
    assert len(dense) + len(tables) == len(list(model.parameters()))


def test_gradient_accumulation_takes_one_optimizer_step_per_group_of_micro_batches(tmp_path) -> None:
    from gr_models.trainer import Trainer

    overrides = [
        f"output_dir={tmp_path}", "train.max_steps=2", "train.grad_accumulation=3", "train.eval_every=0",
        "train.eval_batches=1", "train.progress_bar=false", "data.batch_size=4", "data.max_sequence_length=8",
        "data.holdout=2", "data.max_train_candidates=2", "hstu.hidden_size=8", "hstu.kv_channels=4",
        "data.options={num_users: 50, num_items: 20, num_clusters: 2, min_events: 6, max_events: 12}",
    ]  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    result = trainer.train()
    assert result.throughput["samples"] == 2 * 3 * 4
    steps = {int(state["step"]) for state in trainer.optimizers.dense.state_dict()["state"].values()}
    assert steps == {2}


def test_retrieval_runs_count_positions_from_the_start_unless_told_otherwise() -> None:
    from gr_models.trainer.builders import build_hstu_config

    cpu = torch.device("cpu")
    assert build_hstu_config(load_config(None, []), cpu).position_encoding.count_from == "end"
    retrieval = load_config(None, ["task=retrieval"])
    assert build_hstu_config(retrieval, cpu).position_encoding.count_from == "start"
    assert build_hstu_config(retrieval, cpu).position_encoding.time_from == "previous"
    assert build_hstu_config(load_config(None, []), cpu).position_encoding.time_from == "query"
    explicit = load_config(None, ["task=retrieval", "hstu.position_encoding={count_from: end}"])
    assert build_hstu_config(explicit, cpu).position_encoding.count_from == "end"


def test_fused_norm_gate_reaches_the_hstu_config_from_yaml() -> None:
    from gr_models.trainer.builders import build_hstu_config

    cpu = torch.device("cpu")
    assert build_hstu_config(load_config(None, []), cpu).fused_norm_gate is None
    assert build_hstu_config(load_config(None, ["hstu.fused_norm_gate=false"]), cpu).fused_norm_gate is False
    assert build_hstu_config(load_config(None, ["hstu.fused_norm_gate=true"]), cpu).fused_norm_gate is True
    assert build_hstu_config(load_config(None, ["hstu.fused_norm_gate=null"]), cpu).fused_norm_gate is None
    with pytest.raises(ValueError, match=r"hstu\.fused_norm_gate"):
        load_config(None, ["hstu.fused_norm_gate=sometimes"])


def test_retrieval_gr_warns_when_positions_count_from_the_end() -> None:
    from gr_models.configs import PositionEncodingConfig, get_hstu_config
    from gr_models.model import RetrievalGR

    config = load_config(None, ["task=retrieval"])
    schema_model = build_model(config, _synthetic_schema(config), torch.device("cpu"))
    assert isinstance(schema_model, RetrievalGR)
    hstu = get_hstu_config(32, 16, 2, 1, position_encoding=PositionEncodingConfig(count_from="end"))
    with pytest.warns(UserWarning, match="count_from='start'"):
        RetrievalGR(hstu, schema_model.task_config, torch.device("cpu"))
    timed = PositionEncodingConfig(count_from="start", use_time_encoding=True, time_from="query")
    with pytest.warns(UserWarning, match="time_from='previous'"):
        RetrievalGR(get_hstu_config(32, 16, 2, 1, position_encoding=timed), schema_model.task_config, "cpu")


def _synthetic_schema(config) -> DatasetSchema:
    from gr_models.trainer.builders import build_train_dataset

    return build_train_dataset(config.data, config.task).schema


def test_output_bias_init_reaches_the_hstu_config_from_yaml() -> None:
    from gr_models.trainer.builders import build_hstu_config

    cpu = torch.device("cpu")
    assert build_hstu_config(load_config(None, []), cpu).output_bias_init == "zeros"
    assert build_hstu_config(load_config(None, ["hstu.output_bias_init=uniform"]), cpu).output_bias_init == "uniform"
    with pytest.raises(ValueError, match=r"hstu\.output_bias_init"):
        load_config(None, ["hstu.output_bias_init=normal"])
