"""Process-group and Megatron-core parallel-state setup and teardown.

Typical use, under ``torchrun`` or as a plain single process::

    import gr_parallel.initialize as init

    init.initialize_distributed()
    init.initialize_model_parallel(tensor_model_parallel_size=1)
    init.set_random_seed(1234)
    ...
    init.destroy_global_state()

CPU notes (megatron-core 0.16.1, checked against its source and on a gloo world): the process groups
that ``megatron.core.parallel_state.initialize_model_parallel`` builds, and their rank/size queries,
work on a gloo world without CUDA. Its CUDA-only parts are the SHARP barrier (``use_sharp``, never
passed here), the global memory buffer (allocated lazily on the current CUDA device, only by
sequence-parallel layers), the tensor-parallel CUDA RNG tracker (``set_random_seed`` seeds it only
when CUDA is available) and the tensor-parallel gather/scatter mappings, which call
``torch.cuda.current_device()``.
"""

from __future__ import annotations

import atexit
import os
import random
import weakref
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from gr_parallel._megatron import parallel_state, tensor_parallel
from gr_parallel.tensor_parallel.random import seed_tensor_parallel_cpu_rng

__all__ = [
    "DEFAULT_TIMEOUT",
    "destroy_global_state",
    "hold_process_groups_for",
    "initialize_distributed",
    "initialize_model_parallel",
    "set_random_seed",
]

DEFAULT_TIMEOUT = timedelta(minutes=30)

_TORCHRUN_REQUIRED_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_timeout: timedelta = DEFAULT_TIMEOUT
_initialization_count = 0
_group_holders: weakref.WeakSet[object] = weakref.WeakSet()
_teardown_at_exit_registered = False


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Create the default process group, once.

    Under ``torchrun`` the world comes from ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` and ``LOCAL_RANK`` (defaults to ``RANK``). Without those variables this builds a
    single-process world (rank 0 of 1) whose store listens on a free local port chosen by the OS.

    Args:
        backend: ``"nccl"`` or ``"gloo"`` (any backend string ``torch.distributed`` accepts);
            default ``"nccl"`` when CUDA is available, else ``"gloo"``.
        timeout: collective timeout of the default group, also used for Megatron's groups.

    With CUDA, the current device is set to ``cuda:LOCAL_RANK``. A second call with a matching
    world is a no-op; a call that asks for another backend or world size raises ``RuntimeError``.
    """
    global _initialization_count, _timeout
    requested_backend = backend or _default_backend()
    launched = [name for name in (*_TORCHRUN_REQUIRED_VARS, "LOCAL_RANK") if name in os.environ]
    if dist.is_initialized():
        _check_matches_existing_world(backend, launched)
        return
    if requested_backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")

    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        _use_cuda_device(_torchrun_local_rank(launched))
        # env:// also honours the store torchrun's agent hosts (TORCHELASTIC_USE_AGENT_STORE).
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    else:
        _use_cuda_device(0)
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout)
        rank, world_size = 0, 1
    # Process-group names restart at 0 after a destroy while the TCPStore server (shared per port
    # inside a process) may outlive it, so each initialization gets its own key namespace.
    store = dist.PrefixStore(f"gr_parallel/init_{_initialization_count}", store)
    dist.init_process_group(requested_backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    _initialization_count += 1
    _timeout = timeout


def _torchrun_local_rank(launched: list[str]) -> int:
    missing = [name for name in _TORCHRUN_REQUIRED_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torchrun environment is incomplete: {', '.join(missing)} not set (found {', '.join(launched)})"
        )
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    return _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank


def _use_cuda_device(local_rank: int) -> None:
    if not torch.cuda.is_available():
        return
    device_count = torch.cuda.device_count()
    if local_rank >= device_count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {device_count} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)


def _check_matches_existing_world(backend: str | None, launched: list[str]) -> None:
    current_backend = dist.get_backend()
    if backend is not None and backend != current_backend:
        raise RuntimeError(f"process group already initialized with backend {current_backend!r}, not {backend!r}")
    if "WORLD_SIZE" in launched and _env_int("WORLD_SIZE") != dist.get_world_size():
        raise RuntimeError(
            f"process group already initialized with world size {dist.get_world_size()}, "
            f"but WORLD_SIZE={os.environ['WORLD_SIZE']}"
        )


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Build Megatron-core's tensor- and data-parallel groups over the default process group.

    Ranks ``[k * tp, (k + 1) * tp)`` form a tensor-parallel group; ranks with equal position inside
    their tensor-parallel group form a data-parallel group (Megatron's ``tp-cp-ep-dp-pp`` order).
    Needs :func:`initialize_distributed` first. Calling again with the same size is a no-op.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs a process group: call initialize_distributed() first")
    if isinstance(tensor_model_parallel_size, bool) or not isinstance(tensor_model_parallel_size, int):
        raise TypeError(f"tensor_model_parallel_size must be an int, got {tensor_model_parallel_size!r}")
    world_size = dist.get_world_size()
    if tensor_model_parallel_size < 1 or world_size % tensor_model_parallel_size != 0:
        raise ValueError(
            f"tensor_model_parallel_size={tensor_model_parallel_size} must be >= 1 and divide "
            f"the world size {world_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        current_size = parallel_state.get_tensor_model_parallel_world_size()
        if tensor_model_parallel_size != current_size:
            raise RuntimeError(
                f"model parallel state already initialized with tensor_model_parallel_size={current_size}; "
                "call destroy_global_state() before changing it"
            )
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        distributed_timeout_minutes=max(1, round(_timeout.total_seconds() / 60)),
    )


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) with ``seed``.

    Every rank gets the same seed, so replicated (data-parallel) parameters initialize identically.
    With CUDA, Megatron's model-parallel RNG tracker is also seeded: its tensor-parallel state
    differs per tensor-parallel rank (``seed + 2718 + tp_rank``), for dropout inside split layers; the CPU
    stream of :func:`gr_parallel.tensor_parallel.fork_tensor_parallel_rng` is seeded the same way.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    seed_tensor_parallel_cpu_rng(seed)
    if torch.cuda.is_available():
        if parallel_state.model_parallel_is_initialized():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        else:
            tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)


def hold_process_groups_for(model: object) -> None:
    """Keep the process groups up while ``model`` is alive (its sharded parts communicate over them).

    A model distributed over the world registers itself here, so that :func:`destroy_global_state`
    called while it is alive (as a script does before saving the model) defers the teardown.
    Only a weak reference is kept.
    """
    _group_holders.add(model)


def destroy_global_state() -> None:
    """Tear down Megatron's parallel state and the default process group (each only if present).

    Afterwards :func:`initialize_distributed` and :func:`initialize_model_parallel` may run again,
    e.g. with another tensor-parallel size. While a model registered with
    :func:`hold_process_groups_for` is alive, the teardown is deferred to the exit of the process
    instead, so that collective work on that model (e.g. ``gr_checkpoint.save``) still runs over
    the groups it was distributed on; delete such models first to tear down now.
    """
    global _teardown_at_exit_registered
    if dist.is_initialized() and len(_group_holders) > 0:
        if not _teardown_at_exit_registered:
            atexit.register(_teardown)
            _teardown_at_exit_registered = True
        return
    _teardown()


def _teardown() -> None:
    global _timeout
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _timeout = DEFAULT_TIMEOUT
