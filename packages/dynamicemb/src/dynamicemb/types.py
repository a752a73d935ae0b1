"""Enumerations of the user API: initializer modes, eviction aliases, insertion checks."""

from __future__ import annotations

import enum

from dynamicemb.hash_index.base import DynamicEmbScoreStrategy

__all__ = [
    "DynamicEmbCheckMode",
    "DynamicEmbEvictStrategy",
    "DynamicEmbInitializerMode",
    "DynamicEmbScoreStrategy",
]


class DynamicEmbInitializerMode(enum.Enum):
    """How the embedding of a key seen for the first time is filled."""

    NORMAL = "normal"  # N(mean, std_dev)
    TRUNCATED_NORMAL = "truncated_normal"  # N(mean, std_dev) redrawn outside [lower, upper]
    UNIFORM = "uniform"  # U(lower, upper)
    CONSTANT = "constant"  # every element = value


class DynamicEmbCheckMode(enum.IntEnum):
    """What happens when keys of a batch could not be stored (every slot of their bucket held a
    higher score). Such keys get zero embeddings and their gradients are dropped."""

    ERROR = 0  # raise RuntimeError naming the table and the count
    WARNING = 1  # warnings.warn with the count, then continue
    IGNORE = 2  # continue silently; no extra device-to-host read is made

    WARN = 1  # alias


class DynamicEmbEvictStrategy(enum.IntEnum):
    """Eviction names (as HierarchicalKV spells them) for the score strategies.

    Each member has the integer value of the :class:`DynamicEmbScoreStrategy` it stands for, so
    ``DynamicEmbTableOptions(score_strategy=DynamicEmbEvictStrategy.LRU)`` works; use
    :attr:`score_strategy` to convert explicitly.
    """

    LRU = int(DynamicEmbScoreStrategy.TIMESTAMP)
    EPOCH_LRU = int(DynamicEmbScoreStrategy.STEP)
    LFU = int(DynamicEmbScoreStrategy.LFU)
    CUSTOMIZED = int(DynamicEmbScoreStrategy.CUSTOMIZED)
    NO_EVICTION = int(DynamicEmbScoreStrategy.NO_EVICTION)

    @property
    def score_strategy(self) -> DynamicEmbScoreStrategy:
        return DynamicEmbScoreStrategy(int(self))
