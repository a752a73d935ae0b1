"""Optimizers of a GR: one dense optimizer with an LR schedule, plus one row-sparse optimizer per static table."""

from __future__ import annotations

import math
from typing import Any

import torch

from gr_models.model.base import GRModel
from gr_models.trainer.config import OptimSection


def build_dense_optimizer(model: GRModel, section: OptimSection) -> torch.optim.Optimizer:
    """Adam or AdamW over `model.dense_parameters()`."""
    params = list(model.dense_parameters())
    kwargs: dict[str, Any] = {"lr": section.learning_rate, "betas": tuple(section.betas), "eps": section.eps}
    if section.optimizer == "adam":
        return torch.optim.Adam(params, weight_decay=section.weight_decay, **kwargs)
    if section.optimizer == "adamw":
        return torch.optim.AdamW(params, weight_decay=section.weight_decay, **kwargs)
    raise ValueError(f"unknown dense optimizer {section.optimizer!r}; expected adam or adamw")


def lr_multiplier(step: int, section: OptimSection, max_steps: int) -> float:
    """Factor on the base learning rate after `step` optimizer steps: linear warmup, then the schedule."""
    if section.warmup_steps > 0 and step < section.warmup_steps:
        return (step + 1) / section.warmup_steps
    if section.schedule == "constant":
        return 1.0
    span = max(1, max_steps - section.warmup_steps)
    progress = min(1.0, (step - section.warmup_steps) / span)
    if section.schedule == "linear":
        decayed = 1.0 - progress
    elif section.schedule == "cosine":
        decayed = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {section.schedule!r}; expected constant, linear or cosine")
    return section.min_lr_ratio + (1.0 - section.min_lr_ratio) * decayed


class OptimizerBundle:
    """The dense optimizer, its LR schedule and the sparse per-table optimizers of one model."""

    def __init__(self, model: GRModel, section: OptimSection, max_steps: int) -> None:
        self.dense = build_dense_optimizer(model, section)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.dense, lambda step: lr_multiplier(step, section, max_steps)
        )
        self.sparse = model.sparse_optimizers()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.dense, *self.sparse.values()]

    @property
    def learning_rate(self) -> float:
        return float(self.dense.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
