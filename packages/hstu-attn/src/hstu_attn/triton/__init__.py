"""Triton backend of jagged HSTU attention: forward and backward kernels with every mask option and bias."""

from hstu_attn.triton.api import SUPPORTED_HEAD_DIMS, hstu_attn_triton_backward, hstu_attn_triton_forward

__all__ = ["SUPPORTED_HEAD_DIMS", "hstu_attn_triton_backward", "hstu_attn_triton_forward"]
