"""Build the pieces of a run from its `RunConfig`: datasets, embedding tables and the model."""

from __future__ import annotations

from typing import Any, Literal

import torch

from gr_models.configs import (
    DynamicShardedEmbeddingConfig,
    EmbeddingOptimizerParam,
    PositionEncodingConfig,
    RankingConfig,
    RelativeBiasConfig,
    RetrievalConfig,
    ShardedEmbeddingConfig,
    get_hstu_config,
)
from gr_models.configs.embedding_config import BaseEmbeddingConfig
from gr_models.configs.hstu_config import HSTUConfig
from gr_models.data.dataset import SequenceDataset
from gr_models.data.schema import UNBOUNDED_VOCAB, DatasetSchema
from gr_models.model import RankingGR, RetrievalGR, SASRec
from gr_models.model.base import GRModel
from gr_models.trainer.config import DataConfig, RunConfig
from gr_models.utils.tensor_initializer import (
    ConstantInitializer,
    Initializer,
    NormalInitializer,
    TruncatedNormalInitializer,
    UniformInitializer,
)

_TABLE_KEYS = {
    "type",
    "sharding_type",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "initializer",
    "init_std",
    "init_value",
    "capacity",
    "betas",
}


def _feature_column(spec: Any) -> Any:
    from gr_models.data.feature_ops import BucketizeTimestamps, CheckVocab, HashIds, Truncate
    from gr_models.data.table import FeatureColumn

    if isinstance(spec, str):
        return spec
    ops_by_name = {
        "hash": HashIds,
        "check_vocab": CheckVocab,
        "truncate": Truncate,
        "bucketize_timestamps": BucketizeTimestamps,
    }
    ops = []
    for op in spec.get("ops", []):
        op = dict(op)
        kind = op.pop("op", None)
        if kind not in ops_by_name:
            raise ValueError(f"unknown feature op {kind!r}; expected one of {sorted(ops_by_name)}")
        ops.append(ops_by_name[kind](**op))
    return FeatureColumn(column=spec["column"], name=spec.get("name"), ops=tuple(ops))


def build_train_dataset(data: DataConfig, task: str) -> SequenceDataset:
    """The training split of the configured dataset (its `with_split("eval")` is the evaluation set)."""
    window: dict[str, Any] = {
        "kind": task,
        "split": "train",
        "max_sequence_length": data.max_sequence_length,
        "holdout": data.holdout,
        "max_train_candidates": data.max_train_candidates,
        "truncate_side": data.truncate_side,
    }
    options: dict[str, Any] = dict(data.options)
    if data.dataset == "synthetic":
        from gr_models.data.synthetic import SyntheticConfig, SyntheticDataset

        return SyntheticDataset(SyntheticConfig(**options), **window)
    if data.dataset == "kuairand":
        from gr_models.data.kuairand import KuaiRandDataset

        log_paths = options.pop("log_paths", data.path)
        if log_paths is None:
            raise ValueError("dataset 'kuairand' needs data.path (one log file) or data.options.log_paths (a list)")
        return KuaiRandDataset(log_paths, **options, **window)
    if data.path is None:
        raise ValueError(f"dataset {data.dataset!r} needs data.path")
    if data.dataset == "movielens":
        from gr_models.data.movielens import MovieLensDataset

        return MovieLensDataset(data.path, **options, **window)
    if data.dataset in ("parquet", "orc"):
        from gr_models.data.table import SequenceTableDataset

        for key in ("item", "action"):
            if key in options and options[key] is not None:
                options[key] = _feature_column(options[key])
        for key in ("side_features", "contextual"):
            options[key] = [_feature_column(s) for s in options.get(key, [])]
        file_format: Literal["parquet", "orc"] = "parquet" if data.dataset == "parquet" else "orc"
        return SequenceTableDataset(data.path, file_format=file_format, **options, **window)
    raise ValueError(f"unknown dataset {data.dataset!r}; expected synthetic, movielens, kuairand, parquet or orc")


def _initializer(name: str, std: float | None, value: float | None) -> Initializer:
    if name == "constant":
        return ConstantInitializer(value=0.0 if value is None else float(value))
    if name == "uniform":
        return UniformInitializer()
    if name == "normal":
        return NormalInitializer(std=std)
    if name == "truncated_normal":
        return TruncatedNormalInitializer(std=std)
    raise ValueError(f"unknown initializer {name!r}; expected uniform, normal, truncated_normal or constant")


def _adam_betas(spec: dict[str, Any]) -> dict[str, float]:
    """`adam_beta1/2` of `EmbeddingOptimizerParam` from a table's optional `betas: [b1, b2]`."""
    if "betas" not in spec:
        return {}
    beta1, beta2 = (float(b) for b in spec["betas"])
    return {"adam_beta1": beta1, "adam_beta2": beta2}


