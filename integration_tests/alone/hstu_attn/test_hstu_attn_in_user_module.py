"""hstu-attn used alone: a user's own Transformer-like block calls hstu_attn_varlen_func, torch.compile'd.

Only torch (and triton for the TRITON backend) and hstu_attn are imported. The block (LayerNorm -> fused
QKV projection -> HSTU attention over jagged sequences -> output projection -> residual) is compiled with
torch.compile(fullgraph=True): the compiled block must agree with the eager block in outputs and gradients,
and a few Adam steps of the compiled model on one toy batch must lower its loss. The PYTORCH backend goes
through inductor (code generation and a C++ compile: about a minute on a 2-core machine); the TRITON backend
(CPU under TRITON_INTERPRET=1) through the aot_eager compiler, which traces the same graph through dynamo and
AOT autograd (the custom op's fake and autograd registrations) without a second inductor compile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hstu_attn import KernelBackend, hstu_attn_varlen_func

LENGTHS = [5, 3, 8]  # three jagged sequences
HEADS, HEAD_DIM = 2, 32  # 32: the smallest head dim the TRITON backend takes


class JaggedSelfAttentionBlock(nn.Module):
    """A pre-norm residual block with HSTU attention: ``x [L, D]`` -> ``[L, D]``."""

    def __init__(self, dim: int, heads: int, backend: KernelBackend) -> None:
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).view(x.shape[0], 3, self.heads, -1).unbind(1)
        attended = hstu_attn_varlen_func(q, k, v, offsets, max_seq_len, causal=True, backend=self.backend)
        return x + self.out(attended.reshape(x.shape[0], -1))


class TinySequenceModel(nn.Module):
    """Two blocks and a linear read-out of one score per token: ``x [L, D]`` -> ``[L]``."""

    def __init__(self, dim: int, backend: KernelBackend) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([JaggedSelfAttentionBlock(dim, HEADS, backend) for _ in range(2)])
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, offsets, max_seq_len)
        return self.score(x).squeeze(-1)


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token features ``[L, D]`` and targets ``[L]``: the running mean of the first feature over each
    sequence's prefix (a task that needs attention to earlier tokens)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sum(LENGTHS), HEADS * HEAD_DIM, generator=generator)
    targets = torch.cat([chunk[:, 0].cumsum(0) / torch.arange(1, len(chunk) + 1) for chunk in x.split(LENGTHS)])
    return x, targets


@pytest.mark.parametrize(
    ("backend", "compiler"), [(KernelBackend.PYTORCH, "inductor"), (KernelBackend.TRITON, "aot_eager")]
)
def test_compiled_user_module_matches_eager_and_trains(backend: KernelBackend, compiler: str) -> None:
    torch.manual_seed(0)
    offsets = torch.tensor([0, *LENGTHS]).cumsum(0)
    max_seq_len = max(LENGTHS)
    eager = TinySequenceModel(HEADS * HEAD_DIM, backend)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)

    x, targets = toy_batch()
    eager_loss = nn.functional.mse_loss(eager(x, offsets, max_seq_len), targets)
    compiled_loss = nn.functional.mse_loss(compiled(x, offsets, max_seq_len), targets)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    eager_loss.backward()
    compiled_loss.backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(
            p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = nn.functional.mse_loss(compiled(x, offsets, max_seq_len), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"the loss did not fall: {losses}"
