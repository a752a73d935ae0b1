"""A SASRec backbone: pre-LayerNorm softmax Transformer layers on the same token sequences as HSTU.

The attention mask follows the same rules as HSTU attention (causal history, candidates see the history and
themselves, contextual prefix), so the two backbones are compared on identical inputs and targets.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.data.batch import Batch
from gr_models.modules.hstu_block import compile_layers
from gr_models.modules.jagged import token_coordinates
from gr_models.modules.preprocessing import HSTUPreprocessor, HSTUSequence, SequenceInputs


def attention_mask(lengths: Tensor, num_targets: Tensor, max_len: int, *, causal: bool, contextual_len: int) -> Tensor:
    """Bool `[B, N, N]`: may query i attend key j. Padded rows attend only themselves (keeps softmax finite)."""
    device = lengths.device
    n = lengths.view(-1, 1, 1)
    u = n - num_targets.view(-1, 1, 1)
    i = torch.arange(max_len, device=device).view(1, -1, 1)
    j = torch.arange(max_len, device=device).view(1, 1, -1)
    diagonal = i == j
    history_column = j < u
    if causal:
        valid = diagonal | (history_column & (j < torch.minimum(i, u)))
    else:
        valid = diagonal | history_column
    if contextual_len > 0:
        valid = valid | ((i < contextual_len) & history_column) | ((j < contextual_len) & history_column)
    inside = (i < n) & (j < n)
    return (valid & inside) | (diagonal & (i >= n))


class SASRecLayer(nn.Module):
    """`x + Dropout(MHA(LN(x)))`, then `x + Dropout(FFN(LN(x)))` on padded `[B, N, hidden]` inputs."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.kv_channels
        width = self.num_heads * self.head_dim
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * width)
        self.attention_output = nn.Linear(width, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.dropout = config.dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).reshape(batch, length, -1)
        x = x + F.dropout(self.attention_output(attn), p=self.dropout, training=self.training)
        return x + F.dropout(self.ffn(self.ffn_norm(x)), p=self.dropout, training=self.training)


class SASRecBlock(nn.Module):
    """Same interface as `HSTUBlock`: embeddings of a batch -> `HSTUSequence` of final hidden states."""

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocessor = HSTUPreprocessor(config)
        self.layers = nn.ModuleList(SASRecLayer(config) for _ in range(config.num_layers))
        if config.compile_layers:
            compile_layers(self.layers)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, embeddings: dict[str, JaggedTensor], batch: Batch) -> HSTUSequence:
        sequence = self.preprocessor(embeddings, SequenceInputs.from_batch(batch))
        lengths = sequence.offsets[1:] - sequence.offsets[:-1]
        coordinates = token_coordinates(lengths)
        x = sequence.values.new_zeros(lengths.numel(), sequence.max_len, sequence.values.shape[-1])
        x = x.index_put(coordinates, sequence.values)
        mask = attention_mask(
            lengths,
            sequence.num_candidates,
            sequence.max_len,
            causal=self.config.is_causal,
            contextual_len=sequence.contextual_len,
        )
        low_precision = self.config.dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.config.dtype, enabled=low_precision):
            for layer in self.layers:
                x = layer(x, mask)
            x = self.final_norm(x)
        return dataclasses.replace(sequence, values=x[coordinates].float())
