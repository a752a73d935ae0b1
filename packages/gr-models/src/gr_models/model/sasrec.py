"""SASRec: the softmax-Transformer baseline for side-by-side retrieval quality runs."""

from __future__ import annotations

from torch import nn

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.model.retrieval_gr import RetrievalGR
from gr_models.modules.sasrec_block import SASRecBlock


class SASRec(RetrievalGR):
    """`RetrievalGR` with the HSTU block replaced by `SASRecBlock` (same inputs, loss and evaluation).

    From the HSTU config it uses hidden_size, num_attention_heads, kv_channels (per-head width), num_layers,
    dropout, is_causal, dtype and the position encoding.
    """

    def _build_backbone(self, config: HSTUConfig) -> nn.Module:
        return SASRecBlock(config)
