"""HSTU attention kernels: PyTorch reference, Triton and CUTLASS backends; the fused post-attention LayerNorm gate."""

from hstu_attn._validation import set_value_checks
from hstu_attn.backend import KernelBackend
from hstu_attn.interface import hstu_attn_varlen_func
from hstu_attn.norm_gate import layer_norm_gate, layer_norm_gate_reference
from hstu_attn.reference import hstu_attn_reference
from hstu_attn.relative_bias import RelativeBias

__version__ = "0.1.0"

__all__ = [
    "KernelBackend",
    "RelativeBias",
    "__version__",
    "hstu_attn_reference",
    "hstu_attn_varlen_func",
    "layer_norm_gate",
    "layer_norm_gate_reference",
    "set_value_checks",
]
