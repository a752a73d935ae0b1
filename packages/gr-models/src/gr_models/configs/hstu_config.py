"""Configuration of the HSTU block: widths, depth, precision, attention backend, encodings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gr_models.utils.tensor_initializer import Initializer, XavierUniformInitializer
from hstu_attn import KernelBackend

_TIME_BUCKET_FNS = ("sqrt", "log")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PositionEncodingConfig:
    """Learned absolute encodings added to the token embeddings before the first layer.

    With `count_from="end"` (the default, for ranking) positions count back from the most recent history event
    (position 1, older events larger, clamped at `num_position_buckets - 1`; an item and its action share a
    position) and every candidate gets position 0. With `count_from="start"` the oldest event of the (truncated)
    history is position 0 and candidates continue after the last event, as in the HSTU paper's sequential
    retrieval setup. Retrieval needs "start": its training never uses the most recent event as a query (there is
    no next item to predict), so counting from the end leaves the encoding of the one position every evaluation
    query has untrained.
    With `use_time_encoding`, a learned vector per time bucket is added too; the bucket of a token is
    `fn(age / time_bucket_divisor)` with `fn` "sqrt" or "log", clamped to `num_time_buckets - 1`. With
    `time_from="query"` (the default, for ranking) the age is `query_time - token_time`, `query_time` being the
    sequence's largest timestamp. With `time_from="previous"` it is the time since the previous history event
    (0 for the first; a candidate's is its time minus the last history event's): every token then depends only
    on its own and earlier timestamps, so a training query at any position sees what an evaluation query sees.
    Retrieval needs "previous", for the reason it needs positions counted from the start.

    With `scale_embeddings`, every token embedding is multiplied by `sqrt(hidden_size)` before the encodings are
    added (the Transformer convention, as in the HSTU paper's public code): embedding tables initialized small
    (std 0.02) otherwise reach the first layer about 4x weaker than the position encoding, and their rows move
    `sqrt(hidden_size)` times less per optimizer step relative to it. `init_std` None draws the encoding tables
    uniformly from `+-1/sqrt(hidden_size)`; a value draws them from a normal truncated at 2 std.
    """

    num_position_buckets: int = 512
    use_time_encoding: bool = False
    num_time_buckets: int = 128
    time_bucket_fn: str = "sqrt"
    time_bucket_divisor: float = 1.0
    count_from: str = "end"
    time_from: str = "query"
    scale_embeddings: bool = False
    init_std: float | None = None

    def __post_init__(self) -> None:
        if self.init_std is not None and self.init_std <= 0:
            raise ValueError(f"init_std must be > 0 or None, got {self.init_std}")
        if self.count_from not in ("end", "start"):
            raise ValueError(f"count_from must be 'end' or 'start', got {self.count_from!r}")
        if self.time_from not in ("query", "previous"):
            raise ValueError(f"time_from must be 'query' or 'previous', got {self.time_from!r}")
        if self.num_position_buckets < 1:
            raise ValueError(f"num_position_buckets must be >= 1, got {self.num_position_buckets}")
        if self.num_time_buckets < 1:
            raise ValueError(f"num_time_buckets must be >= 1, got {self.num_time_buckets}")
        if self.time_bucket_fn not in _TIME_BUCKET_FNS:
            raise ValueError(f"time_bucket_fn must be one of {_TIME_BUCKET_FNS}, got {self.time_bucket_fn!r}")
        if self.time_bucket_divisor <= 0:
            raise ValueError(f"time_bucket_divisor must be > 0, got {self.time_bucket_divisor}")


QUERY_TIMES = ("own", "next_token")


@dataclass
class RelativeBiasConfig:
    """Learned relative attention bias, fused into the attention kernel (`hstu_attn.RelativeBias`).

    One table pair per layer, shared by all heads: a position bias for key-minus-query distances up to
    `max_relative_position - 1` (larger distances clamped), and with `use_time` a time bias over
    `num_time_buckets` buckets `floor(log(|t_j - t_i|) / time_bucket_divisor)` (needs timestamps in the batch).

    `query_time` says which time `t_i` a query token uses: "own" (its own timestamp) or "next_token" (the timestamp
    of the next token of its sequence; the last token keeps its own). In a sequence of item events, as in the
    retrieval models, "next_token" is the time of the event the query predicts (at evaluation the held-out event's
    time, i.e. the request time), as the HSTU paper's public code buckets `t(next event) - t(key)`. The fused kernels
    take one time per token, so with "next_token" the bias is materialized as a dense `rab` `[B, 1, N, N]`
    (O(B * N^2) memory: fine for sequences of a few hundred tokens, not for thousands).

    `init_std`: the tables start at zero (0.0, the default) or are drawn from N(0, init_std^2) (the HSTU paper's
    public code draws them with std 0.02).
    """

    max_relative_position: int = 256
    use_time: bool = True
    num_time_buckets: int = 128
    time_bucket_divisor: float = 0.301
    query_time: str = "own"
    init_std: float = 0.0

    def __post_init__(self) -> None:
        if self.init_std < 0:
            raise ValueError(f"relative_bias.init_std must be >= 0, got {self.init_std}")
        if self.max_relative_position < 1:
            raise ValueError(f"max_relative_position must be >= 1, got {self.max_relative_position}")
        if self.num_time_buckets < 1:
            raise ValueError(f"num_time_buckets must be >= 1, got {self.num_time_buckets}")
        if self.time_bucket_divisor <= 0:
            raise ValueError(f"time_bucket_divisor must be > 0, got {self.time_bucket_divisor}")
        if self.query_time not in QUERY_TIMES:
            raise ValueError(f"relative_bias.query_time must be one of {QUERY_TIMES}, got {self.query_time!r}")


OUTPUT_BIAS_INITS = ("zeros", "uniform")


@dataclass
class HSTUConfig:
    """Everything that shapes the HSTU block. Build it with `get_hstu_config`.

    `kv_channels` is the per-head width of q, k and v; the UVQK projection maps `hidden_size` to
    `4 * num_attention_heads * kv_channels`. Its weight is drawn by `init_method`, or from N(0, `uvqk_init_std`^2)
    when set (0.02 in the HSTU paper's public code: u, v, q and k start small, so every layer starts close to the
    identity; on ML-1M retrieval this learns several times faster per epoch than Xavier, README "ML-1M retrieval:
    learning speed"). `dtype` is the compute precision of the block (float32, or bfloat16 /
    float16 through autocast with float32 master weights). `layer_norm_affine=False` gives both layer norms of a
    layer no weight and bias, and `uvqk_bias=False` gives the UVQK projection no bias, as in the HSTU paper's public
    code (both on by default). `output_bias_init` starts the output projection's bias at "zeros" (the default) or
    at "uniform", U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = `num_attention_heads * kv_channels` (PyTorch's
    `nn.Linear` default, which the HSTU paper's public code keeps).

    `fused_norm_gate` picks how a layer computes `dropout(LayerNorm(attn) * u)` after attention: True runs
    `hstu_attn.norm_gate.layer_norm_gate` (one Triton kernel forward and one backward; needs CUDA tensors, or CPU
    under `TRITON_INTERPRET=1`, else the forward raises), False the plain PyTorch ops, None (the default) the fused
    kernel for CUDA inputs when Triton imports and the plain ops otherwise.
    The two compute the same function (the fused one rounds once to the compute dtype; its dropout mask comes from
    its own Philox draw, so with dropout the masks differ from the plain path's for the same seed).
    `TensorParallelHSTULayer` always uses the plain ops.

    `compile_layers` compiles each layer of the block (`nn.Module.compile(dynamic=True)`, TorchInductor) when the
    block is built: the same function, with elementwise ops fused; the first steps pay the compilation (and a
    recompilation when the shapes first change), and autograd, state dicts and checkpoints are unchanged.
    """

    hidden_size: int
    kv_channels: int
    num_attention_heads: int
    num_layers: int
    init_method: Initializer = field(default_factory=XavierUniformInitializer)
    dtype: torch.dtype = torch.float32
    is_causal: bool = True
    kernel_backend: KernelBackend = KernelBackend.AUTO
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    alpha: float | None = None
    max_attn_len: int = 0
    scaling_seqlen: int | None = None
    position_encoding: PositionEncodingConfig | None = field(default_factory=PositionEncodingConfig)
    relative_bias: RelativeBiasConfig | None = None
    recompute_cheap_activations: bool = False
    uvqk_init_std: float | None = None
    layer_norm_affine: bool = True
    uvqk_bias: bool = True
    fused_norm_gate: bool | None = None
    output_bias_init: str = "zeros"
    compile_layers: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "kv_channels", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HSTU {name} must be a positive int, got {value!r}")
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"HSTU dtype must be one of {list(_DTYPES)}, got {self.dtype}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"HSTU dropout must be in [0, 1), got {self.dropout}")
        if self.max_attn_len < 0:
            raise ValueError(f"max_attn_len must be >= 0 (0 = unlimited), got {self.max_attn_len}")
        if self.uvqk_init_std is not None and self.uvqk_init_std <= 0:
            raise ValueError(f"uvqk_init_std must be > 0 or None, got {self.uvqk_init_std}")
        if self.scaling_seqlen is not None and self.scaling_seqlen < 1:
            raise ValueError(f"scaling_seqlen must be >= 1 or None, got {self.scaling_seqlen}")
        if not isinstance(self.kernel_backend, KernelBackend):
            raise TypeError(f"kernel_backend must be a hstu_attn.KernelBackend, got {self.kernel_backend!r}")
        if not (self.fused_norm_gate is None or isinstance(self.fused_norm_gate, bool)):
            raise ValueError(f"fused_norm_gate must be True, False or None (auto), got {self.fused_norm_gate!r}")
        if self.output_bias_init not in OUTPUT_BIAS_INITS:
            raise ValueError(f"output_bias_init must be one of {OUTPUT_BIAS_INITS}, got {self.output_bias_init!r}")
        if not isinstance(self.compile_layers, bool):
            raise ValueError(f"compile_layers must be True or False, got {self.compile_layers!r}")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """ "float32" / "bfloat16" / "float16" (or a torch.dtype) -> torch.dtype, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {list(_DTYPES)}") from None


def parse_kernel_backend(name: str | KernelBackend) -> KernelBackend:
    """A backend name ("pytorch", "TRITON", ...) or enum member -> `KernelBackend`."""
    if isinstance(name, KernelBackend):
        return name
    try:
        return KernelBackend[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown kernel backend {name!r}; expected one of {[b.name for b in KernelBackend]}"
        ) from None


def get_hstu_config(
    hidden_size: int,
    kv_channels: int,
    num_attention_heads: int,
    num_layers: int,
    init_method: Initializer | None = None,
    dtype: torch.dtype | str = torch.float32,
    is_causal: bool = True,
    kernel_backend: KernelBackend | str = KernelBackend.AUTO,
    dropout: float = 0.0,
    *,
    layer_norm_eps: float = 1e-5,
    alpha: float | None = None,
    max_attn_len: int = 0,
    scaling_seqlen: int | None = None,
    position_encoding: PositionEncodingConfig | None = None,
    use_position_encoding: bool = True,
    relative_bias: RelativeBiasConfig | None = None,
    recompute_cheap_activations: bool = False,
    uvqk_init_std: float | None = None,
    layer_norm_affine: bool = True,
    uvqk_bias: bool = True,
    fused_norm_gate: bool | None = None,
    output_bias_init: str = "zeros",
    compile_layers: bool = False,
) -> HSTUConfig:
    """Build an `HSTUConfig`.

    `kernel_backend` is used as given (`KernelBackend.AUTO` picks TRITON for CUDA inputs Triton supports, else
    PYTORCH). `position_encoding` defaults to `PositionEncodingConfig()` unless `use_position_encoding=False`.
    """
    if position_encoding is None and use_position_encoding:
        position_encoding = PositionEncodingConfig()
    return HSTUConfig(
        hidden_size=hidden_size,
        kv_channels=kv_channels,
        num_attention_heads=num_attention_heads,
        num_layers=num_layers,
        init_method=init_method if init_method is not None else XavierUniformInitializer(),
        dtype=parse_dtype(dtype),
        is_causal=is_causal,
        kernel_backend=parse_kernel_backend(kernel_backend),
        dropout=dropout,
        layer_norm_eps=layer_norm_eps,
        alpha=alpha,
        max_attn_len=max_attn_len,
        scaling_seqlen=scaling_seqlen,
        position_encoding=position_encoding,
        relative_bias=relative_bias,
        recompute_cheap_activations=recompute_cheap_activations,
        uvqk_init_std=uvqk_init_std,
        layer_norm_affine=layer_norm_affine,
        uvqk_bias=uvqk_bias,
        fused_norm_gate=fused_norm_gate,
        output_bias_init=output_bias_init,
        compile_layers=compile_layers,
    )
