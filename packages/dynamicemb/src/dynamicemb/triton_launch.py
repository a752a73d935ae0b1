"""Triton launches that bind a compiled kernel once per variant instead of on every call.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run`` on every call: it binds and
specializes the arguments, builds the variant's cache key, looks the compiled kernel up and checks the
globals it read, about 40 us of host time per launch on the H100 machine's host (issue 21 measured the
four launches of a ``find_or_insert`` as most of its 0.24 ms). :class:`BoundKernel` takes that path on
the first launch of each variant and keeps the compiled kernel, then calls its launcher directly.

A variant is what Triton specializes a launch on: the constexprs and launch options, each tensor's dtype
and whether its address is 16-byte aligned, each integer's width (32 or 64 bits) and, for an integer
parameter not in ``do_not_specialize``, whether it is 1 or a multiple of 16. The direct path is skipped
(every launch goes through ``JITFunction.run``) under ``TRITON_INTERPRET=1``, while a launch hook is set
(profilers such as Proton), with ``DYNAMICEMB_BOUND_LAUNCHES=0`` in the environment when the module is
imported (for side-by-side timing, or should a Triton release change its launcher), and for a compiled kernel
without the launcher attributes this module uses (``run``, ``function``, ``packed_metadata``: Triton 3.6 to
3.9 have them).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from itertools import chain, repeat
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver

__all__ = ["BoundKernel", "num_programs"]

_LAUNCHER_ATTRIBUTES = ("run", "function", "packed_metadata")
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})
ENABLED = os.environ.get("DYNAMICEMB_BOUND_LAUNCHES", "1") != "0"
# Whether Triton runs kernels in its interpreter: read once, as Triton reads it when a kernel is defined (reading
# the environment costs about 3 us, once per launch before).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def num_programs(n: int, block: int) -> int:
    """Programs of ``block`` lanes that cover ``n``: ``triton.cdiv`` without its cost on the host (a
    ``constexpr_function`` call in recent Triton, a few microseconds)."""
    return -(-n // block)


def _interpreted() -> bool:
    return INTERPRETED


def _hooks_set() -> bool:
    return knobs.runtime.launch_enter_hook is not None or knobs.runtime.launch_exit_hook is not None


class BoundKernel:
    """Launches ``kernel`` (a ``@triton.jit`` function) as ``bound(grid, *args, **constexprs_and_options)``.

    ``grid`` is the number of programs (a 1-D grid). ``args`` are the kernel's non-constexpr parameters,
    in order; the keywords are its constexprs (all of them) and launch options such as ``num_warps``.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.__name__ = kernel.__name__
        # Per positional parameter: whether Triton specializes an integer passed there on 1 and 16 | value.
        # (Without these attributes, or past them, every integer counts as specialized: more variants, never a
        # wrong one.)
        self._specialized = tuple(
            not (getattr(p, "do_not_specialize", False) or getattr(p, "is_constexpr", False))
            for p in getattr(kernel, "params", ())  # none under the interpreter, which never binds
        )
        self._variants: dict[Hashable, tuple[Any, tuple]] = {}

    def __call__(self, grid: int, *args: Any, **keywords: Any) -> None:
        if not ENABLED or _interpreted() or _hooks_set():
            self.kernel[(grid,)](*args, **keywords)
            return
        key = (tuple(keywords.items()), *map(self._argument_key, args, chain(self._specialized, repeat(True))))
        bound = self._variants.get(key)
        if bound is None:
            self._bind(key, grid, args, keywords)
            return
        compiled, constants = bound
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        compiled.run(
            grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *constants
        )

    def _bind(self, key: Hashable, grid: int, args: tuple, keywords: dict[str, Any]) -> None:
        """The first launch of a variant, through ``JITFunction.run``; keeps its compiled kernel."""
        compiled = self.kernel[(grid,)](*args, **keywords)
        if hasattr(compiled, "result"):  # a compilation future
            compiled = compiled.result()
        names = self.kernel.arg_names[len(args) :]
        constexprs = {name: value for name, value in keywords.items() if name not in _OPTIONS}
        if set(names) != set(constexprs) or not all(hasattr(compiled, a) for a in _LAUNCHER_ATTRIBUTES):
            return  # defaults left out, or another launcher: this variant keeps the JITFunction path
        self._variants[key] = (compiled, tuple(constexprs[name] for name in names))

    @staticmethod
    def _argument_key(value: Any, specialized: bool) -> Hashable:
        if isinstance(value, torch.Tensor):
            return value.dtype, value.data_ptr() % 16 == 0
        if isinstance(value, bool):
            return bool
        if isinstance(value, int):
            width = _integer_type(value)
            return (width, value == 1, value % 16 == 0) if specialized else width
        return type(value)


def _integer_type(value: int) -> str:
    """The type Triton gives a Python integer argument."""
    if -(2**31) <= value < 2**31:
        return "i32"
    return "u64" if value >= 2**63 else "i64"
