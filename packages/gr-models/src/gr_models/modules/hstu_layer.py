"""One HSTU layer on jagged tokens.

normed   = LayerNorm(x)
u, v, q, k = split(SiLU(normed @ W_uvqk + b_uvqk))          # each [L, H * kv_channels]
attn     = hstu_attention(q, k, v)                            # [L, H * kv_channels]
y        = Dropout(LayerNorm(attn) * u) @ W_o + b_o
out      = x + y

`HSTUConfig.fused_norm_gate` (None, the default: auto) runs `Dropout(LayerNorm(attn) * u)` as one Triton kernel
(`hstu_attn.norm_gate`) on CUDA inputs; the plain PyTorch ops otherwise (or always with False).

`TensorParallelHSTULayer` splits the heads across the tensor-parallel group (`build_hstu_layer` picks it when
that group has more than one rank).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gr_models.configs.hstu_config import HSTUConfig, RelativeBiasConfig
from gr_models.modules.jagged import token_coordinates
from gr_models.modules.preprocessing import HSTUSequence
from gr_models.modules.recompute import recompute_in_backward
from gr_parallel import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_world_size,
    model_parallel_is_initialized,
)
from gr_parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayerNorm,
    copy_to_tensor_parallel_region,
    fork_tensor_parallel_rng,
)
from hstu_attn import RelativeBias, hstu_attn_varlen_func
from hstu_attn.norm_gate import MAX_WIDTH as NORM_GATE_MAX_WIDTH
from hstu_attn.norm_gate import layer_norm_gate, layer_norm_gate_supported
from hstu_attn.relative_bias import bucketize_time_delta


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
        for table in (self.position_weights, self.time_weights):
            if table is not None and config.init_std > 0:
                nn.init.normal_(table, std=config.init_std)

    def forward(self, timestamps: Tensor | None) -> RelativeBias:
        if self.time_weights is not None and timestamps is None:
            raise ValueError("the relative time bias needs timestamps: give the batch a timestamp_feature_name")
        return RelativeBias(
            position_weights=self.position_weights,
            time_weights=self.time_weights,
            timestamps=timestamps if self.time_weights is not None else None,
            time_bucket_divisor=self.config.time_bucket_divisor,
        )

    def dense(self, sequence: HSTUSequence, dtype: torch.dtype) -> Tensor:
        """The bias as a dense `rab [B, 1, N, N]` (N = `sequence.max_len`) with each query at its next token's time.

        Entry `[b, 0, i, j]` = position term of `j - i` + time term of `t_j - t'_i`, where `t'_i` is the time of
        token `i + 1` of sequence `b` (token `i`'s own time for the last token). Padded entries are arbitrary.
        """
        if self.time_weights is None:
            raise ValueError("relative_bias.query_time='next_token' needs the time bias (use_time=True)")
        if sequence.timestamps is None:
            raise ValueError("the relative time bias needs timestamps: give the batch a timestamp_feature_name")
        times, max_len = sequence.timestamps, sequence.max_len
        offsets = sequence.offsets.to(device=times.device, dtype=torch.int64)
        lengths = offsets[1:] - offsets[:-1]
        num_sequences = lengths.numel()
        sequence_ids, positions = token_coordinates(lengths, times.numel())
        is_last = positions == lengths[sequence_ids] - 1
        query_times = torch.where(is_last, times, times.roll(-1)) if times.numel() else times
        padded = times.new_zeros(2, num_sequences, max_len)
        padded[0].index_put_((sequence_ids, positions), times)
        padded[1].index_put_((sequence_ids, positions), query_times)
        delta = padded[0][:, None, :] - padded[1][:, :, None]
        buckets = bucketize_time_delta(delta, self.config.time_bucket_divisor, self.config.num_time_buckets)
        columns = RelativeBias(position_weights=self.position_weights).position_columns(max_len, times.device)
        bias = self.time_weights[0][buckets] + self.position_weights[0][columns]
        return bias.unsqueeze(1).to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _residual_add(x: Tensor, y: Tensor) -> Tensor:
    """`x + y` in x's dtype. A lower-precision y (bf16 under autocast, float32 x) is widened inside the add, so
    no separate float32 copy of y `[L, hidden]` is written; the result equals `x + y.to(x.dtype)` bit for bit."""
    if torch.promote_types(x.dtype, y.dtype) != x.dtype:
        y = y.to(x.dtype)
    return x + y


class HSTULayer(nn.Module):
    """See the module docstring. Input and output: `[L, hidden_size]` jagged by `sequence.offsets`."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.kv_channels
        self.num_heads, self.head_dim = heads, head_dim
        self.config = config
        affine = config.layer_norm_affine
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=affine)
        self.uvqk = nn.Linear(config.hidden_size, 4 * heads * head_dim, bias=config.uvqk_bias)
        self.attention_norm = nn.LayerNorm(heads * head_dim, eps=config.layer_norm_eps, elementwise_affine=affine)
        self.output = nn.Linear(heads * head_dim, config.hidden_size)
        self.relative_bias = RelativeAttentionBias(config.relative_bias) if config.relative_bias is not None else None
        self.alpha = config.alpha if config.alpha is not None else 1.0 / math.sqrt(head_dim)
        for linear in (self.uvqk, self.output):
            config.init_method(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if config.uvqk_init_std is not None:
            nn.init.normal_(self.uvqk.weight, std=config.uvqk_init_std)
        if config.output_bias_init == "uniform":
            bound = 1.0 / math.sqrt(heads * head_dim)
            nn.init.uniform_(self.output.bias, -bound, bound)

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
        rab, relative_bias = self._attention_bias(sequence, q.dtype)
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
            rab=rab,
            relative_bias=relative_bias,
            backend=self.config.kernel_backend,
        ).reshape(-1, width)
        return _residual_add(x, self.output(self._norm_gate(attn, u, dtype)))

    def _norm_gate(self, attn: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
        """`Dropout(LayerNorm(attn) * u)` `[L, H * kv_channels]` in `dtype`: fused or plain, see `fused_norm_gate`."""
        if self._use_fused_norm_gate(attn, u, dtype):
            norm = self.attention_norm
            return layer_norm_gate(attn, u, norm.weight, norm.bias, norm.eps, self.config.dropout, self.training)
        normed_attn = self._normalize(self.attention_norm, attn, dtype)
        if self.config.recompute_cheap_activations:
            with recompute_in_backward(normed_attn, lambda: self._normalize(self.attention_norm, attn, dtype)):
                gated = normed_attn * u
        else:
            gated = normed_attn * u
        return self._dropout(gated)

    def _use_fused_norm_gate(self, attn: Tensor, u: Tensor, dtype: torch.dtype) -> bool:
        """`config.fused_norm_gate`: True (the kernel must run here), False, or None (CUDA inputs it supports)."""
        switch = self.config.fused_norm_gate
        if switch is False or (switch is None and not attn.is_cuda):
            return False
        supported = attn.dtype == dtype and layer_norm_gate_supported(attn, u)
        if switch and not supported:
            raise ValueError(
                f"fused_norm_gate=True, but layer_norm_gate does not run on attn {attn.dtype} / u {u.dtype} "
                f"(compute dtype {dtype}) of width {attn.shape[-1]} on {attn.device}: it needs CUDA tensors (or "
                "TRITON_INTERPRET=1 on CPU), Triton, float32/bfloat16/float16 and width <= "
                f"{NORM_GATE_MAX_WIDTH}; set fused_norm_gate to None or False"
            )
        return supported

    def _attention_bias(self, sequence: HSTUSequence, dtype: torch.dtype) -> tuple[Tensor | None, RelativeBias | None]:
        """(dense `rab`, fused `RelativeBias`) for the attention call: at most one of them, or neither."""
        if self.relative_bias is not None and self.relative_bias.config.query_time == "next_token":
            return self.relative_bias.dense(sequence, dtype), None
        return None, self._relative_bias(sequence.timestamps)

    def _relative_bias(self, timestamps: Tensor | None) -> RelativeBias | None:
        return self.relative_bias(timestamps) if self.relative_bias is not None else None

    def _dropout(self, gated: Tensor) -> Tensor:
        return F.dropout(gated, p=self.config.dropout, training=self.training)


class TensorParallelHSTULayer(HSTULayer):
    """`HSTULayer` with its heads split over the tensor-parallel group of gr-parallel's model-parallel state.

    Each rank holds `num_attention_heads / size` heads: the UVQK projection is column-parallel by heads (the rank's
    u, v, q and k rows, Megatron stride 4), attention runs on the rank's heads only, the attention LayerNorm spans
    all heads (statistics all-reduced; weight and bias split by heads), and the output projection is row-parallel
    (all-reduced output, replicated bias). The input LayerNorm and the relative-bias tables are replicated; the
    tables' gradients, partial per rank, are all-reduced in backward. Dropout draws from the rank's own stream
    (`gr_parallel.tensor_parallel.fork_tensor_parallel_rng`). The LayerNorm-gate-dropout step is never fused here
    (`config.fused_norm_gate` is ignored): its statistics are all-reduced between the normalization and the gate.

    The full one-rank layer is built first and each rank keeps its slices, so for the same seed the layer equals
    `HSTULayer(config)`. Parameter names are `HSTULayer`'s; sharded parameters carry Megatron's
    `tensor_model_parallel`, `partition_dim` and `partition_stride` attributes.
    """

    def __init__(self, config: HSTUConfig) -> None:
        group = get_tensor_model_parallel_group()
        size = group.size()
        if not (config.layer_norm_affine and config.uvqk_bias):
            raise NotImplementedError(
                "layer_norm_affine=False / uvqk_bias=False are not implemented with tensor parallelism (its split "
                "layer norm and column-parallel UVQK expect a weight and bias); use the defaults or TP size 1"
            )
        if config.relative_bias is not None and config.relative_bias.query_time == "next_token":
            raise NotImplementedError(
                "relative_bias.query_time='next_token' is not implemented with tensor parallelism (its dense bias "
                "would need its table gradients summed over the group); use query_time='own' or TP size 1"
            )
        if config.num_attention_heads % size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not divisible by the tensor-parallel size "
                f"{size}: every rank must hold the same number of whole heads"
            )
        super().__init__(config)
        self.num_heads = config.num_attention_heads // size
        self.uvqk = ColumnParallelLinear.from_linear(self.uvqk, stride=4, group=group)
        self.attention_norm = TensorParallelLayerNorm.from_layer_norm(self.attention_norm, group=group)
        self.output = RowParallelLinear.from_linear(self.output, group=group)
        self.group = group

    def _relative_bias(self, timestamps: Tensor | None) -> RelativeBias | None:
        bias = super()._relative_bias(timestamps)
        if bias is None:
            return None
        return dataclasses.replace(
            bias,
            position_weights=self._full_gradient(bias.position_weights),
            time_weights=self._full_gradient(bias.time_weights),
        )

    def _full_gradient(self, table: Tensor | None) -> Tensor | None:
        """A replicated table used by this rank's heads only: identity forward, gradient summed over the group."""
        return copy_to_tensor_parallel_region(table, self.group) if table is not None else None

    def _use_fused_norm_gate(self, attn: Tensor, u: Tensor, dtype: torch.dtype) -> bool:
        return False  # the attention LayerNorm's statistics span the group: no fused kernel for that

    def _dropout(self, gated: Tensor) -> Tensor:
        if not self.training or self.config.dropout == 0.0:
            return gated
        with fork_tensor_parallel_rng(gated.device):
            return super()._dropout(gated)


def build_hstu_layer(config: HSTUConfig) -> HSTULayer:
    """`TensorParallelHSTULayer` when gr-parallel's tensor-parallel group has more than one rank, else `HSTULayer`."""
    if model_parallel_is_initialized() and get_tensor_model_parallel_world_size() > 1:
        return TensorParallelHSTULayer(config)
    return HSTULayer(config)
