"""Block-size configurations of the HSTU attention kernels and the autotuning wrappers around them.

Autotuning is keyed by the max sequence length rounded up to a power of two, the head dims, the mask and bias
options and the dtypes, so a new max length re-tunes only when it crosses a power of two (a few seconds per key)
and every later call reuses the cached choice. Under `TRITON_INTERPRET=1` (CPU tests) a single tiny
configuration is used, since every program instance costs tens of milliseconds there. The deterministic
backward uses fixed configurations (`deterministic_config`) so its scratch buffers can be sized up front.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import triton

from hstu_attn.triton.backward import hstu_attn_backward_dkdv_kernel, hstu_attn_backward_dq_kernel
from hstu_attn.triton.forward import hstu_attn_forward_kernel

__all__ = [
    "AUTOTUNE",
    "INTERPRET",
    "autotune_seq_len",
    "backward_dkdv",
    "backward_dq",
    "deterministic_config",
    "forward",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# HSTU_ATTN_TRITON_AUTOTUNE=0 skips tuning and uses the first configuration listed for the head dim.
AUTOTUNE = os.environ.get("HSTU_ATTN_TRITON_AUTOTUNE", "1") != "0"

_TUNING_KEY = ["AUTOTUNE_SEQ_LEN", "DQK", "DV", "CAUSAL", "HAS_TARGETS", "HAS_RAB", "HAS_POS", "HAS_TIME"]


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


_INTERPRETER_CONFIG = _config(16, 16, 1, 1)

# (BLOCK_M query rows, BLOCK_N key columns, warps, stages), by max(Dqk, Dv).
_FORWARD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 1)],
}
_BACKWARD_CONFIGS = {
    64: [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (128, 128, 8, 2)],
    128: [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 1), (128, 128, 8, 1)],
    256: [(64, 64, 8, 1), (32, 64, 4, 1), (32, 128, 8, 1), (64, 64, 4, 1), (16, 64, 4, 2)],
}
_DETERMINISTIC_CONFIG = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 64, 4, 1)}


def _head_dim_class(named_args: dict[str, Any]) -> int:
    head_dim = max(named_args["DQK"], named_args["DV"])
    return 64 if head_dim <= 64 else head_dim


def _configs(table: dict[int, list[tuple[int, int, int, int]]]) -> list[triton.Config]:
    if INTERPRET:
        return [_INTERPRETER_CONFIG]
    seen: list[tuple[int, int, int, int]] = []
    for entries in table.values():
        seen.extend(entry for entry in entries if entry not in seen)
    return [_config(*entry) for entry in seen]


def _pruner(table: dict[int, list[tuple[int, int, int, int]]]):
    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        if INTERPRET:
            return configs
        allowed = table[_head_dim_class({**named_args, **kwargs})]
        kept = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed
        ]
        kept.sort(key=lambda c: allowed.index((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)))
        return kept if AUTOTUNE else kept[:1]

    return prune


def _zero_accumulators(kwargs: dict[str, Any], reset_only: bool = False) -> None:
    """Tuning runs add into the atomic accumulators: zero them before each run and before the real one."""
    for name in ("DQ", "drab", "dposition", "dtime"):
        if kwargs.get(name) is not None:
            kwargs[name].zero_()


def autotune_seq_len(max_seq_len: int) -> int:
    """The tuning-key value of a max sequence length: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max_seq_len))


def deterministic_config(head_dim: int) -> dict[str, int]:
    """Launch parameters (BLOCK_M, BLOCK_N, num_warps, num_stages) of the deterministic backward."""
    if INTERPRET:
        block_m, block_n, warps, stages = 16, 16, 1, 1
    else:
        block_m, block_n, warps, stages = _DETERMINISTIC_CONFIG[64 if head_dim <= 64 else head_dim]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


# Keep tuning results on disk where this Triton version can (`cache_results`), so a new process skips tuning.
_DISK_CACHE: dict[str, Any] = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)

forward = triton.autotune(
    configs=_configs(_FORWARD_CONFIGS),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _pruner(_FORWARD_CONFIGS)},
    **_DISK_CACHE,
)(hstu_attn_forward_kernel)

backward_dkdv = triton.autotune(
    configs=_configs(_BACKWARD_CONFIGS),
    key=[*_TUNING_KEY, "ATOMIC_DQ"],
    prune_configs_by={"early_config_prune": _pruner(_BACKWARD_CONFIGS)},
    pre_hook=_zero_accumulators,
    **_DISK_CACHE,
)(hstu_attn_backward_dkdv_kernel)

backward_dq = triton.autotune(
    configs=_configs(_FORWARD_CONFIGS),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _pruner(_FORWARD_CONFIGS)},
    **_DISK_CACHE,
)(hstu_attn_backward_dq_kernel)
