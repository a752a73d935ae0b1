"""Task configurations: what a ranking or retrieval GR predicts and how it is trained and evaluated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gr_models.configs.embedding_config import BaseEmbeddingConfig

_NEGATIVE_SAMPLING = ("in_batch", "uniform", "mixed")
_RETRIEVAL_LOSSES = ("sampled_softmax", "full_softmax")


def _check_unique_tables(configs: Sequence[BaseEmbeddingConfig]) -> None:
    if not configs:
        raise ValueError("embedding_configs is empty: a GR needs at least the item table")
    tables: set[str] = set()
    features: dict[str, str] = {}
    for config in configs:
        if not isinstance(config, BaseEmbeddingConfig):
            raise TypeError(f"embedding_configs holds {type(config).__name__}, not an embedding config")
        if config.table_name in tables:
            raise ValueError(f"table name {config.table_name!r} appears twice in embedding_configs")
        tables.add(config.table_name)
        for name in config.feature_names:
            if name in features:
                raise ValueError(
                    f"feature {name!r} is served by two tables: {features[name]!r} and {config.table_name!r}"
                )
            features[name] = config.table_name


@dataclass
class RankingConfig:
    """A multi-task ranking GR: each candidate gets one logit per task, trained with binary cross-entropy.

    `prediction_head_arch` is either one MLP (a list of widths ending in `num_tasks`, e.g. `[512, 8, 3]`) or one
    MLP per task (a list of lists each ending in 1, e.g. `[[128, 10, 1]]`). `num_tasks` defaults to what the
    arch implies.
    """

    embedding_configs: list[BaseEmbeddingConfig]
    prediction_head_arch: list[int] | list[list[int]]
    num_tasks: int | None = None
    prediction_head_act_type: str = "relu"
    prediction_head_bias: bool = True
    eval_metrics: tuple[str, ...] = ("auc", "accuracy", "log_loss")

    def __post_init__(self) -> None:
        _check_unique_tables(self.embedding_configs)
        arch: list = list(self.prediction_head_arch)
        if not arch:
            raise ValueError("prediction_head_arch is empty")
        if all(isinstance(a, int) for a in arch):
            widths = [int(a) for a in arch]
            implied = widths[-1]
        elif all(isinstance(a, (list, tuple)) and a and all(isinstance(w, int) for w in a) for a in arch):
            heads = [[int(w) for w in a] for a in arch]
            if any(head[-1] != 1 for head in heads):
                raise ValueError(f"each per-task head in prediction_head_arch must end in 1, got {arch}")
            widths = [w for head in heads for w in head]
            implied = len(heads)
        else:
            raise ValueError(f"prediction_head_arch must be a list of ints or a list of int lists, got {arch!r}")
        if any(w < 1 for w in widths):
            raise ValueError(f"prediction_head_arch widths must be >= 1, got {arch}")
        if self.num_tasks is None:
            self.num_tasks = implied
        elif self.num_tasks != implied:
            raise ValueError(
                f"num_tasks={self.num_tasks} disagrees with prediction_head_arch {arch} ({implied} outputs)"
            )
        if self.prediction_head_act_type not in ("relu", "gelu", "silu"):
            raise ValueError(
                f"prediction_head_act_type must be relu, gelu or silu, got {self.prediction_head_act_type!r}"
            )


@dataclass
class RetrievalConfig:
    """A retrieval GR: the output at each history position is trained to score the next item highest.

    Training uses sampled softmax over L2-normalized embeddings divided by `temperature`, with negatives from
    `negative_sampling`: "in_batch" (the other positives of the batch), "uniform" (`num_negatives` ids drawn
    uniformly from [0, item_vocab_size)) or "mixed" (both). Uniform negatives are drawn for every query, as in the
    HSTU paper (`num_negatives` per positive), or once per batch and shared by all its queries with
    `negatives_per_query=False` (cheaper, but each step then contrasts every query with the same few items, which
    learns far more slowly). With `loss="full_softmax"` the loss is instead the cross-entropy over every id of the
    item table (logits: each query against all item embeddings, divided by `temperature`; the negative settings
    are then unused): exact, and cheap for catalogues of a few thousand items such as MovieLens. Evaluation ranks
    the full item corpus and reports HR@k, NDCG@k for each k in `eval_top_k`, and MRR.
    """

    embedding_configs: list[BaseEmbeddingConfig]
    temperature: float = 0.05
    num_negatives: int = 128
    negative_sampling: str = "uniform"
    negatives_per_query: bool = True
    l2_normalize: bool = True
    eval_top_k: tuple[int, ...] = (10, 50)
    eval_exclude_history: bool = False
    eval_metrics: tuple[str, ...] = field(default=("hr", "ndcg", "mrr"))
    loss: str = "sampled_softmax"

    def __post_init__(self) -> None:
        _check_unique_tables(self.embedding_configs)
        if self.loss not in _RETRIEVAL_LOSSES:
            raise ValueError(f"loss must be one of {_RETRIEVAL_LOSSES}, got {self.loss!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.negative_sampling not in _NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling must be one of {_NEGATIVE_SAMPLING}, got {self.negative_sampling!r}")
        if self.negative_sampling != "in_batch" and self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1 for {self.negative_sampling!r} sampling")
        if not self.eval_top_k or any(k < 1 for k in self.eval_top_k):
            raise ValueError(f"eval_top_k must be positive ints, got {self.eval_top_k}")
        self.eval_top_k = tuple(sorted(set(self.eval_top_k)))