def build_embedding_configs(config: RunConfig, schema: DatasetSchema) -> list[BaseEmbeddingConfig]:
    """One table per id feature of the schema (`<feature>_table`), width = hidden size."""
    unknown = sorted(set(config.embeddings.tables) - set(schema.id_feature_names))
    if unknown:
        raise ValueError(
            f"embeddings.tables names {unknown}, which are not id features of the data {list(schema.id_feature_names)}"
        )
    tables: list[BaseEmbeddingConfig] = []
    for feature in schema.id_feature_names:
        spec = {**config.embeddings.default, **config.embeddings.tables.get(feature, {})}
        bad = sorted(set(spec) - _TABLE_KEYS)
        if bad:
            raise ValueError(
                f"embedding options {bad} for feature {feature!r} are unknown; known: {sorted(_TABLE_KEYS)}"
            )
        vocab = schema.vocab_sizes[feature]
        kind = spec.get("type", "static")
        common: dict[str, Any] = {
            "feature_names": [feature],
            "table_name": f"{feature}_table",
            "dim": config.hstu.hidden_size,
            "initializer": _initializer(
                spec.get("initializer", "uniform"), spec.get("init_std"), spec.get("init_value")
            ),
            "optimizer_param": EmbeddingOptimizerParam(
                optimizer_str=spec.get("optimizer", "adam"),
                learning_rate=float(spec.get("learning_rate", config.optim.learning_rate)),
                weight_decay=float(spec.get("weight_decay", 0.0)),
                **_adam_betas(spec),
            ),
        }
        if kind == "dynamic":
            capacity = int(spec.get("capacity", vocab if vocab != UNBOUNDED_VOCAB else 0))
            if capacity < 1:
                raise ValueError(
                    f"dynamic table for hashed feature {feature!r} needs embeddings.tables.{feature}.capacity"
                )
            tables.append(DynamicShardedEmbeddingConfig(vocab_size=capacity, **common))
        elif kind == "static":
            if vocab == UNBOUNDED_VOCAB:
                raise ValueError(f"feature {feature!r} has hashed (unbounded) ids: give it a dynamic table")
            tables.append(
                ShardedEmbeddingConfig(
                    vocab_size=vocab, sharding_type=spec.get("sharding_type", "model_parallel"), **common
                )
            )
        else:
            raise ValueError(f"embedding type for {feature!r} must be 'static' or 'dynamic', got {kind!r}")
    return tables


def build_hstu_config(config: RunConfig, device: torch.device) -> HSTUConfig:
    section = config.hstu
    dtype = section.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    position = None
    if section.position_encoding is not None:
        options = dict(section.position_encoding)
        if config.task == "retrieval":
            # retrieval never trains the most recent event as a query: count positions from the oldest event
            # and measure times from the previous event, not from the sequence's end
            options.setdefault("count_from", "start")
            options.setdefault("time_from", "previous")
        position = PositionEncodingConfig(**options)
    return get_hstu_config(
        hidden_size=section.hidden_size,
        kv_channels=section.kv_channels,
        num_attention_heads=section.num_attention_heads,
        num_layers=section.num_layers,
        dtype=dtype,
        is_causal=section.is_causal,
        kernel_backend=section.kernel_backend,
        dropout=section.dropout,
        max_attn_len=section.max_attn_len,
        scaling_seqlen=section.scaling_seqlen,
        alpha=section.alpha,
        uvqk_init_std=section.uvqk_init_std,
        layer_norm_affine=section.layer_norm_affine,
        uvqk_bias=section.uvqk_bias,
        position_encoding=position,
        use_position_encoding=position is not None,
        relative_bias=RelativeBiasConfig(**section.relative_bias) if section.relative_bias is not None else None,
        recompute_cheap_activations=section.recompute_cheap_activations,
        fused_norm_gate=section.fused_norm_gate,
        output_bias_init=section.output_bias_init,
        compile_layers=section.compile_layers,
    )


def build_model(config: RunConfig, schema: DatasetSchema, device: torch.device) -> GRModel:
    """RankingGR, RetrievalGR or SASRec for the dataset's schema."""
    hstu = build_hstu_config(config, device)
    tables = build_embedding_configs(config, schema)
    if config.task == "ranking":
        if schema.kind != "ranking":
            raise ValueError("task: ranking needs a ranking dataset (with actions and tasks)")
        ranking = config.ranking
        task = RankingConfig(
            embedding_configs=tables,
            prediction_head_arch=[*ranking.prediction_head_hidden, schema.num_tasks],
            prediction_head_act_type=ranking.activation,
        )
        return RankingGR(hstu, task, device=device)
    retrieval = config.retrieval
    task_config = RetrievalConfig(
        embedding_configs=tables,
        temperature=retrieval.temperature,
        num_negatives=retrieval.num_negatives,
        negative_sampling=retrieval.negative_sampling,
        negatives_per_query=retrieval.negatives_per_query,
        eval_top_k=tuple(retrieval.eval_top_k),
        eval_exclude_history=retrieval.eval_exclude_history,
        loss=retrieval.loss,
    )
    model_class = SASRec if config.model == "sasrec" else RetrievalGR
    return model_class(hstu, task_config, device=device)
