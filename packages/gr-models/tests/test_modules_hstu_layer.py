"""The HSTU layer equals a from-scratch PyTorch computation (loops over sequences, explicit masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gr_models.configs import KernelBackend, RelativeBiasConfig, get_hstu_config
from gr_models.modules.hstu_layer import HSTULayer, RelativeAttentionBias
from gr_models.modules.preprocessing import HSTUSequence

HIDDEN, HEADS, HEAD_DIM = 12, 2, 8


def _sequence(lengths: list[int], targets: list[int], contextual_len: int = 0, timestamps=None) -> HSTUSequence:
    return HSTUSequence.for_layers(
        lengths, targets, scaling_seqlen=11, contextual_len=contextual_len, timestamps=timestamps
    )


def _allowed(i: int, j: int, n: int, t: int, c: int) -> bool:
    """ARCHITECTURE.md's rules for one (query i, key j) pair of a causal sequence."""
    u = n - t
    if j >= u:
        return i == j  # a target key is seen only by itself
    if i >= u:
        return True  # a target row sees all history
    return j <= i or i < c or j < c


def _from_scratch(layer: HSTULayer, x: torch.Tensor, lengths, targets, contextual_len, bias=None) -> torch.Tensor:
    p = dict(layer.named_parameters())
    normed = F.layer_norm(x, (HIDDEN,), p.get("input_norm.weight"), p.get("input_norm.bias"), eps=1e-5)
    uvqk = F.silu(normed @ p["uvqk.weight"].t() + p.get("uvqk.bias", 0.0))
    w = HEADS * HEAD_DIM
    u, v, q, k = uvqk[:, :w], uvqk[:, w : 2 * w], uvqk[:, 2 * w : 3 * w], uvqk[:, 3 * w :]
    outputs, start = [], 0
    for n, t in zip(lengths, targets):
        rows = []
        for i in range(n):
            head_rows = []
            for h in range(HEADS):
                cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                acc = torch.zeros(HEAD_DIM)
                for j in range(n):
                    if _allowed(i, j, n, t, contextual_len):
                        score = (q[start + i, cols] * k[start + j, cols]).sum() / HEAD_DIM**0.5
                        if bias is not None:
                            score = score + bias(i, j)
                        acc = acc + F.silu(score) / 11 * v[start + j, cols]
                head_rows.append(acc)
            rows.append(torch.cat(head_rows))
        outputs.append(torch.stack(rows))
        start += n
    attn = torch.cat(outputs)
    normed_attn = F.layer_norm(attn, (w,), p.get("attention_norm.weight"), p.get("attention_norm.bias"), eps=1e-5)
    return x + (normed_attn * u) @ p["output.weight"].t() + p["output.bias"]


def _layer(**kwargs) -> HSTULayer:
    config = get_hstu_config(HIDDEN, HEAD_DIM, HEADS, 1, kernel_backend=KernelBackend.PYTORCH, **kwargs)
    layer = HSTULayer(config)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1 * torch.randn_like(param))  # non-trivial LayerNorm and bias values
    return layer


def _compare(layer, lengths, targets, contextual_len, bias=None, timestamps=None) -> None:
    x = torch.randn(sum(lengths), HIDDEN, requires_grad=True)
    out = layer(x, _sequence(lengths, targets, contextual_len, timestamps))
    expected = _from_scratch(layer, x, lengths, targets, contextual_len, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *layer.parameters()], allow_unused=True)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(got), rtol=1e-4, atol=1e-5)


def test_layer_matches_from_scratch_with_targets_and_contextual_prefix() -> None:
    torch.manual_seed(0)
    _compare(_layer(), lengths=[5, 1, 4], targets=[2, 0, 1], contextual_len=1)


