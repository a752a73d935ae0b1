"""BoundKernel's dispatch on CPU, with a stand-in for a Triton kernel and its compiled kernel: the first launch of a
variant goes through ``kernel[grid](...)``, later ones call the compiled launcher directly with the arguments and
constexprs in signature order; a new dtype, alignment, integer width or constexpr is a new variant. The GPU tests
of the table files run the real kernels through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from dynamicemb import triton_launch  # noqa: E402
from dynamicemb.triton_launch import BoundKernel  # noqa: E402


@dataclasses.dataclass
class _Param:
    do_not_specialize: bool = False
    is_constexpr: bool = False


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def run(self, *launch) -> None:
        self.runs.append(launch)


class _Kernel:
    """`kernel(x_ptr, n, scale, BLOCK: constexpr, MODE: constexpr)` with `n` not specialized."""

    __name__ = "stand_in_kernel"
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "MODE"]
    params = [_Param(), _Param(do_not_specialize=True), _Param(), _Param(is_constexpr=True), _Param(is_constexpr=True)]

    def __init__(self) -> None:
        self.jit_launches: list[tuple] = []
        self.compiled: list[_Compiled] = []

    def __getitem__(self, grid):
        def launch(*args, **keywords):
            self.jit_launches.append((grid, args, keywords))
            self.compiled.append(_Compiled())
            return self.compiled[-1]

        return launch


@pytest.fixture
def compiled_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a GPU: not interpreted, no launch hook, a current stream."""
    monkeypatch.setattr(triton_launch, "_interpreted", lambda: False)
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: False)

    class _Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)

    class _Driver:
        active = _Active()

    monkeypatch.setattr(triton_launch, "driver", _Driver)


def test_first_launch_binds_later_launches_call_the_launcher(compiled_launches: None) -> None:
    kernel = _Kernel()
    bound = BoundKernel(kernel)
    x = torch.zeros(8)
    bound(3, x, 5, 7, BLOCK=128, MODE=1, num_warps=4)
    assert kernel.jit_launches == [((3,), (x, 5, 7), {"BLOCK": 128, "MODE": 1, "num_warps": 4})]
    bound(9, x, 6, 7, MODE=1, BLOCK=128, num_warps=4)  # keywords in another order: another key, bound again
    bound(9, x, 6, 7, MODE=1, BLOCK=128, num_warps=4)
    assert len(kernel.jit_launches) == 2
    ((grid, one, two, stream, function, metadata, launch_metadata, enter, leave, *rest),) = kernel.compiled[1].runs
    assert (grid, one, two, stream, function, metadata) == (9, 1, 1, 1234, "function", "metadata")
    assert (launch_metadata, enter, leave) == (None, None, None)
    assert rest == [x, 6, 7, 128, 1]  # arguments, then the constexprs in signature order


@pytest.mark.parametrize(
    "change",
    [
        dict(x=torch.zeros(8, dtype=torch.float64)),  # dtype
        dict(x=torch.zeros(9)[1:]),  # 4-byte offset: not 16-byte aligned
        dict(scale=16),  # a specialized integer that is a multiple of 16
        dict(scale=1),  # a specialized integer equal to 1
        dict(scale=2**40),  # 64-bit
        dict(n=2**40),  # 64-bit, although n is not specialized on its value
        dict(BLOCK=64),  # a constexpr
    ],
)
def test_what_triton_specializes_on_is_a_new_variant(compiled_launches: None, change: dict) -> None:
    kernel = _Kernel()
    bound = BoundKernel(kernel)
    base = dict(x=torch.zeros(8), n=5, scale=7, BLOCK=128)
    for values in (base, base, {**base, **change}):
        bound(1, values["x"], values["n"], values["scale"], BLOCK=values["BLOCK"], MODE=0)
    assert len(kernel.jit_launches) == 2 and len(kernel.compiled[0].runs) == 1


def test_unspecialized_integer_values_share_a_variant(compiled_launches: None) -> None:
    kernel = _Kernel()
    bound = BoundKernel(kernel)
    x = torch.zeros(8)
    for n in (5, 16, 1, 2**31 - 1):
        bound(1, x, n, 7, BLOCK=128, MODE=0)
    assert len(kernel.jit_launches) == 1 and [run[10] for run in kernel.compiled[0].runs] == [16, 1, 2**31 - 1]


