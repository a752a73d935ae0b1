"""`HSTUConfig.fused_norm_gate`: the HSTU layer with the fused LayerNorm-gate-dropout kernel equals the plain layer.

The fused kernel (`hstu_attn.norm_gate`) runs on the GPU when there is one, else under the Triton interpreter on CPU
(`TRITON_INTERPRET=1`, set by the root conftest), at tiny sizes, forced on with `fused_norm_gate=True`; the
attention uses the PyTorch backend.
"""

from __future__ import annotations

import os

import pytest
import torch

from gr_models.configs import KernelBackend, get_hstu_config
from gr_models.modules import hstu_layer as hstu_layer_module
from gr_models.modules.hstu_layer import HSTULayer, TensorParallelHSTULayer
from gr_models.modules.preprocessing import HSTUSequence

HIDDEN, HEADS, HEAD_DIM = 12, 3, 6  # attention width 18: not a power of two
LENGTHS, TARGETS = [6, 1, 4], [2, 0, 1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the fused kernel on CPU needs TRITON_INTERPRET=1",
)


def _sequence(lengths: list[int], targets: list[int], device: torch.device = DEVICE) -> HSTUSequence:
    return HSTUSequence.for_layers(lengths, targets, device=device)


def _layers(device: torch.device = DEVICE, **kwargs) -> tuple[HSTULayer, HSTULayer]:
    """(plain, fused) layers on `device` with equal, non-trivial parameters."""

    def build(fused: bool) -> HSTULayer:
        config = get_hstu_config(
            HIDDEN, HEAD_DIM, HEADS, 1, kernel_backend=KernelBackend.PYTORCH, fused_norm_gate=fused, **kwargs
        )
        return HSTULayer(config).to(device)

    plain, fused = build(False), build(True)
    with torch.no_grad():
        for param in plain.parameters():
            param.add_(0.1 * torch.randn_like(param))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


class _CountingGate:
    """Stands in for `layer_norm_gate` in the layer module and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = hstu_layer_module.layer_norm_gate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def _run(layer: HSTULayer, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, list, int]:
    """(output, gradients of x and every parameter, bytes autograd saved)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = x.detach().to(DEVICE).clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, _sequence(LENGTHS, TARGETS))
    grads = torch.autograd.grad((out.float() * weights.to(DEVICE)).sum(), [x, *layer.parameters()])
    return out, list(grads), sum(saved)


@needs_triton
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_fused_layer_matches_plain_layer(affine: bool, recompute: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    plain, fused = _layers(layer_norm_affine=affine, recompute_cheap_activations=recompute)
    counter = _CountingGate()
    monkeypatch.setattr(hstu_layer_module, "layer_norm_gate", counter)
    x = torch.randn(sum(LENGTHS), HIDDEN)
    weights = torch.randn(sum(LENGTHS), HIDDEN)
    out_plain, grads_plain, _ = _run(plain, x, weights)
    assert counter.calls == 0
    out_fused, grads_fused, _ = _run(fused, x, weights)
    assert counter.calls == 1
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-6)
    names = ["x", *(name for name, _ in plain.named_parameters())]
    for name, got, want in zip(names, grads_fused, grads_plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_triton
def test_fused_layer_saves_no_normalized_activation() -> None:
    """The plain layer keeps LayerNorm(attn) `[L, H * D]` for the product's backward; the fused one does not."""
    torch.manual_seed(1)
    plain, fused = _layers()
    x, weights = torch.randn(sum(LENGTHS), HIDDEN), torch.randn(sum(LENGTHS), HIDDEN)
    _, _, bytes_plain = _run(plain, x, weights)
    _, _, bytes_fused = _run(fused, x, weights)
    assert bytes_plain - bytes_fused >= sum(LENGTHS) * HEADS * HEAD_DIM * 4


@needs_triton
def test_fused_layer_under_bf16_autocast_is_close_to_plain() -> None:
    """Under autocast the plain path rounds LayerNorm(attn) to bf16 before the product, the fused one does not."""
    torch.manual_seed(2)
    plain, fused = _layers()
    x, weights = torch.randn(sum(LENGTHS), HIDDEN), torch.randn(sum(LENGTHS), HIDDEN)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out_plain, grads_plain, _ = _run(plain, x, weights)
        out_fused, grads_fused, _ = _run(fused, x, weights)
    torch.testing.assert_close(out_fused, out_plain, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads_fused, grads_plain):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=2e-2 * scale)


@needs_triton
def test_fused_layer_compiles_without_graph_breaks() -> None:
    """torch.compile(fullgraph=True) traces the fused layer: the kernels' custom ops stay opaque."""
    torch.manual_seed(5)
    plain, fused = _layers()
    x, weights = torch.randn(sum(LENGTHS), HIDDEN), torch.randn(sum(LENGTHS), HIDDEN)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    out_plain, grads_plain, _ = _run(plain, x, weights)
    out_compiled, grads_compiled, _ = _run(compiled, x, weights)  # type: ignore[arg-type]
    torch.testing.assert_close(out_compiled, out_plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_compiled, grads_plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_triton
def test_fused_dropout_acts_in_training_only() -> None:
    torch.manual_seed(3)
    plain, fused = _layers(dropout=0.5)
    x, sequence = torch.randn(sum(LENGTHS), HIDDEN, device=DEVICE), _sequence(LENGTHS, TARGETS)
    plain.eval()
    fused.eval()
    torch.testing.assert_close(fused(x, sequence), plain(x, sequence), rtol=1e-5, atol=1e-6)
    fused.train()
    first, second = fused(x, sequence), fused(x, sequence)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("switch", ["default", None])
def test_default_and_auto_keep_the_plain_path_on_cpu(monkeypatch: pytest.MonkeyPatch, switch: str | None) -> None:
    torch.manual_seed(4)
    kwargs = {} if switch == "default" else {"fused_norm_gate": switch}
    layer = HSTULayer(get_hstu_config(HIDDEN, HEAD_DIM, HEADS, 1, kernel_backend=KernelBackend.PYTORCH, **kwargs))
    assert layer.config.fused_norm_gate is None  # the default is auto
    counter = _CountingGate()
    monkeypatch.setattr(hstu_layer_module, "layer_norm_gate", counter)
    layer(torch.randn(sum(LENGTHS), HIDDEN), _sequence(LENGTHS, TARGETS, torch.device("cpu")))
    assert counter.calls == 0


def test_forced_fusion_without_a_triton_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    _, fused = _layers(cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused_norm_gate=True"):
        fused(torch.randn(sum(LENGTHS), HIDDEN), _sequence(LENGTHS, TARGETS, cpu))


def test_config_switch_is_checked_and_tensor_parallel_layer_never_fuses() -> None:
    with pytest.raises(ValueError, match="fused_norm_gate"):
        get_hstu_config(HIDDEN, HEAD_DIM, HEADS, 1, fused_norm_gate=1)  # type: ignore[arg-type]
    attn = torch.zeros(2, HEADS * HEAD_DIM)
    tensor_parallel = object.__new__(TensorParallelHSTULayer)  # no process group needed for this method
    assert tensor_parallel._use_fused_norm_gate(attn, attn, attn.dtype) is False
