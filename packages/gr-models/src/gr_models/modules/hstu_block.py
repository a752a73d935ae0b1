"""The HSTU block: preprocessing, a stack of HSTU layers in the configured precision, and postprocessing."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from gr_models.configs.hstu_config import HSTUConfig
from gr_models.data.batch import Batch
from gr_models.modules.hstu_layer import build_hstu_layer
from gr_models.modules.preprocessing import HSTUPreprocessor, HSTUSequence, SequenceInputs


class HSTUBlock(nn.Module):
    """Embeddings of a batch -> `HSTUSequence` whose `values [L, hidden]` are the last layer's outputs.

    With `config.dtype` bfloat16 or float16 the layers run under autocast (float32 weights, low-precision
    matmuls and attention); the residual stream and the returned values stay float32.
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocessor = HSTUPreprocessor(config)
        self.layers = nn.ModuleList(build_hstu_layer(config) for _ in range(config.num_layers))
        if config.compile_layers:
            compile_layers(self.layers)

    def forward(self, embeddings: dict[str, JaggedTensor], batch: Batch) -> HSTUSequence:
        sequence = self.preprocessor(embeddings, SequenceInputs.from_batch(batch))
        x = sequence.values
        low_precision = self.config.dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.config.dtype, enabled=low_precision):
            for layer in self.layers:
                x = layer(x, sequence)
        return dataclasses.replace(sequence, values=x.float())


def compile_layers(layers: nn.ModuleList) -> None:
    """Compile each layer in place (`HSTUConfig.compile_layers`): TorchInductor, shapes dynamic."""
    for layer in layers:
        layer.compile(dynamic=True)


def candidate_outputs(sequence: HSTUSequence) -> Tensor:
    """`[sum k, hidden]` outputs at the candidate tokens, user by user."""
    return sequence.values.index_select(0, sequence.candidate_index)


def history_item_outputs(sequence: HSTUSequence) -> Tensor:
    """`[sum h, hidden]` outputs at the history item tokens, user by user, oldest first."""
    return sequence.values.index_select(0, sequence.history_item_index)


def history_event_outputs(sequence: HSTUSequence) -> Tensor:
    """`[sum h, hidden]` outputs at the last token of each history event (action token when interleaved)."""
    return sequence.values.index_select(0, sequence.history_event_end_index)
