"""The dense part of a RankingGR / RetrievalGR as one module over plain tensors, the module `gr-export` exports.

It reuses the trained model's own modules (position encoder, HSTU layers, prediction head) and applies them as
`HSTUPreprocessor` + `HSTUBlock` + the head do, but takes the embedding rows and the token layout (computed by
`gr_models.export.loader.plan_inputs` from the batch's lengths) as inputs, so that nothing in it depends on the
values of integer tensors and `torch.export` traces it with symbolic batch and sequence sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gr_models.model import RankingGR, RetrievalGR
from gr_models.modules.preprocessing import HSTUSequence

__all__ = ["ServingProgram"]


class ServingProgram(nn.Module):
    """`inputs -> logits [sum k, T]` (ranking) or `queries [U, D]` (retrieval; normalized when the model is).

    Args:
        model: a trained single-process RankingGR or RetrievalGR (HSTU backbone); its modules are shared, not
            copied. Computation is float32 whatever `hstu_config.dtype` the model trained with.
        side_features: per-item side features in the order the model adds them to the item embedding.
        contextual_features: contextual features, in the model's order.
        has_action: whether history events have an action token.
        scaling_seqlen: the attention normalizer the model used for these batches.
        contextual_len: the uniform contextual prefix length (0 without contextual features).
    """

    def __init__(
        self,
        model: RankingGR | RetrievalGR,
        *,
        side_features: list[str],
        contextual_features: list[str],
        has_action: bool,
        scaling_seqlen: int,
        contextual_len: int,
    ) -> None:
        super().__init__()
        block = model.hstu_block if isinstance(model, RankingGR) else model.backbone
        preprocessor = block.preprocessor
        self.position_encoder = preprocessor.position_encoder
        self.embedding_scale = preprocessor.embedding_scale
        self.layers = block.layers
        self.head = model.head if isinstance(model, RankingGR) else None
        self.l2_normalize = isinstance(model, RetrievalGR) and model.task_config.l2_normalize
        self.side_features, self.contextual_features = list(side_features), list(contextual_features)
        self.has_action, self.scaling_seqlen, self.contextual_len = has_action, scaling_seqlen, contextual_len

    def _scaled(self, values: Tensor) -> Tensor:
        return values * self.embedding_scale if self.embedding_scale != 1.0 else values

    def _encode(self, values: Tensor, inputs: dict[str, Tensor], which: str) -> Tensor:
        if self.position_encoder is None:
            return values
        return self.position_encoder(values, inputs[f"{which}_positions"], inputs.get(f"{which}_ages"))

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        item = inputs["item"]
        for name in self.side_features:
            item = item + inputs[f"side:{name}"]
        item = self._scaled(item)
        history = self._encode(item.index_select(0, inputs["history_rows"]), inputs, "history")
        candidates = self._encode(item.index_select(0, inputs["candidate_rows"]), inputs, "candidate")
        sources = [self._scaled(inputs[f"contextual:{name}"]) for name in self.contextual_features]
        sources.append(history)
        if self.has_action:
            actions = self._scaled(inputs["action"].index_select(0, inputs["history_rows"]))
            sources.append(self._encode(actions, inputs, "history"))
        sources.append(candidates)
        x = torch.cat(sources).index_select(0, inputs["source_of"])
        empty = inputs["offsets"].new_zeros(0)
        sequence = HSTUSequence(
            values=x,
            offsets=inputs["offsets"],
            max_len=inputs["max_len"].shape[0],
            scaling_seqlen=self.scaling_seqlen,
            num_candidates=inputs["num_candidates"],
            contextual_len=self.contextual_len,
            timestamps=inputs.get("token_times"),
            history_lengths=empty,
            history_item_index=empty,
            history_event_end_index=empty,
            candidate_index=empty,
        )
        for layer in self.layers:
            x = layer(x, sequence)
        x = x.float()
        if self.head is not None:
            return self.head(x.index_select(0, inputs["candidate_index"])).float()
        queries = x.index_select(0, inputs["query_rows"])
        return F.normalize(queries, dim=-1, eps=1e-6) if self.l2_normalize else queries
