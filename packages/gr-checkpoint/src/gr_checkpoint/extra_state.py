"""``extra_state.pt``: the extra training state as data, never as pickled objects.

What may be stored: ``None``, ``bool``, ``int``, ``float``, ``str``; ``list``, ``tuple`` and
``dict`` (keys: ``str``, ``int``, ``float``, ``bool`` or ``None``) of those; tensors
(``torch.Tensor``, ``nn.Parameter``) and NumPy arrays and scalars of numeric dtypes (so
``torch.get_rng_state()``, ``np.random.get_state()``, ``random.getstate()``, optimizer, LR-scheduler
and ``GradScaler`` state dicts all fit). Anything else is refused by :func:`write_extra_state` with
:class:`UnsafeExtraStateError` naming its key path and type, before anything is written.

The file is a ``torch.save`` of ``{"format": ..., "tree": <JSON text>, "tensors": [tensor, ...]}``
and is read back with ``torch.load(weights_only=True)``; the JSON tree marks each container's
kind (``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``) and refers to
tensors by index (``{"tensor": i}``, ``{"ndarray": i}``, ``{"numpy": value, "dtype": name}``).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gr_checkpoint.errors import CheckpointCorruptError, UnsafeCheckpointError, UnsafeExtraStateError
from gr_checkpoint.safe_paths import resolved_inside

__all__ = ["EXTRA_STATE_NAME", "decode_extra_state", "encode_extra_state", "read_extra_state", "write_extra_state"]

EXTRA_STATE_NAME = "extra_state.pt"
_FORMAT = "gr-checkpoint-extra-state-1"
_SCALARS = (type(None), bool, int, float, str)

try:
    import numpy as np
except ImportError:  # numpy is optional: without it, no value can be a numpy one
    np = None  # type: ignore[assignment]


def _numpy_kind(value: Any) -> str | None:
    if np is None or not isinstance(value, (np.ndarray, np.generic)):
        return None
    return "ndarray" if isinstance(value, np.ndarray) else "numpy"


def _encode(value: Any, where: str, tensors: list[torch.Tensor]) -> Any:
    if type(value) in _SCALARS:
        return value
    if type(value) in (torch.Tensor, nn.Parameter):
        tensors.append(value.detach())
        return {"tensor": len(tensors) - 1}
    kind = _numpy_kind(value)
    if kind is not None and value.dtype.kind in "biuf":
        if kind == "numpy":
            return {"numpy": value.item(), "dtype": value.dtype.name}
        tensors.append(torch.from_numpy(value.copy()))
        return {"ndarray": len(tensors) - 1}
    if type(value) in (list, tuple):
        items = [_encode(item, f"{where}[{i}]", tensors) for i, item in enumerate(value)]
        return {type(value).__name__: items}
    if type(value) is dict:
        pairs = []
        for key, item in value.items():
            if type(key) not in _SCALARS:
                raise UnsafeExtraStateError(f"extra_state{where} has a key of type {type(key).__qualname__}")
            pairs.append([key, _encode(item, f"{where}[{key!r}]", tensors)])
        return {"dict": pairs}
    raise UnsafeExtraStateError(
        f"extra_state{where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored "
        "as data (allowed: None, bool, int, float, str, list, tuple, dict, torch tensors, numeric numpy values)"
    )


def encode_extra_state(extra_state: Any) -> dict[str, Any]:
    """``{"format", "tree", "tensors"}`` for ``extra_state``; :class:`UnsafeExtraStateError` if it holds other types."""
    tensors: list[torch.Tensor] = []
    tree = _encode(extra_state, "", tensors)
    return {"format": _FORMAT, "tree": json.dumps(tree), "tensors": tensors}


def _decode(node: Any, tensors: list[torch.Tensor]) -> Any:
    if type(node) in _SCALARS:
        return node
    if type(node) is not dict or len(node) not in (1, 2):
        raise ValueError(f"unexpected node {str(node)[:80]}")
    if "list" in node:
        return [_decode(item, tensors) for item in node["list"]]
    if "tuple" in node:
        return tuple(_decode(item, tensors) for item in node["tuple"])
    if "dict" in node:
        return {key: _decode(item, tensors) for key, item in node["dict"]}
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return tensors[node["ndarray"]].numpy()
    if "numpy" in node and np is not None:
        return np.dtype(node["dtype"]).type(node["numpy"])
    raise ValueError(f"unexpected node {str(node)[:80]}")


def decode_extra_state(encoded: Any, source: object) -> Any:
    """The value :func:`encode_extra_state` encoded; :class:`CheckpointCorruptError` naming ``source`` if malformed."""
    try:
        if encoded.get("format") != _FORMAT:
            raise ValueError(f"format is {encoded.get('format')!r}, expected {_FORMAT!r}")
        tensors = encoded["tensors"]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ValueError("'tensors' holds something other than tensors")
        return _decode(json.loads(encoded["tree"]), tensors)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as error:
        raise CheckpointCorruptError(source, f"malformed extra state ({type(error).__name__}: {error})") from None


def write_extra_state(directory: Path, extra_state: Any) -> None:
    """Write ``directory/extra_state.pt`` (checked first: :class:`UnsafeExtraStateError` names a bad value)."""
    encoded = encode_extra_state(extra_state)
    with open(directory / EXTRA_STATE_NAME, "wb") as file:
        torch.save(encoded, file)
        file.flush()
        os.fsync(file.fileno())


def read_extra_state(directory: Path) -> Any:
    """Read ``directory/extra_state.pt`` with ``torch.load(weights_only=True)``: a file that names any
    global beyond tensors and plain containers raises :class:`UnsafeCheckpointError` without running it."""
    path = resolved_inside(directory, directory / EXTRA_STATE_NAME, directory, EXTRA_STATE_NAME)
    if not path.is_file():
        raise CheckpointCorruptError(path, "missing, but the manifest says the checkpoint has extra state")
    data = io.BytesIO(path.read_bytes())
    try:
        encoded = torch.load(data, weights_only=True)
    except Exception as error:  # torch.load raises many kinds; weights-only refusals are pickle.UnpicklingError
        problem = f"refused or unreadable ({type(error).__name__}: {str(error).splitlines()[0]})"
        raise UnsafeCheckpointError(path, problem) from None
    return decode_extra_state(encoded, path)
