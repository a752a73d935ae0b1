"""Fused `dropout(LayerNorm(attn) * u)`, the HSTU layer's step after attention (Triton, forward and backward).

`layer_norm_gate` runs the Triton kernels (CUDA tensors, or CPU under `TRITON_INTERPRET=1`);
`layer_norm_gate_reference` is the same function in plain PyTorch; `layer_norm_gate_supported` says whether the
fused call runs on given inputs.
"""

from hstu_attn.norm_gate.ops import (
    MAX_WIDTH,
    layer_norm_gate,
    layer_norm_gate_supported,
    norm_gate_triton_available,
)
from hstu_attn.norm_gate.reference import layer_norm_gate_reference

__all__ = [
    "MAX_WIDTH",
    "layer_norm_gate",
    "layer_norm_gate_reference",
    "layer_norm_gate_supported",
    "norm_gate_triton_available",
]
