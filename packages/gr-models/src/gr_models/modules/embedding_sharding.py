"""How a GR's embedding tables are sharded over a world of several processes (`ShardedEmbedding.shard`).

- Dynamic tables: row-wise over every rank by dynamicemb (its own path: torch ops and this project's kernels), each
  with its own options and fused optimizer.
- Data-parallel static tables: whole on every rank, gradients averaged with the dense part, trained by
  `SparseRowOptimizer`s.
- Model-parallel static tables: row-wise by TorchRec's fused table-batched embedding (fbgemm TBE) with their
  optimizer fused into the backward, where this device's fbgemm can run it: on CUDA only with fbgemm's CUDA
  kernels, on the CPU only with the optimizers its TBE has there (sgd, adagrad, rowwise_adagrad). Elsewhere they
  are kept data-parallel (correct training, tables not split), with a warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection

import gr_parallel
from gr_models.configs.embedding_config import EmbeddingOptimizerParam, ShardedEmbeddingConfig

__all__ = ["fused_tables_unsupported_reason", "shard_tables", "static_fused_params"]

_FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
    "adamw": EmbOptimType.ADAM,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}
_CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def static_fused_params(param: EmbeddingOptimizerParam) -> dict[str, Any]:
    """TorchRec `fused_params` of sharded static tables trained like `SparseRowOptimizer(param)` (AdamW: Adam
    with decoupled weight decay)."""
    fused: dict[str, Any] = {
        "optimizer": _FUSED_OPTIMIZERS[param.optimizer_str],
        "learning_rate": param.learning_rate,
        "eps": param.eps,
        "weight_decay": param.weight_decay,
    }
    if param.optimizer_str in ("adam", "adamw"):
        fused.update(beta1=param.adam_beta1, beta2=param.adam_beta2)
    if param.optimizer_str == "adamw":
        fused["weight_decay_mode"] = WeightDecayMode.DECOUPLE
    return fused


def fused_tables_unsupported_reason(device: torch.device, optimizer_str: str) -> str | None:
    """Why fbgemm's TBE cannot train static tables with `optimizer_str` on `device`, or None when it can."""
    if device.type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::permute_2D_sparse_data", "CUDA"):
            return "the installed fbgemm has no CUDA kernels (fbgemm-gpu-cpu)"
        return None
    if optimizer_str not in _CPU_FUSED_OPTIMIZERS:
        return f"fbgemm's CPU TBE has no fused {optimizer_str} (only {', '.join(_CPU_FUSED_OPTIMIZERS)})"
    return None


def _keep_data_parallel(collection: EmbeddingCollection) -> None:
    for table in collection.embeddings.values():
        table.sparse = False  # dense gradients: averaged over the ranks with the dense part


def shard_tables(
    embedding: nn.Module, model_parallel: Sequence[ShardedEmbeddingConfig], device: torch.device
) -> gr_parallel.EmbeddingSharding:
    """Shard `embedding`'s children in place (see the module docstring); `model_parallel` are the configs of the
    tables of its `model_parallel` child. Collective over the world."""
    constraints = {"data_parallel": gr_parallel.data_parallel_constraint()}
    fused_params = None
    if model_parallel:
        first = model_parallel[0].optimizer_param
        if any(c.optimizer_param != first for c in model_parallel):
            raise ValueError(
                "model-parallel static tables are sharded with one fused optimizer; tables "
                f"{[c.table_name for c in model_parallel]} have different optimizer_param values: give them one"
            )
        reason = fused_tables_unsupported_reason(device, first.optimizer_str)
        if reason is None:
            constraints["model_parallel"] = gr_parallel.model_parallel_constraint(["row_wise"])
            fused_params = static_fused_params(first)
        else:
            warnings.warn(
                f"model-parallel tables {[c.table_name for c in model_parallel]} are kept data-parallel (whole on "
                f"every rank, gradients averaged) because {reason}; shard them with a CUDA build of fbgemm, an "
                "optimizer it supports, or as dynamic tables (DynamicShardedEmbeddingConfig)",
                stacklevel=4,
            )
            constraints["model_parallel"] = gr_parallel.data_parallel_constraint()
            model_parallel_tables = embedding.get_submodule("model_parallel")
            assert isinstance(model_parallel_tables, EmbeddingCollection)
            _keep_data_parallel(model_parallel_tables)
    options = gr_parallel.ShardingOptions(
        constraints=gr_parallel.constraints_by_child_name(embedding, constraints), fused_params=fused_params
    )
    return gr_parallel.shard_embedding_modules(embedding, options, device=device)