def test_layer_matches_from_scratch_with_relative_position_and_time_bias() -> None:
    torch.manual_seed(1)
    layer = _layer(relative_bias=RelativeBiasConfig(max_relative_position=3, num_time_buckets=4))
    with torch.no_grad():
        layer.relative_bias.position_weights.normal_()
        layer.relative_bias.time_weights.normal_()
    timestamps = torch.tensor([1, 3, 30, 300, 300, 5, 6, 60, 600])
    lengths, starts = [5, 4], [0, 5]
    pos, tim = layer.relative_bias.position_weights[0], layer.relative_bias.time_weights[0]

    def bias_of(sequence_index: int):
        def bias(i: int, j: int) -> torch.Tensor:
            delta = abs(int(timestamps[starts[sequence_index] + j] - timestamps[starts[sequence_index] + i]))
            bucket = min(int(torch.floor(torch.log(torch.tensor(float(max(delta, 1)))) / 0.301)), 3)
            return pos[max(-2, min(2, j - i)) + 2] + tim[bucket]

        return bias

    x = torch.randn(9, HIDDEN)
    out = layer(x, _sequence(lengths, [1, 0], 0, timestamps))
    expected = torch.cat(
        [
            _from_scratch(layer, x[0:5], [5], [1], 0, bias_of(0)),
            _from_scratch(layer, x[5:9], [4], [0], 0, bias_of(1)),
        ]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_next_token_query_time_buckets_the_time_of_the_next_token() -> None:
    torch.manual_seed(2)
    layer = _layer(
        relative_bias=RelativeBiasConfig(max_relative_position=3, num_time_buckets=5, query_time="next_token")
    )
    with torch.no_grad():
        layer.relative_bias.position_weights.normal_()
        layer.relative_bias.time_weights.normal_()
    timestamps = torch.tensor([1, 3, 30, 300, 3000, 7, 5, 6, 60, 9000])
    lengths, starts = [5, 1, 4], [0, 5, 6]
    pos, tim = layer.relative_bias.position_weights[0], layer.relative_bias.time_weights[0]

    def bias_of(sequence_index: int, length: int):
        def bias(i: int, j: int) -> torch.Tensor:
            start = starts[sequence_index]
            query_time = timestamps[start + min(i + 1, length - 1)]
            delta = abs(int(timestamps[start + j] - query_time))
            bucket = min(int(torch.floor(torch.log(torch.tensor(float(max(delta, 1)))) / 0.301)), 4)
            return pos[max(-2, min(2, j - i)) + 2] + tim[bucket]

        return bias

    x = torch.randn(10, HIDDEN, requires_grad=True)
    out = layer(x, _sequence(lengths, [0, 0, 0], 0, timestamps))
    expected = torch.cat(
        [
            _from_scratch(layer, x[s : s + n], [n], [0], 0, bias_of(b, n))
            for b, (s, n) in enumerate(zip(starts, lengths))
        ]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    tables = [layer.relative_bias.position_weights, layer.relative_bias.time_weights]
    grads = torch.autograd.grad((out * weights).sum(), [x, *tables])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *tables])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert grads[2].abs().sum() > 0


def test_query_time_must_be_known() -> None:
    with pytest.raises(ValueError, match="query_time must be one of"):
        RelativeBiasConfig(query_time="next")
    layer = _layer(relative_bias=RelativeBiasConfig(use_time=False, query_time="next_token"))
    with pytest.raises(ValueError, match="needs the time bias"):
        layer(torch.randn(3, HIDDEN), _sequence([3], [0], 0, torch.tensor([1, 2, 3])))


def test_relative_bias_tables_start_at_zero_or_from_init_std() -> None:
    def bias(**kwargs) -> RelativeAttentionBias:
        return RelativeAttentionBias(RelativeBiasConfig(max_relative_position=300, num_time_buckets=400, **kwargs))

    zero = bias()
    assert not zero.position_weights.any() and not zero.time_weights.any()
    torch.manual_seed(0)
    drawn = bias(init_std=0.02)
    for table in (drawn.position_weights, drawn.time_weights):
        assert 0.017 < float(table.std()) < 0.023 and abs(float(table.mean())) < 0.004
    with pytest.raises(ValueError, match="init_std must be >= 0"):
        RelativeBiasConfig(init_std=-0.1)


def test_layer_without_norm_affine_and_uvqk_bias_matches_from_scratch() -> None:
    torch.manual_seed(3)
    layer = _layer(layer_norm_affine=False, uvqk_bias=False)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"uvqk.weight", "output.weight", "output.bias"}
    _compare(layer, lengths=[4, 1, 3], targets=[1, 0, 0], contextual_len=0)


def test_recompute_keeps_outputs_and_gradients_and_saves_fewer_bytes() -> None:
    torch.manual_seed(2)
    plain = _layer()
    recomputing = _layer(recompute_cheap_activations=True)
    recomputing.load_state_dict(plain.state_dict())
    sequence = _sequence([6, 3], [1, 1])
    x = torch.randn(9, HIDDEN)

    def run(layer: HSTULayer):
        saved_bytes = []

        def pack(t):
            if isinstance(t, torch.Tensor):
                saved_bytes.append(t.numel() * t.element_size())
            return t

        x_local = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x_local, sequence)
        grads = torch.autograd.grad(out.square().sum(), [x_local, *layer.parameters()])
        return out, grads, sum(saved_bytes)

    out_a, grads_a, bytes_a = run(plain)
    out_b, grads_b, bytes_b = run(recomputing)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # recompute keeps a recipe instead of the [L, hidden] and [L, H*D] LayerNorm outputs
    assert bytes_a - bytes_b >= 9 * (HIDDEN + HEADS * HEAD_DIM) * 4


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(3)
    layer = _layer(dropout=0.5)
    x, sequence = torch.randn(6, HIDDEN), _sequence([6], [0])
    layer.eval()
    torch.testing.assert_close(layer(x, sequence), layer(x, sequence))
    layer.train()
    assert not torch.allclose(layer(x, sequence), layer(x, sequence))
