"""One HSTU layer on jagged tokens.

normed   = LayerNorm(x)
u, v, q, k = split(SiLU(normed @ W_uvqk + b_uvqk))          # each [L, H * kv_channels]
attn     = hstu_attention(q, k, v)                            # [L, H * kv_channels]
y        = Dropout(LayerNorm(attn) * u) @ W_o + b_o
out      = x + y
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gr_models.configs.hstu_config import HSTUConfig, RelativeBiasConfig
from gr_models.modules.preprocessing import HSTUSequence
from gr_models.modules.recompute import recompute_in_backward
from hstu_attn import RelativeBias, hstu_attn_varlen_func


class RelativeAttentionBias(nn.Module):
    """Learned position (and time) bias tables of one layer, handed to the attention kernel as `RelativeBias`.

    Tables have one row shared by all heads. Position bias covers distances up to `max_relative_position - 1`;
    the time bias (`num_time_buckets` log buckets) needs token timestamps.
    """

    def __init__(self, config: RelativeBiasConfig) -> None:
        super().__init__()
        self.config = config
        self.position_weights = nn.Parameter(torch.zeros(1, 2 * config.max_relative_position - 1))
        self.time_weights = nn.Parameter(torch.zeros(1, config.num_time_buckets)) if config.use_time else None

    def forward(self, timestamps: Tensor | None) -> RelativeBias:
        if self.time_weights is not None and timestamps is None:
            raise ValueError("the relative time bias needs timestamps: give the batch a timestamp_feature_name")
        return RelativeBias(
            position_weights=self.position_weights,
            time_weights=self.time_weights,
            timestamps=timestamps if self.time_weights is not None else None,
            time_bucket_divisor=self.config.time_bucket_divisor,
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class HSTULayer(nn.Module):
    """See the module docstring. Input and output: `[L, hidden_size]` jagged by `sequence.offsets`."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.kv_channels
        self.num_heads, self.head_dim = heads, head_dim
        self.config = config
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.uvqk = nn.Linear(config.hidden_size, 4 * heads * head_dim)
        self.attention_norm = nn.LayerNorm(heads * head_dim, eps=config.layer_norm_eps)
        self.output = nn.Linear(heads * head_dim, config.hidden_size)
        self.relative_bias = RelativeAttentionBias(config.relative_bias) if config.relative_bias is not None else None
        self.alpha = config.alpha if config.alpha is not None else 1.0 / math.sqrt(head_dim)
        for linear in (self.uvqk, self.output):
            config.init_method(linear.weight)
            nn.init.zeros_(linear.bias)
        if config.uvqk_init_std is not None:
            nn.init.normal_(self.uvqk.weight, std=config.uvqk_init_std)

    def _normalize(self, norm: nn.LayerNorm, x: Tensor, dtype: torch.dtype) -> Tensor:
        return norm(x).to(dtype)

    def forward(self, x: Tensor, sequence: HSTUSequence) -> Tensor:
        """`x [L, hidden]` -> `[L, hidden]` for the token layout described by `sequence`."""
        dtype = _compute_dtype(x)
        recompute = self.config.recompute_cheap_activations
        normed = self._normalize(self.input_norm, x, dtype)
        if recompute:
            with recompute_in_backward(normed, lambda: self._normalize(self.input_norm, x, dtype)):
                uvqk = self.uvqk(normed)
        else:
            uvqk = self.uvqk(normed)
        width = self.num_heads * self.head_dim
        u, v, q, k = F.silu(uvqk).split([width] * 4, dim=-1)
        shape = (-1, self.num_heads, self.head_dim)
        attn = hstu_attn_varlen_func(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            sequence.offsets,
            sequence.max_len,
            alpha=self.alpha,
            causal=self.config.is_causal,
            num_targets=sequence.num_candidates,
            contextual_seq_len=sequence.contextual_len,
            max_attn_len=self.config.max_attn_len,
            scaling_seqlen=sequence.scaling_seqlen,
            relative_bias=self.relative_bias(sequence.timestamps) if self.relative_bias is not None else None,
            backend=self.config.kernel_backend,
        ).reshape(-1, width)
        normed_attn = self._normalize(self.attention_norm, attn, dtype)
        if recompute:
            with recompute_in_backward(normed_attn, lambda: self._normalize(self.attention_norm, attn, dtype)):
                gated = normed_attn * u
        else:
            gated = normed_attn * u
        gated = F.dropout(gated, p=self.config.dropout, training=self.training)
        return x + self.output(gated).to(x.dtype)
