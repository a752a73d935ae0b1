"""The ``torch_module/`` part of a checkpoint: model and optimizer state through DCP.

State dicts come from ``torch.distributed.checkpoint.state_dict`` (keys are parameter FQNs, with
wrappers such as DDP's ``module.`` removed, and optimizer state keyed by FQN), so a checkpoint
saved by a DDP model on N ranks loads into the bare model on M ranks. The state of modules
holding dynamic tables is left out: those are saved by :mod:`gr_checkpoint.dynamic_tables`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from gr_checkpoint.errors import CheckpointMismatchError
from gr_checkpoint.manifest import TensorSpec

__all__ = ["TorchState", "check_tensor_specs", "collect_torch_state", "restore_torch_state", "tensor_specs"]

TorchState = dict[str, Any]
"""``{"model": flat model state, "optimizer": optimizer state}`` (the latter only with an optimizer)."""

# Strictness is enforced by check_tensor_specs against the manifest, which also covers the keys
# of dynamic modules deliberately absent from the state.
_LOAD_OPTIONS = StateDictOptions(strict=False)


def _state_dict_prefix(model: nn.Module, module_name: str) -> str:
    """The key prefix of submodule ``module_name`` in DCP's state dict (DDP's ``module`` removed)."""
    kept, module = [], model
    for atom in module_name.split("."):
        if not (isinstance(module, DistributedDataParallel) and atom == "module"):
            kept.append(atom)
        module = getattr(module, atom)
    return ".".join(kept)


def _without_prefixes(state: Mapping[str, Any], prefixes: list[str]) -> dict[str, Any]:
    if "" in prefixes:  # the model itself holds the dynamic tables
        return {}
    starts = tuple(prefix + "." for prefix in prefixes)
    return {key: value for key, value in state.items() if not key.startswith(starts)}


def collect_torch_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, excluded_modules: Iterable[str]
) -> TorchState:
    """The model's state (minus ``excluded_modules``) and, if given, the optimizer's.

    With an optimizer whose state is still empty, DCP initializes it (a zero-gradient, zero-lr
    step), so the result can also serve as the destination of a load.
    """
    prefixes = [_state_dict_prefix(model, name) for name in excluded_modules]
    if optimizer is None:
        return {"model": _without_prefixes(get_model_state_dict(model), prefixes)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": _without_prefixes(model_state, prefixes), "optimizer": optimizer_state}


def restore_torch_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TorchState) -> None:
    """Put a loaded :data:`TorchState` back into ``model`` and ``optimizer``."""
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_LOAD_OPTIONS)
    else:
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=_LOAD_OPTIONS,
        )


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
    problems += [f"{what} key {key!r} is in the {what} but not in the checkpoint" for key in current if key not in saved]
    problems += [
        f"{what} key {key!r}: checkpoint has {saved[key].describe()}, {what} has {current[key].describe()}"
        for key in saved
        if key in current and saved[key] != current[key]
    ]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointMismatchError("checkpoint does not fit: " + "; ".join(shown))
