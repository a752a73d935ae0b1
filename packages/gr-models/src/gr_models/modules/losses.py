"""Training losses: multi-task binary cross-entropy (ranking); sampled and full softmax (retrieval)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def multi_task_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-element BCE-with-logits `[N, T]` (no reduction) of `logits [N, T]` against 0/1 `labels [N, T]`."""
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have the same shape")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")


def sampled_softmax_loss(
    queries: Tensor,
    positive_ids: Tensor,
    positive_embeddings: Tensor,
    negative_ids: Tensor | None,
    negative_embeddings: Tensor | None,
    *,
    temperature: float,
    in_batch_negatives: bool,
) -> Tensor:
    """Per-query sampled-softmax cross-entropy `[N]` of predicting each positive among negatives.

    Args:
        queries: `[N, D]` query embeddings (already L2-normalized if wanted).
        positive_ids: `[N]` ids of the target items; positive_embeddings: `[N, D]` their embeddings.
        negative_ids, negative_embeddings: `[M]`, `[M, D]` sampled negatives shared by every query, or `[N, M]`,
            `[N, M, D]` negatives per query, or None.
        temperature: logits are dot products divided by it.
        in_batch_negatives: also use every other row's positive as a negative.

    A negative with the same id as a row's positive is masked out for that row (no false negatives).
    """
    if negative_ids is None and not in_batch_negatives:
        raise ValueError("sampled softmax needs sampled negatives, in-batch negatives, or both")
    positive_logits = (queries * positive_embeddings).sum(-1, keepdim=True)
    logits = [positive_logits]
    if in_batch_negatives:
        in_batch = queries @ positive_embeddings.t()
        logits.append(in_batch.masked_fill(positive_ids[None, :] == positive_ids[:, None], float("-inf")))
    if negative_ids is not None and negative_embeddings is not None:
        if negative_ids.dim() == 2:
            if negative_ids.shape[0] != queries.shape[0] or negative_embeddings.shape[:2] != negative_ids.shape:
                raise ValueError(
                    f"per-query negatives need ids [N, M] and embeddings [N, M, D] with N = {queries.shape[0]}, got "
                    f"{tuple(negative_ids.shape)} and {tuple(negative_embeddings.shape)}"
                )
            sampled = torch.einsum("nd,nmd->nm", queries, negative_embeddings)
            logits.append(sampled.masked_fill(negative_ids == positive_ids[:, None], float("-inf")))
        else:
            sampled = queries @ negative_embeddings.t()
            logits.append(sampled.masked_fill(negative_ids[None, :] == positive_ids[:, None], float("-inf")))
    all_logits = torch.cat(logits, dim=1).float() / temperature
    target = torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device)
    return F.cross_entropy(all_logits, target, reduction="none")


def full_softmax_loss(queries: Tensor, positive_ids: Tensor, item_embeddings: Tensor, *, temperature: float) -> Tensor:
    """Per-query cross-entropy `[N]` of predicting each positive among every item of the table.

    Args:
        queries: `[N, D]` query embeddings (already L2-normalized if wanted).
        positive_ids: `[N]` int64 ids of the target items, each in `[0, V)`.
        item_embeddings: `[V, D]` embeddings of every item id (row `i` is id `i`).
        temperature: logits are dot products divided by it.
    """
    if item_embeddings.dim() != 2 or item_embeddings.shape[1] != queries.shape[1]:
        raise ValueError(
            f"item_embeddings must be [V, {queries.shape[1]}] (one row per item id), got {tuple(item_embeddings.shape)}"
        )
    if positive_ids.numel() and int(positive_ids.max()) >= item_embeddings.shape[0]:
        raise ValueError(
            f"positive id {int(positive_ids.max())} is outside the {item_embeddings.shape[0]} item embeddings"
        )
    logits = (queries @ item_embeddings.t()).float() / temperature
    return F.cross_entropy(logits, positive_ids.to(torch.int64), reduction="none")
