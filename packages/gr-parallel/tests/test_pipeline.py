"""Train pipelines in one process: the overlap pipeline gives the plain loop's batches, losses and updated
parameters, runs two batches ahead, and rejects bad input; the multi-process sharded case is in
``test_pipeline_multiprocess.py``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

import gr_parallel
from gr_parallel.pipeline import (
    OverlapTrainPipeline,
    TrainPipeline,
    make_train_pipeline,
    sparse_inputs_from_attribute,
)

VOCAB, DIM, BATCH, STEPS = 50, 4, 6, 5


@dataclass
class ToyBatch(Pipelineable):
    """A batch as gr-models' batches are: a KJT of ids and a dense tensor, movable and stream-recordable."""

    features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> ToyBatch:
        return ToyBatch(
            self.features.to(device=device, non_blocking=non_blocking),
            self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> ToyBatch:
        return ToyBatch(self.features.pin_memory(), self.labels.pin_memory())


def toy_batches(count: int, seed: int = 0) -> list[ToyBatch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(1, 4, (BATCH,), generator=generator)
        ids = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=generator)
        features = KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids, lengths=lengths)
        batches.append(ToyBatch(features, torch.randint(0, 2, (BATCH,), generator=generator).float()))
    return batches


class ToyModel(nn.Module):
    """Mean-pooled item embeddings -> linear -> per-sample BCE: ``model(batch) -> (losses [B], logits [B])``."""

    def __init__(self) -> None:
        super().__init__()
        table = EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=VOCAB, feature_names=["item"])
        self.embedding = EmbeddingCollection(tables=[table])
        self.head = nn.Linear(DIM, 1)

    def forward(self, batch: ToyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        items = self.embedding(batch.features)["item"]
        pooled = torch.segment_reduce(items.values(), "mean", lengths=items.lengths())
        logits = self.head(pooled).squeeze(1)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        return losses, logits.detach()


def _trained(kind: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = ToyModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    pipeline = make_train_pipeline(kind, model, "cpu", [optimizer])  # type: ignore[arg-type]
    iterator = iter(toy_batches(STEPS))
    losses = []
    while True:
        try:
            loss, _ = pipeline.progress(iterator)
        except StopIteration:
            break
        losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_overlap_progress_matches_the_plain_loop_exactly() -> None:
    plain_losses, plain_state = _trained("none")
    overlap_losses, overlap_state = _trained("overlap")
    assert len(plain_losses) == STEPS
    assert overlap_losses == plain_losses
    for name, value in plain_state.items():
        assert torch.equal(overlap_state[name], value), name


class _Counting:
    """An iterator over batches that counts how many were drawn."""

    def __init__(self, batches: list[ToyBatch]) -> None:
        self.batches, self.drawn = batches, 0

    def __iter__(self) -> Iterator[ToyBatch]:
        return self

    def __next__(self) -> ToyBatch:
        if self.drawn == len(self.batches):
            raise StopIteration
        self.drawn += 1
        return self.batches[self.drawn - 1]


def test_overlap_batches_run_two_ahead_and_yield_every_batch_in_order() -> None:
    source = _Counting(toy_batches(4))
    pipeline = OverlapTrainPipeline(ToyModel(), "cpu")
    seen = []
    for batch in pipeline.batches(source):
        seen.append(batch)
        assert source.drawn - len(seen) == pipeline.in_flight == min(2, 4 - len(seen))
    assert [torch.equal(a.labels, b.labels) for a, b in zip(seen, source.batches)] == [True] * 4
    assert TrainPipeline(ToyModel(), "cpu").in_flight == 0


def test_errors_name_the_problem() -> None:
    model = ToyModel()
    with pytest.raises(ValueError, match="unknown pipeline 'fast'"):
        make_train_pipeline("fast", model, "cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs \.to\(device"):
        next(make_train_pipeline("overlap", model, "cpu").batches([Path("x")]))
    not_sharded = OverlapTrainPipeline(model, "cpu", sparse_inputs=lambda b: {model.embedding: b.features})
    with pytest.raises(TypeError, match="not a TorchRec ShardedModule"):
        next(not_sharded.batches(toy_batches(1)))
    with pytest.raises(ValueError, match="holds no TorchRec ShardedModule"):
        sparse_inputs_from_attribute(model)


class DynamicToyModel(nn.Module):
    """ToyModel with the item table a dynamicemb table (sharded over the world by the test: on the GPU
    machine only dynamic tables can be sharded, there are no CUDA fbgemm kernels)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        from dynamicemb import DynamicEmbeddingCollection, DynamicEmbOptimizerArgs, DynamicEmbOptimizerType

        table = EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=VOCAB, feature_names=["item"])
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
        self.tables = nn.ModuleDict({"dyn": DynamicEmbeddingCollection([table], optimizer=adam, device=device)})
        self.head = nn.Linear(DIM, 1, device=device)

    def forward(self, batch: ToyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        items = self.tables["dyn"](batch.features)["item"]
        pooled = torch.segment_reduce(items.values(), "mean", lengths=items.lengths())
        logits = self.head(pooled).squeeze(1)
        losses = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        return losses, logits.detach()


def _trained_on_cuda(kind: str, device: torch.device) -> tuple[list[float], torch.Tensor, int]:
    torch.manual_seed(0)
    model = DynamicToyModel(device)
    gr_parallel.shard_embedding_modules(model.tables, device=device)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.05)
    sharded = model.tables["dyn"]
    pipeline = make_train_pipeline(kind, model, device, [optimizer], sparse_inputs=lambda b: {sharded: b.features})  # type: ignore[arg-type]
    iterator = iter([batch.pin_memory() if device.type == "cuda" else batch for batch in toy_batches(12)])
    losses = [pipeline.progress(iterator)[0].item() for _ in range(12)]
    pipelined = getattr(pipeline, "pipelined_calls", 0)
    pipeline.close()
    return losses, model.head.weight.detach().cpu(), pipelined


@pytest.mark.gpu
def test_overlap_on_cuda_matches_the_plain_loop_with_a_sharded_dynamic_table() -> None:
    """Side streams for the copy and the input distribution, pinned host batches, record_stream."""
    gr_parallel.initialize_distributed()  # a one-process NCCL world
    try:
        device = gr_parallel.get_device()
        plain_losses, plain_head, _ = _trained_on_cuda("none", device)
        overlap_losses, overlap_head, pipelined = _trained_on_cuda("overlap", device)
    finally:
        gr_parallel.destroy_global_state()
    assert pipelined == 12
    # the dynamic table's backward accumulates with atomics on CUDA: equal up to float rounding
    torch.testing.assert_close(torch.tensor(overlap_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(overlap_head, plain_head, rtol=1e-5, atol=1e-6)
