"""Fused optimizers: updates applied in backward to the deduplicated rows of one table.

A value row is ``[embedding (dim) | optimizer state (state_dim)]``:

=================  =========================================  ===========
optimizer          state columns                              state_dim
=================  =========================================  ===========
SGD                none                                       0
ADAM / ADAMW       first moment m, second moment v           2 * dim
ADAGRAD            sum of squared gradients                   dim
ROWWISE_ADAGRAD    mean over the row of squared gradients     1
=================  =========================================  ===========

Semantics follow TorchRec's fused TBE optimizers, which differ from ``torch.optim`` on a dense
``nn.Embedding`` in two ways, both by design:

* Only rows present in the batch are touched. A row absent from a step keeps its weight and
  state (``torch.optim`` on dense gradients would decay its moments, apply weight decay, and for
  Adam move the weight by the remaining momentum).
* The step count ``t`` used by Adam's bias correction is one counter per table, advanced once per
  backward of the table, not per row (so a row first seen at step 100 is corrected with
  ``t = 100``). This is ``torch.optim.SparseAdam``'s convention too.

With every row present in every step both coincide with ``torch.optim`` (tested). Per element:
gradients of duplicate keys are summed first; then, if ``gradient_clipping``, the summed gradient
is clamped to ``[-max_gradient, max_gradient]``; then weight decay is added as ``g += wd * w``
(L2; ADAMW instead multiplies ``w`` by ``1 - lr * wd``). ADAGRAD's accumulator starts at
``initial_accumulator_value`` (default 0, like TorchRec and ``torch.optim.Adagrad``); ``eps`` is
added to the square root of the accumulator, as in both.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["DynamicEmbOptimizerArgs", "DynamicEmbOptimizerType", "FusedOptimizer"]


class DynamicEmbOptimizerType(enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"


# fbgemm's EmbOptimType member names accepted in TorchRec ``fused_params["optimizer"]``.
_FUSED_PARAM_NAMES = {
    "SGD": DynamicEmbOptimizerType.SGD,
    "EXACT_SGD": DynamicEmbOptimizerType.SGD,
    "ADAM": DynamicEmbOptimizerType.ADAM,
    "ADAMW": DynamicEmbOptimizerType.ADAMW,
    "ADAGRAD": DynamicEmbOptimizerType.ADAGRAD,
    "EXACT_ADAGRAD": DynamicEmbOptimizerType.ADAGRAD,
    "ROWWISE_ADAGRAD": DynamicEmbOptimizerType.ROWWISE_ADAGRAD,
    "EXACT_ROWWISE_ADAGRAD": DynamicEmbOptimizerType.ROWWISE_ADAGRAD,
}


@dataclass(frozen=True)
class DynamicEmbOptimizerArgs:
    """Hyper-parameters of the fused optimizer of a table (defaults: TorchRec's fused SGD, lr 0.01)."""

    optimizer: DynamicEmbOptimizerType = DynamicEmbOptimizerType.SGD
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    gradient_clipping: bool = False
    max_gradient: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", DynamicEmbOptimizerType(self.optimizer))
        if self.learning_rate < 0 or self.weight_decay < 0 or self.eps < 0:
            raise ValueError(f"learning_rate, weight_decay and eps must be >= 0: {self}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1): {self}")
        if self.gradient_clipping and self.max_gradient <= 0:
            raise ValueError(f"max_gradient must be > 0 with gradient_clipping: {self}")

    def state_dim(self, dim: int) -> int:
        """Optimizer-state columns stored beside an embedding of ``dim`` columns."""
        return {
            DynamicEmbOptimizerType.SGD: 0,
            DynamicEmbOptimizerType.ADAM: 2 * dim,
            DynamicEmbOptimizerType.ADAMW: 2 * dim,
            DynamicEmbOptimizerType.ADAGRAD: dim,
            DynamicEmbOptimizerType.ROWWISE_ADAGRAD: 1,
        }[self.optimizer]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["optimizer"] = self.optimizer.name
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DynamicEmbOptimizerArgs:
        values = dict(data)
        values["optimizer"] = DynamicEmbOptimizerType[values["optimizer"]]
        return cls(**values)

    @classmethod
    def from_fused_params(cls, fused_params: Mapping[str, Any]) -> DynamicEmbOptimizerArgs:
        """From TorchRec/fbgemm ``fused_params`` (``optimizer`` an ``EmbOptimType`` or its name,
        ``learning_rate``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``weight_decay_mode``,
        ``gradient_clipping``, ``max_gradient``; other keys are left to the caller). ADAM with
        ``weight_decay_mode`` DECOUPLE (fbgemm's WeightDecayMode) is ADAMW."""
        raw = fused_params.get("optimizer", "SGD")
        name = str(getattr(raw, "name", raw)).upper()
        if name not in _FUSED_PARAM_NAMES:
            raise ValueError(
                f"fused_params optimizer {raw!r} is not supported by dynamic tables; "
                f"supported: {sorted(_FUSED_PARAM_NAMES)}"
            )
        optimizer = _FUSED_PARAM_NAMES[name]
        raw_mode = fused_params.get("weight_decay_mode") or ""
        decay_mode = str(getattr(raw_mode, "name", raw_mode)).upper()
        if optimizer is DynamicEmbOptimizerType.ADAM and decay_mode in ("DECOUPLE", "DECOUPLED"):
            optimizer = DynamicEmbOptimizerType.ADAMW
        defaults = cls()
        return cls(
            optimizer=optimizer,
            learning_rate=float(fused_params.get("learning_rate", defaults.learning_rate)),
            beta1=float(fused_params.get("beta1", defaults.beta1)),
            beta2=float(fused_params.get("beta2", defaults.beta2)),
            eps=float(fused_params.get("eps", defaults.eps)),
            weight_decay=float(fused_params.get("weight_decay", defaults.weight_decay)),
            gradient_clipping=bool(fused_params.get("gradient_clipping", defaults.gradient_clipping)),
            max_gradient=float(fused_params.get("max_gradient", defaults.max_gradient)),
        )


class FusedOptimizer:
    """Applies :class:`DynamicEmbOptimizerArgs` to value rows; owns the table's step counter."""

    def __init__(self, args: DynamicEmbOptimizerArgs, dim: int) -> None:
        self.args = args
        self.dim = dim
        self.state_dim = args.state_dim(dim)
        self.step = 0

    def initial_state(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[n, state_dim]`` state of rows that were never updated."""
        fill = self.args.initial_accumulator_value if self.args.optimizer is DynamicEmbOptimizerType.ADAGRAD else 0.0
        return torch.full((n, self.state_dim), fill, dtype=dtype, device=device)

    def next_step(self) -> int:
        """Advance the table's step counter (once per backward) and return it."""
        self.step += 1
        return self.step

    def update_(self, rows: torch.Tensor, grads: torch.Tensor, step: int) -> None:
        """Update ``rows [M, dim + state_dim]`` (float32, in place) with summed gradients ``grads [M, dim]``."""
        args, d = self.args, self.dim
        weight = rows[:, :d]
        g = grads.clamp(-args.max_gradient, args.max_gradient) if args.gradient_clipping else grads
        opt = args.optimizer
        decoupled = opt is DynamicEmbOptimizerType.ADAMW
        if args.weight_decay and not decoupled:
            g = g.add(weight, alpha=args.weight_decay)
        lr = args.learning_rate
        if opt is DynamicEmbOptimizerType.SGD:
            weight.add_(g, alpha=-lr)
        elif opt in (DynamicEmbOptimizerType.ADAM, DynamicEmbOptimizerType.ADAMW):
            exp_avg, exp_avg_sq = rows[:, d : 2 * d], rows[:, 2 * d : 3 * d]
            if decoupled and args.weight_decay:
                weight.mul_(1.0 - lr * args.weight_decay)
            exp_avg.lerp_(g, 1.0 - args.beta1)
            exp_avg_sq.mul_(args.beta2).addcmul_(g, g, value=1.0 - args.beta2)
            step_size = lr / (1.0 - args.beta1**step)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - args.beta2**step)).add_(args.eps)
            weight.addcdiv_(exp_avg, denom, value=-step_size)
        elif opt is DynamicEmbOptimizerType.ADAGRAD:
            state_sum = rows[:, d : 2 * d]
            state_sum.addcmul_(g, g)
            weight.addcdiv_(g, state_sum.sqrt().add_(args.eps), value=-lr)
        elif opt is DynamicEmbOptimizerType.ROWWISE_ADAGRAD:
            row_sum = rows[:, d : d + 1]
            row_sum.add_(g.square().mean(dim=1, keepdim=True))
            weight.addcdiv_(g, row_sum.sqrt().add_(args.eps), value=-lr)
        else:  # an enum member added without an implementation here
            raise NotImplementedError(f"fused optimizer {opt}")
