"""The ``torch_module/`` part of a checkpoint: model and optimizer state through DCP.

State dicts come from ``torch.distributed.checkpoint.state_dict`` (keys are parameter FQNs, with
wrappers such as DDP's ``module.`` removed, and optimizer state keyed by FQN), so a checkpoint
saved by a DDP model on N ranks loads into the bare model on M ranks. Parameters split over a tensor-parallel
group are stored whole (see :mod:`gr_checkpoint.tensor_parallel`), so the tensor-parallel size may change too.
Dynamic tables are not
parameters and never appear here (see :mod:`gr_checkpoint.dynamic_tables`); the ordinary state
of modules that hold them (e.g. the TorchRec tables a mixed sharded collection keeps) does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from gr_checkpoint.errors import CheckpointMismatchError
from gr_checkpoint.manifest import TensorSpec
from gr_checkpoint.tensor_parallel import tensor_parallel_layouts, to_global, to_local

__all__ = [
    "SPARSE_OPTIMIZER",
    "TorchState",
    "check_tensor_specs",
    "collect_torch_state",
    "fused_optimizer",
    "restore_torch_state",
    "tensor_specs",
]

TorchState = dict[str, Any]
"""``{"model": ..., "optimizer": ..., "sparse_optimizer": ...}`` state dicts (the last two optional)."""

SPARSE_OPTIMIZER = "sparse_optimizer"


def collect_torch_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, sparse_optimizer: KeyedOptimizer | None
) -> TorchState:
    """The state of ``model``, of ``optimizer`` and of ``sparse_optimizer`` (each if given).

    DCP's state-dict functions do not know TorchRec's ``DistributedModelParallel``: they get the
    module it wraps, whose keys are the same as the DMP's own state dict. With an optimizer whose
    state is still empty, DCP initializes it (a zero-gradient, zero-lr step), so the result can
    also serve as the destination of a load.
    """
    module = get_unwrapped_module(model)
    if optimizer is None:
        # DCP refuses a model without state (e.g. only dynamic tables, which live outside the state dict)
        state: TorchState = {"model": get_model_state_dict(module) if _has_state(module) else {}}
    else:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    to_global(state, tensor_parallel_layouts(module))
    if sparse_optimizer is not None:
        state[SPARSE_OPTIMIZER] = sparse_optimizer.state_dict()
    return state


def _has_state(module: nn.Module) -> bool:
    return next(iter(module.state_dict()), None) is not None


def fused_optimizer(model: nn.Module) -> KeyedOptimizer | None:
    """The in-backward optimizer of TorchRec's sharded tables: a ``DistributedModelParallel``'s, else those of the
    sharded collections inside ``model`` (sharded in place, e.g. by a model built in a multi-process world)
    combined by path; ``None`` when there are none."""
    if isinstance(model, DistributedModelParallel):
        return model.fused_optimizer
    found: list[tuple[str, KeyedOptimizer]] = []
    for path, module in model.named_modules():
        if isinstance(module, FusedOptimizerModule) and not any(path.startswith(f"{p}.") for p, _ in found):
            found.append((path, module.fused_optimizer))
    return CombinedOptimizer(found) if found else None


def restore_torch_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    sparse_optimizer: KeyedOptimizer | None,
    state: TorchState,
) -> None:
    """Put a loaded :data:`TorchState` back into ``model``, ``optimizer`` and ``sparse_optimizer`` (each
    tensor-parallel rank keeps its part of the global tensors)."""
    module = get_unwrapped_module(model)
    to_local(state, tensor_parallel_layouts(module))
    if optimizer is None:
        if state["model"] or _has_state(module):
            set_model_state_dict(module, state["model"])
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if sparse_optimizer is not None:
        sparse_optimizer.load_state_dict(state[SPARSE_OPTIMIZER])


def _flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, Mapping):
        items: Iterable[tuple[Any, Any]] = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(_flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def tensor_specs(state: Any) -> dict[str, TensorSpec]:
    """Global shape and dtype of every tensor in a (nested) state dict, by dotted key."""
    return {
        key: TensorSpec(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for key, tensor in _flat_tensors(state).items()
    }


def check_tensor_specs(what: str, saved: Mapping[str, TensorSpec], current: Mapping[str, TensorSpec]) -> None:
    """Raise :class:`CheckpointMismatchError` naming every key whose presence, shape or dtype differs."""
    problems = [f"{what} key {key!r} is in the checkpoint but not in the {what}" for key in saved if key not in current]
    problems += [
        f"{what} key {key!r} is in the {what} but not in the checkpoint" for key in current if key not in saved
    ]
    problems += [
        f"{what} key {key!r}: checkpoint has {saved[key].describe()}, {what} has {current[key].describe()}"
        for key in saved
        if key in current and saved[key] != current[key]
    ]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointMismatchError("checkpoint does not fit: " + "; ".join(shown))