def test_interpreter_hooks_switch_and_missing_constexprs_keep_the_jit_path(monkeypatch, compiled_launches) -> None:
    kernel = _Kernel()
    bound = BoundKernel(kernel)
    x = torch.zeros(8)
    for _ in range(2):
        bound(1, x, 5, 7, BLOCK=128)  # MODE left to a default: never bound
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: True)
    for _ in range(2):
        bound(1, x, 5, 7, BLOCK=128, MODE=0)
    monkeypatch.setattr(triton_launch, "_hooks_set", lambda: False)
    monkeypatch.setattr(triton_launch, "_interpreted", lambda: True)
    for _ in range(2):
        bound(1, x, 5, 7, BLOCK=128, MODE=0)
    monkeypatch.setattr(triton_launch, "_interpreted", lambda: False)
    monkeypatch.setattr(triton_launch, "ENABLED", False)  # DYNAMICEMB_BOUND_LAUNCHES=0
    for _ in range(2):
        bound(1, x, 5, 7, BLOCK=128, MODE=0)
    assert len(kernel.jit_launches) == 8 and not any(c.runs for c in kernel.compiled)


def test_num_programs_is_triton_cdiv() -> None:
    from dynamicemb.triton_launch import num_programs

    for n in (0, 1, 127, 128, 129, 65536, 2**40 + 3):
        for block in (1, 128, 1024):
            assert num_programs(n, block) == triton.cdiv(n, block)


class _Recording:
    """Wraps a real kernel (its arg names) so that a launch records and returns a stand-in compiled kernel."""

    def __init__(self, kernel) -> None:
        self.__name__, self.arg_names = kernel.__name__, kernel.arg_names
        self.jit_launches, self.compiled = 0, _Compiled()

    def __getitem__(self, grid):
        def launch(*args, **keywords):
            self.jit_launches += 1
            return self.compiled

        return launch


def _record(monkeypatch: pytest.MonkeyPatch, bound: list[BoundKernel]) -> None:
    for kernel in bound:
        monkeypatch.setattr(kernel, "kernel", _Recording(kernel.kernel))
        monkeypatch.setattr(kernel, "_variants", {})


def _check_bound_once(bound: list[BoundKernel], direct_launches: int) -> None:
    for kernel in bound:
        assert kernel.kernel.jit_launches == 1, kernel.__name__
        runs = kernel.kernel.compiled.runs
        assert len(runs) == direct_launches, kernel.__name__
        assert all(len(run) == 9 + len(kernel.kernel.arg_names) for run in runs), kernel.__name__


def test_the_hash_index_kernels_take_the_direct_path_from_their_second_call(
    monkeypatch: pytest.MonkeyPatch, compiled_launches: None
) -> None:
    """Each kernel of an evicting find_or_insert passes all of its constexprs (else it would never be bound) and its
    direct launches carry one value per parameter of the real signature. Nothing runs: the launches are recorded."""
    from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table, triton_backend

    bound = [triton_backend._FIND_OR_INSERT, triton_backend._PLACE_DEFERRED, triton_backend._EVICT_GROUPED]
    _record(monkeypatch, bound)
    table = create_hash_table(
        init_capacity=1024, max_capacity=1024, bucket_capacity=128, backend="triton",
        score_strategy=DynamicEmbScoreStrategy.TIMESTAMP, device=torch.device("cpu"), warm_up=False,
    )  # fmt: skip
    # The interpreter's kernels (these tests' kernels) carry no do_not_specialize information, so every integer
    # counts as specialized here: scores and epochs start past 1 and stay off multiples of 16 over the calls.
    table._clock, table._epoch = 100, 40
    keys = torch.arange(64, dtype=torch.int64)
    for _ in range(3):
        table.find_or_insert(keys)
    _check_bound_once(bound, direct_launches=2)


def test_the_row_and_optimizer_kernels_take_the_direct_path_from_their_second_call(
    monkeypatch: pytest.MonkeyPatch, compiled_launches: None
) -> None:
    """As above for the value-row kernels and the fused optimizer kernel (all of their constexprs passed)."""
    from dynamicemb.optimizer import DynamicEmbOptimizerArgs, DynamicEmbOptimizerType, FusedOptimizer
    from dynamicemb.storage import row_moves
    from dynamicemb.triton_optimizer import _FUSED_UPDATE, fused_update_triton_

    bound = [
        row_moves._GATHER_ROWS, row_moves._SCATTER_ROWS, row_moves._GATHER_SPLIT_ROWS, row_moves._SCATTER_SPLIT_ROWS,
        _FUSED_UPDATE,
    ]  # fmt: skip
    _record(monkeypatch, bound)
    optimizer = FusedOptimizer(DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM), 8)
    values, device_part, host_part = torch.zeros(40, 8 + optimizer.state_dim), torch.zeros(20, 8), torch.zeros(20, 8)
    slots, rows = torch.arange(17, 34), torch.ones(17, 8)  # 17 rows: neither 1 nor a multiple of 16
    for step in (2, 3, 4):
        row_moves.gather_rows(values, slots, use_triton=True)
        row_moves.scatter_rows(values, slots, torch.ones(17, values.shape[1]), use_triton=True)
        row_moves.gather_split_rows(device_part, host_part, slots)
        row_moves.scatter_split_rows(device_part, host_part, slots, rows)
        fused_update_triton_(values, slots, rows, optimizer, step)
    _check_bound_once(bound, direct_launches=2)
