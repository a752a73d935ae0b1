"""Launch configurations of the HSTU attention kernels, chosen per tuning key by timing a few candidates once.

The key holds the max sequence length rounded up to a power of two, the number of (sequence, head) pairs
rounded likewise, the head dims, dtype and the compile-time options, so a new max length re-tunes only when it
crosses a power of two (a second or two per key) and every later call is a dictionary lookup: the per-call
host cost matters, since short jagged batches run in tens of microseconds. Under `TRITON_INTERPRET=1` (CPU
tests) one tiny configuration is used: every program instance costs tens of milliseconds there.
`HSTU_ATTN_TRITON_AUTOTUNE=0` skips timing and takes the first candidate that fits the GPU's shared memory (quick
GPU test runs);
`HSTU_ATTN_TRITON_CANDIDATE=i` takes candidate i (to compile candidates in parallel processes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

__all__ = [
    "AUTOTUNE",
    "INTERPRET",
    "LaunchConfig",
    "TunedKernel",
    "deterministic_config",
    "launch_config",
    "next_power_of_two",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("HSTU_ATTN_TRITON_AUTOTUNE", "1") != "0"
# HSTU_ATTN_TRITON_CANDIDATE=i uses only candidate i (e.g. to compile the candidates in parallel processes).
ONLY_CANDIDATE = os.environ.get("HSTU_ATTN_TRITON_CANDIDATE")


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # key columns per tile
    num_warps: int
    num_stages: int
    # dK/dV kernel only: dV in one launch (PASS=1) and dK with everything else in a second (PASS=2), so a program
    # holds one [BLOCK_N, D] accumulator instead of two (fewer registers at head dim 256, one more product).
    split_dkdv: bool = False

    def meta(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    def launches(self) -> list[dict[str, int]]:
        """Meta-parameters of each launch this config makes: one, or the dV and dK passes when `split_dkdv`."""
        if not self.split_dkdv:
            return [self.meta()]
        return [{**self.meta(), "PASS": 1}, {**self.meta(), "PASS": 2}]


_INTERPRETER = LaunchConfig(16, 16, 1, 1)

# Candidates by max(Dqk, Dv) class, the first being the default when tuning is off.
FORWARD_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 1)],
}
BACKWARD_CANDIDATES = {
    64: [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (128, 128, 8, 2)],
    128: [
        (64, 128, 8, 2),
        (32, 128, 8, 2),
        (64, 64, 4, 2),
        (32, 64, 4, 2),
        (64, 128, 8, 1),
        (128, 128, 8, 1),
        (64, 128, 8, 2, True),
        (128, 128, 8, 2, True),
    ],
    256: [
        (64, 64, 8, 1),
        (32, 64, 4, 1),
        (32, 128, 8, 1),
        (64, 64, 4, 1),
        (16, 64, 4, 2),
        # key blocks of 32 halve the dK/dV accumulators per program (at BLOCK_N 64 they fill the registers)
        (64, 32, 8, 1),
        (64, 32, 8, 2),
        (128, 32, 8, 1),
        # split dK/dV (LaunchConfig.split_dkdv): one accumulator per program in each of two launches
        (64, 64, 8, 2, True),
        (64, 64, 8, 1, True),
        (32, 64, 4, 2, True),
        (128, 64, 8, 1, True),
    ],
}
_DETERMINISTIC = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 64, 4, 1)}


def next_power_of_two(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else head_dim


def deterministic_config(head_dim: int) -> LaunchConfig:
    """The fixed launch configuration of the deterministic backward (its scratch sizes depend on it)."""
    if INTERPRET:
        return _INTERPRETER
    return LaunchConfig(*_DETERMINISTIC[_head_dim_class(head_dim)])


class TunedKernel:
    """A Triton kernel plus the launch configuration chosen for each tuning key."""

    def __init__(
        self,
        kernel: Any,
        candidates: dict[int, list[tuple[int, int, int, int] | tuple[int, int, int, int, bool]]],
        interpreter: LaunchConfig = _INTERPRETER,
    ) -> None:
        self.kernel = kernel
        self.candidates = candidates
        self.interpreter = interpreter  # the one config under TRITON_INTERPRET=1
        self.chosen: dict[tuple, LaunchConfig] = {}

    def launch(
        self,
        key: tuple,
        head_dim: int,
        grid: Callable[[LaunchConfig], tuple[int]],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        accumulators: Sequence[torch.Tensor | None] = (),
    ) -> None:
        """Launch with the configuration of `key`; the first call with a key times the candidates.

        `accumulators` are zeroed before each timed run (the kernel adds into them) and once more afterwards.
        """
        config = self.chosen.get(key)
        if config is None:
            config = self._choose(head_dim, grid, args, kwargs, accumulators)
            self.chosen[key] = config
        launch_config(self.kernel, config, grid, args, kwargs)

    def _choose(self, head_dim, grid, args, kwargs, accumulators) -> LaunchConfig:
        if INTERPRET:
            return self.interpreter
        candidates = [LaunchConfig(*c) for c in self.candidates[_head_dim_class(head_dim)]]
        if ONLY_CANDIDATE is not None:
            return candidates[int(ONLY_CANDIDATE) % len(candidates)]
        timings: dict[LaunchConfig, float] = {}
        for config in candidates:

            def run(config: LaunchConfig = config) -> None:
                _zero(accumulators)
                launch_config(self.kernel, config, grid, args, kwargs)

            try:
                run()  # compiles; raises OutOfResources when the config needs more shared memory than the GPU has
            except OutOfResources:
                continue
            if not AUTOTUNE:
                timings = {config: 0.0}
                break
            timings[config] = float(triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median"))
        _zero(accumulators)
        if not timings:
            raise RuntimeError(f"no launch configuration of {self.kernel.__name__} fits this GPU")
        return min(timings, key=timings.__getitem__)


def launch_config(
    kernel: Any, config: LaunchConfig, grid: Callable[[LaunchConfig], tuple[int]], args: Sequence[Any], kwargs: dict
) -> None:
    """Launch `kernel` on `grid(config)` once per entry of `config.launches()` (twice for a split dK/dV)."""
    for meta in config.launches():
        kernel[grid(config)](*args, **kwargs, **meta)


def _zero(accumulators: Sequence[torch.Tensor | None]) -> None:
    for tensor in accumulators:
        if tensor is not None:
            tensor.zero_()
