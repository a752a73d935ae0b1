"""What a training run keeps in its checkpoints besides the model, and how a run resumes from one.

The trainer's `extra_state` (rank 0's, see `gr_checkpoint.save`) holds the loop position, the LR schedule, the
loss scaler, the row optimizers of unsharded tables, the run config, the layout of the run that saved it (world,
tensor- and data-parallel sizes) and every rank's RNG states (gathered to rank 0: data-parallel ranks draw from
streams of their own). A run resumed at the same layout restores each rank's own states, so it continues exactly
as an uninterrupted run; at another layout the data position is carried over in global samples and each rank's
stream is derived from the seed, its data-parallel rank and the step.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gr_models.trainer.table_optimizer_state import fused_state_to_row_optimizers, row_state_to_fused_optimizer
from gr_models.trainer.world import RunWorld
from gr_parallel.tensor_parallel import set_tensor_parallel_rng_state, tensor_parallel_rng_state

__all__ = [
    "IGNORED_CONFIG_KEYS",
    "config_differences",
    "gather_per_rank",
    "layout_of",
    "rng_states",
    "samples_into_epoch",
    "set_rng_states",
]

_log = logging.getLogger("gr_models.trainer")

IGNORED_CONFIG_KEYS = frozenset(
    {
        "train.resume", "train.progress_bar", "train.log_every", "train.eval_every", "train.eval_batches",
        "train.checkpoint_every", "train.keep_last", "data.num_workers", "data.prefetch_factor",
        "data.eval_batch_size", "parallel.pipeline", "device", "output_dir",
    }
)  # fmt: skip
"""Config keys that change how a run is carried out or reported, not what it computes: no warning when they differ."""


def layout_of(world: RunWorld) -> dict[str, int]:
    """World size, tensor-parallel size and data-parallel size of a run."""
    return {
        "world_size": world.world_size,
        "tensor_model_parallel_size": world.world_size // world.dp_size,
        "data_parallel_size": world.dp_size,
    }


def rng_states(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: torch (CPU, and this rank's GPU), NumPy, Python and the tensor-parallel dropout
    stream (`gr_parallel.tensor_parallel`)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "tensor_parallel": tensor_parallel_rng_state(device),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Mapping[str, Any], device: torch.device, *, tensor_parallel: bool = True) -> None:
    """Restore what :func:`rng_states` returned (the tensor-parallel stream only with `tensor_parallel`)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    if tensor_parallel and "tensor_parallel" in states:
        set_tensor_parallel_rng_state(states["tensor_parallel"], device)


def gather_per_rank(value: Any, world: RunWorld) -> list[Any]:
    """`value` of every global rank, by rank (collective in a run of several processes)."""
    if world.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def samples_into_epoch(batches_into_epoch: int, batch_size: int, data_parallel_size: int) -> int:
    """Users of the current epoch that a run has read, over all data-parallel ranks."""
    return batches_into_epoch * batch_size * data_parallel_size


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(value: Any) -> Any:
    """Lists and tuples alike (the checkpoint's extra state keeps tuples, configs hold lists)."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items()}
    return value


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: saved -> current` for every dotted config key whose value differs (keys in
    :data:`IGNORED_CONFIG_KEYS` left out), sorted by key."""
    old, new = _flat(saved), _flat(current)
    return [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in IGNORED_CONFIG_KEYS and _comparable(old.get(key)) != _comparable(new.get(key))
    ]


def fill_in_older_state(state: dict[str, Any], world_size: int) -> None:
    """Give the extra state of a checkpoint written before layouts and per-rank RNG states were recorded (by a
    run of the manifest's `world_size`, tensor parallel 1, rank 0's RNG states only) the fields resuming reads."""
    if "layout" not in state:
        state["layout"] = {"world_size": world_size, "tensor_model_parallel_size": 1, "data_parallel_size": world_size}
    if "samples_into_epoch" not in state:
        batch_size = state.get("config", {}).get("data", {}).get("batch_size", 0)
        state["samples_into_epoch"] = samples_into_epoch(
            int(state["batches_into_epoch"]), int(batch_size), state["layout"]["data_parallel_size"]
        )
    if "rng_per_rank" not in state:
        state["rng_per_rank"] = [state["rng"]]


def _reads_global_order(data_parallel_size: int, balance_sequences: bool) -> bool:
    """True when a run's global batches are the next users of one shuffled order, whatever the data-parallel size
    (one rank, or balanced batches); else each rank reads its own shard of the users."""
    return data_parallel_size == 1 or balance_sequences


