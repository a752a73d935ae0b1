"""Row-sparse optimizers for static embedding tables in one process.

Only the rows a step looked up move, as in TorchRec's fused TBE optimizers ("lazy" Adam/AdaGrad): untouched
rows keep their values and optimizer state. Gradients may be sparse COO (`nn.Embedding(sparse=True)`) or dense
(then the touched rows are the rows with a non-zero gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from gr_models.configs.embedding_config import EmbeddingOptimizerParam


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices [R], summed gradient rows [R, D]) of a sparse or dense `[rows, D]` gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


class SparseRowOptimizer(torch.optim.Optimizer):
    """SGD, Adam, AdamW, AdaGrad or row-wise AdaGrad applied to the touched rows of 2-D embedding weights.

    Adam's bias correction uses one step counter per table (incremented on every `step` that finds a gradient),
    like TBE. Weight decay: Adam/SGD/AdaGrad add `weight_decay * w` to the gradient of touched rows; AdamW decays
    touched rows by `lr * weight_decay` directly.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], config: EmbeddingOptimizerParam) -> None:
        params = list(params)
        for p in params:
            if p.dim() != 2:
                raise ValueError(f"SparseRowOptimizer expects 2-D embedding weights, got shape {tuple(p.shape)}")
        defaults = {
            "lr": config.learning_rate,
            "betas": (config.adam_beta1, config.adam_beta2),
            "eps": config.eps,
            "weight_decay": config.weight_decay,
        }
        super().__init__(params, defaults)
        self.kind = config.optimizer_str

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                rows, grad = _touched_rows(weight.grad)
                if rows.numel() == 0:
                    continue
                self._update(weight, rows, grad.to(weight.dtype), group, self.state[weight])
        return loss

    def _update(self, weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        current = weight.index_select(0, rows)
        if decay and self.kind != "adamw":
            grad = grad + decay * current
        if self.kind == "sgd":
            weight.index_copy_(0, rows, current - lr * grad)
        elif self.kind in ("adam", "adamw"):
            beta1, beta2 = group["betas"]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(weight)
                state["exp_avg_sq"] = torch.zeros_like(weight)
            state["step"] += 1
            m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
            v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
            m_hat = m / (1 - beta1 ** state["step"])
            v_hat = v / (1 - beta2 ** state["step"])
            if self.kind == "adamw" and decay:
                current = current * (1 - lr * decay)
            weight.index_copy_(0, rows, current - lr * m_hat / (v_hat.sqrt() + eps))
        elif self.kind == "adagrad":
            if not state:
                state["sum"] = torch.zeros_like(weight)
            accumulated = state["sum"].index_select(0, rows).add_(grad * grad)
            state["sum"].index_copy_(0, rows, accumulated)
            weight.index_copy_(0, rows, current - lr * grad / (accumulated.sqrt() + eps))
        elif self.kind == "rowwise_adagrad":
            if not state:
                state["sum"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            accumulated = state["sum"].index_select(0, rows) + grad.pow(2).mean(dim=1)
            state["sum"].index_copy_(0, rows, accumulated)
            weight.index_copy_(0, rows, current - lr * grad / (accumulated.sqrt() + eps).unsqueeze(1))
        else:
            raise ValueError(f"unknown embedding optimizer {self.kind!r}")
