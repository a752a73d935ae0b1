"""Plain PyTorch `dropout(LayerNorm(attn) * u)`, the reference the fused Triton kernels are tested against."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def layer_norm_gate_reference(
    attn: Tensor,
    u: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """`dropout(LayerNorm(attn; weight, bias, eps) * u, dropout_p)` with the arithmetic in float32.

    attn, u: `[L, W]` of one floating dtype (u may be a strided view); weight, bias: `[W]` or None. Returns
    `[L, W]` in attn's dtype. Dropout (only when `training`) draws from torch's generator with `F.dropout`, so its
    mask is not the fused kernel's: compare the two at `dropout_p=0` or through the mask the output reveals.
    """
    normed = F.layer_norm(
        attn.float(),
        (attn.shape[-1],),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    return F.dropout(normed * u.float(), dropout_p, training).to(attn.dtype)