def resumed_batches_into_epoch(state: Mapping[str, Any], trainer: Any) -> int:
    """This run's position in the current epoch, in its own batches, from the checkpoint's position in users."""
    layout, saved_layout = layout_of(trainer.world), state["layout"]
    if saved_layout == layout:
        return int(state["batches_into_epoch"])
    config = trainer.config
    global_batch = config.data.batch_size * trainer.world.dp_size
    batches, rest = divmod(int(state["samples_into_epoch"]), global_batch)
    if rest:
        _log.warning(
            "the checkpoint read %d users of epoch %d, not a whole number of this run's global batches of %d "
            "(data.batch_size %d x %d data-parallel ranks): resuming after %d of them",
            state["samples_into_epoch"], state["epoch"], global_batch, config.data.batch_size,
            trainer.world.dp_size, batches * global_batch,
        )  # fmt: skip
    saved_balance = bool(state.get("config", {}).get("parallel", {}).get("balance_sequences", False))
    if not (
        _reads_global_order(saved_layout["data_parallel_size"], saved_balance)
        and _reads_global_order(trainer.world.dp_size, config.parallel.balance_sequences)
    ):
        _log.warning(
            "resuming at %d data-parallel ranks a run saved at %d without parallel.balance_sequences: each rank "
            "reads its own shard of the users, so the rest of epoch %d is not the users the saving run would have "
            "read next (set parallel.balance_sequences: true for runs that change size)",
            trainer.world.dp_size, saved_layout["data_parallel_size"], state["epoch"],
        )  # fmt: skip
    return batches


def restore_sparse_optimizers(state: Mapping[str, Any], trainer: Any, path: Any) -> None:
    """The row optimizers of unsharded tables. At another layout a table may have changed between unsharded (row
    optimizer) and sharded (fused optimizer): its AdaGrad state is carried over to the other form (see
    `gr_models.trainer.table_optimizer_state`); state that cannot be starts fresh, with a warning."""
    saved, current = state["sparse_optimizers"], trainer.optimizers.sparse
    missing = sorted(set(current) - set(saved))
    if missing and state["layout"] == layout_of(trainer.world):
        raise ValueError(f"checkpoint {path} lacks the sparse optimizer state of tables {missing}")
    for name, optimizer in current.items():
        if name in saved:
            optimizer.load_state_dict(saved[name])
    if missing:
        fresh = fused_state_to_row_optimizers(path, trainer.model, current, missing)
        if fresh:
            _log.warning(
                "tables %s were sharded in the run that saved %s and are unsharded here; their fused optimizer "
                "state has no row-optimizer form, so it starts fresh",
                fresh, path,
            )  # fmt: skip
    now_sharded = {name: row_state for name, row_state in saved.items() if name not in current}
    if now_sharded:
        carried = row_state_to_fused_optimizer(trainer.model, now_sharded)
        fresh = sorted(name for name, row_state in now_sharded.items() if row_state["state"] and name not in carried)
        if fresh:
            _log.warning("the row-optimizer state of tables %s (unsharded when saved) starts fresh here", fresh)


def restore_rng(state: Mapping[str, Any], trainer: Any) -> bool:
    """Every rank's own RNG states at the same layout (True); else rank 0's Python and NumPy states and the torch
    stream that `Trainer` derives from the seed, data-parallel rank and step (False)."""
    per_rank = state["rng_per_rank"]
    if state["layout"] == layout_of(trainer.world) and len(per_rank) == trainer.world.world_size:
        set_rng_states(per_rank[trainer.world.rank], trainer.device)
        return True
    set_rng_states(per_rank[0], trainer.device, tensor_parallel=False)  # each TP rank keeps its seeded stream
    return False


def report_resume(state: Mapping[str, Any], trainer: Any, path: Any) -> None:
    """Log (rank 0) what the run resumed from, warn about config differences and about nothing left to train."""
    if not trainer.world.is_main:
        return
    saved_layout = state["layout"]
    _log.info(
        "resumed from %s at step %d (saved by %d processes, tensor parallel %d; now %d, tensor parallel %d)",
        path, trainer.step, saved_layout["world_size"], saved_layout["tensor_model_parallel_size"],
        trainer.world.world_size, trainer.world.world_size // trainer.world.dp_size,
    )  # fmt: skip
    differences = config_differences(state.get("config", {}), trainer.config.to_dict())
    if differences:
        _log.warning(
            "the config differs from the one checkpoint %s was saved with: %s. The run continues from the "
            "checkpoint's weights, optimizer and LR-schedule state (a changed learning rate or schedule does not "
            "replace them); start over with train.resume=false or another output_dir to train with the new config",
            path, "; ".join(differences),
        )  # fmt: skip
    if trainer.step >= trainer.config.train.max_steps:
        _log.warning(
            "checkpoint %s is at step %d and train.max_steps is %d: nothing is left to train (raise "
            "train.max_steps, or start over with train.resume=false or another output_dir)",
            path, trainer.step, trainer.config.train.max_steps,
        )  # fmt: skip
