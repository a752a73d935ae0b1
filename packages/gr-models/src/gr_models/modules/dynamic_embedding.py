"""Dynamic (hash-table) embedding tables through dynamicemb's standalone `DynamicEmbeddingCollection`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig

from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)
from gr_models.configs.embedding_config import DynamicShardedEmbeddingConfig, EmbeddingOptimizerParam
from gr_models.utils.tensor_initializer import Initializer

_OPTIMIZERS = {
    "sgd": DynamicEmbOptimizerType.SGD,
    "adam": DynamicEmbOptimizerType.ADAM,
    "adamw": DynamicEmbOptimizerType.ADAMW,
    "adagrad": DynamicEmbOptimizerType.ADAGRAD,
    "rowwise_adagrad": DynamicEmbOptimizerType.ROWWISE_ADAGRAD,
}
_INITIALIZER_MODES = {
    "uniform": DynamicEmbInitializerMode.UNIFORM,
    "normal": DynamicEmbInitializerMode.NORMAL,
    "truncated_normal": DynamicEmbInitializerMode.TRUNCATED_NORMAL,
    "constant": DynamicEmbInitializerMode.CONSTANT,
}


def optimizer_args(param: EmbeddingOptimizerParam) -> DynamicEmbOptimizerArgs:
    """The fused dynamicemb optimizer equivalent to an `EmbeddingOptimizerParam`."""
    return DynamicEmbOptimizerArgs(
        optimizer=_OPTIMIZERS[param.optimizer_str],
        learning_rate=param.learning_rate,
        beta1=param.adam_beta1,
        beta2=param.adam_beta2,
        eps=param.eps,
        weight_decay=param.weight_decay,
    )


def initializer_args(initializer: Initializer, dim: int) -> DynamicEmbInitializerArgs:
    """dynamicemb's lazy row initializer equivalent to a gr_models `Initializer` for rows of width `dim`."""
    mode = _INITIALIZER_MODES.get(initializer.kind)
    if mode is None:
        raise ValueError(f"initializer {type(initializer).__name__} has no dynamicemb equivalent")
    args = initializer.args(dim)
    if mode is DynamicEmbInitializerMode.UNIFORM:
        return DynamicEmbInitializerArgs(mode=mode, lower=args["low"], upper=args["high"])
    if mode is DynamicEmbInitializerMode.CONSTANT:
        return DynamicEmbInitializerArgs(mode=mode, value=args["value"])
    std = args["std"]
    bounds = {"lower": args["mean"] - 2 * std, "upper": args["mean"] + 2 * std}
    extra = bounds if mode is DynamicEmbInitializerMode.TRUNCATED_NORMAL else {}
    return DynamicEmbInitializerArgs(mode=mode, mean=args["mean"], std_dev=std, **extra)


def table_options(config: DynamicShardedEmbeddingConfig) -> DynamicEmbTableOptions:
    """`DynamicEmbTableOptions` of one table. `global_hbm_for_values=None` budgets the whole table in GPU memory."""
    opt = optimizer_args(config.optimizer_param)
    hbm = config.global_hbm_for_values
    if hbm is None:
        hbm = config.vocab_size * (config.dim + opt.state_dim(config.dim)) * 4
    extra = dict(config.extra_table_options)
    if config.evict_strategy is not None:
        extra.setdefault("score_strategy", DynamicEmbScoreStrategy(int(config.evict_strategy)))
    return DynamicEmbTableOptions(
        initializer_args=initializer_args(config.initializer, config.dim),
        max_capacity=config.vocab_size,
        global_hbm_for_values=hbm,
        **extra,
    )


def build_dynamic_collection(configs: Sequence[DynamicShardedEmbeddingConfig], device: torch.device) -> nn.ModuleDict:
    """One `DynamicEmbeddingCollection` per table (each table has its own fused optimizer), keyed by table name."""
    collections = {}
    for config in configs:
        torchrec_config = EmbeddingConfig(
            num_embeddings=config.vocab_size,
            embedding_dim=config.dim,
            name=config.table_name,
            feature_names=list(config.feature_names),
        )
        collections[config.table_name] = DynamicEmbeddingCollection(
            tables=[torchrec_config],
            device=device,
            table_options=table_options(config),
            optimizer=optimizer_args(config.optimizer_param),
        )
    return nn.ModuleDict(collections)
