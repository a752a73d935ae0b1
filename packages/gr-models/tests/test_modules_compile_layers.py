"""`HSTUConfig.compile_layers`: the blocks compile their layers in place, and a compiled layer computes what the
eager one computes (forward and gradients), on CPU with TorchInductor."""

from __future__ import annotations

import pytest
import torch

from gr_models.configs import KernelBackend, get_hstu_config
from gr_models.modules.hstu_block import HSTUBlock
from gr_models.modules.preprocessing import HSTUSequence
from gr_models.modules.sasrec_block import SASRecBlock

HIDDEN, HEADS, HEAD_DIM = 16, 2, 8


def _config(compile_layers: bool, **kwargs):
    return get_hstu_config(
        HIDDEN, HEAD_DIM, HEADS, 2, kernel_backend=KernelBackend.PYTORCH, dropout=0.0,
        compile_layers=compile_layers, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("block_class", [HSTUBlock, SASRecBlock])
def test_blocks_compile_their_layers_only_when_asked(block_class: type) -> None:
    eager, compiled = block_class(_config(False)), block_class(_config(True))
    assert all(layer._compiled_call_impl is None for layer in eager.layers)
    assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
    assert eager.state_dict().keys() == compiled.state_dict().keys()  # checkpoints unchanged


def test_compile_layers_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="compile_layers"):
        _config("yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_hstu_layers_match_eager_forward_and_backward() -> None:
    """Two batches of different shapes (the second recompiles with dynamic sizes): outputs and every gradient."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = HSTUBlock(_config(False))
    compiled = HSTUBlock(_config(True))
    compiled.load_state_dict(eager.state_dict())
    for lengths, targets in (([5, 1, 7], [1, 0, 2]), ([9, 3, 4, 2], [2, 1, 0, 1])):
        sequence = HSTUSequence.for_layers(lengths, targets)
        x = torch.randn(sum(lengths), HIDDEN)
        outputs = []
        for block in (eager, compiled):
            block.zero_grad()
            y = x
            for layer in block.layers:
                y = layer(y, sequence)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outputs.append((y.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}))
        (want, want_grads), (got, got_grads) = outputs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got_grads.keys() == want_grads.keys() and want_grads
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


def test_sequence_for_layers_checks_lengths_and_candidates() -> None:
    sequence = HSTUSequence.for_layers([3, 0, 2], [1, 0, 2])
    assert sequence.offsets.tolist() == [0, 3, 3, 5] and sequence.history_lengths.tolist() == [2, 0, 0]
    with pytest.raises(ValueError, match="num_candidates has 1 entries for 2 sequences"):
        HSTUSequence.for_layers([3, 2], [1])
    with pytest.raises(ValueError, match=r"\(n, k\) = \[\(2, 3\)\]"):
        HSTUSequence.for_layers([3, 2], [1, 3])
