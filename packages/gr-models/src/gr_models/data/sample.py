"""One user's sample before batching, and how a user's event history becomes one (train/eval windows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from gr_models.data.schema import TaskKind

__all__ = ["SequenceSample", "Split", "Window", "WindowPolicy"]

Split = Literal["train", "eval", "full"]
TruncateSide = Literal["left", "right"]


@dataclass
class SequenceSample:
    """One user's ids, ready to collate.

    Attributes:
        contextual: contextual feature name -> int64 ``[k]`` ids.
        sequence: sequence feature name -> int64 ``[n]`` values (item, action, side features, timestamp), all of
            the same length, in time order; the last `num_candidates` positions are candidates.
        num_candidates: candidates at the end of the sequence (0 when there are none).
    """

    contextual: dict[str, np.ndarray]
    sequence: dict[str, np.ndarray]
    num_candidates: int = 0


@dataclass(frozen=True)
class Window:
    """Event index ranges of one sample: history ``[history_start, history_end)`` followed by candidates
    ``[candidate_start, candidate_end)``."""

    history_start: int
    history_end: int
    candidate_start: int
    candidate_end: int

    @property
    def num_candidates(self) -> int:
        return self.candidate_end - self.candidate_start

    def take(self, values: np.ndarray) -> np.ndarray:
        """The sample's values of one event-aligned array: ``[history, candidates]``."""
        history = values[self.history_start : self.history_end]
        if self.candidate_start == self.history_end:
            return values[self.history_start : self.candidate_end]
        return np.concatenate([history, values[self.candidate_start : self.candidate_end]])


@dataclass(frozen=True)
class WindowPolicy:
    """Leave-last-out splitting and truncation of a user's ``n`` time-ordered events.

    * ``split="train"``: the last `holdout` events are removed. Ranking with ``max_train_candidates = K > 0``
      scores the last ``min(K, m - 1)`` remaining events as candidates (``m`` = events left); ranking with
      ``K = 0`` labels every item; retrieval trains next-item prediction on all remaining events.
    * ``split="eval"``: every event is kept and the last `holdout` events are the candidates (ranking: items to
      score; retrieval: held-out targets).
    * ``split="full"``: like "train" with nothing held out.

    The history (events before the candidates) is cut to ``max_sequence_length - num_candidates`` events,
    dropping the oldest (``truncate_side="left"``, the default) or the newest (``"right"``).
    Users with too few events for their split are skipped (see `minimum_events`).
    """

    kind: TaskKind
    split: Split
    max_sequence_length: int
    holdout: int = 1
    max_train_candidates: int = 0
    truncate_side: TruncateSide = "left"

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval", "full"):
            raise ValueError(f"split must be 'train', 'eval' or 'full', got {self.split!r}")
        if self.truncate_side not in ("left", "right"):
            raise ValueError(f"truncate_side must be 'left' or 'right', got {self.truncate_side!r}")
        if self.holdout < 1:
            raise ValueError(f"holdout must be >= 1, got {self.holdout}")
        if self.max_train_candidates < 0:
            raise ValueError(f"max_train_candidates must be >= 0, got {self.max_train_candidates}")
        if self.kind == "retrieval" and self.max_train_candidates:
            raise ValueError("retrieval trains on every position: max_train_candidates must be 0")
        if self.max_num_candidates >= self.max_sequence_length:
            raise ValueError(
                f"{self.max_num_candidates} candidates leave no history within max_sequence_length "
                f"{self.max_sequence_length}"
            )

    @property
    def max_num_candidates(self) -> int:
        """Bound of candidates per sample (0: samples carry no candidates)."""
        return self.holdout if self.split == "eval" else self.max_train_candidates

    @property
    def minimum_events(self) -> int:
        """Fewest events a user needs to give a sample under this policy."""
        if self.split == "eval":
            return self.holdout + 1
        kept_needed = 2 if (self.kind == "retrieval" or self.max_train_candidates > 0) else 1
        return kept_needed + (self.holdout if self.split == "train" else 0)

    def window(self, num_events: int) -> Window:
        """The sample window of a user with ``num_events >= minimum_events`` events."""
        if num_events < self.minimum_events:
            raise ValueError(f"a user with {num_events} events is below the minimum {self.minimum_events}")
        if self.split == "eval":
            end, candidates = num_events, self.holdout
        else:
            end = num_events - (self.holdout if self.split == "train" else 0)
            candidates = min(self.max_train_candidates, end - 1)
        history_end = end - candidates
        budget = self.max_sequence_length - candidates
        if self.truncate_side == "left":
            return Window(max(0, history_end - budget), history_end, history_end, end)
        return Window(0, min(history_end, budget), history_end, end)
