"""Building blocks of GR models: embeddings, HSTU pre/postprocessing, layers, heads and losses."""

from gr_models.modules.embedding import EmbeddingOptimizerParam, ShardedEmbedding
from gr_models.modules.hstu_block import HSTUBlock, candidate_outputs, history_event_outputs, history_item_outputs
from gr_models.modules.hstu_layer import HSTULayer, RelativeAttentionBias
from gr_models.modules.losses import multi_task_bce, sampled_softmax_loss
from gr_models.modules.mlp import MLP, MultiTaskHead
from gr_models.modules.preprocessing import HSTUPreprocessor, HSTUSequence, SequenceInputs
from gr_models.modules.sasrec_block import SASRecBlock, SASRecLayer
from gr_models.modules.sparse_optimizer import SparseRowOptimizer

__all__ = [
    "MLP",
    "EmbeddingOptimizerParam",
    "HSTUBlock",
    "HSTULayer",
    "HSTUPreprocessor",
    "HSTUSequence",
    "MultiTaskHead",
    "RelativeAttentionBias",
    "SASRecBlock",
    "SASRecLayer",
    "SequenceInputs",
    "ShardedEmbedding",
    "SparseRowOptimizer",
    "candidate_outputs",
    "history_event_outputs",
    "history_item_outputs",
    "multi_task_bce",
    "sampled_softmax_loss",
]
