"""The training loop behind `gr-train`: data, model, optimizers, evaluation, logging and checkpoints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.utils.data
from torch import Tensor

import gr_parallel
from gr_models.data.batch import Batch
from gr_models.data.collate import BatchCollator, collate_samples
from gr_models.data.dataset import SequenceDataset
from gr_models.data.host_view import host_sequence_counts, sequence_counts
from gr_models.data.pipeline import UserShardSampler
from gr_models.model.base import GRModel
from gr_models.trainer import checkpointing
from gr_models.trainer.builders import build_model, build_train_dataset
from gr_models.trainer.config import RunConfig
from gr_models.trainer.optim import OptimizerBundle
from gr_models.trainer.reporting import ProgressLog, RunRecorder, write_json
from gr_models.trainer.world import initialize_run_world
from gr_parallel.grads import clip_grad_norm_
from gr_parallel.pipeline import PipelineKind, SparseInputs

CHECKPOINT_DIR = "checkpoints"


def sequence_tokens(batch: Batch) -> int:
    """Tokens the model sees for `batch`: contextual ids + 2 per history event (1 without actions) + candidates.

    Counted on the batch's host copy (`Batch.host_copy()`) when it has one, else read from its device in one read.
    """
    with_actions = batch.action_feature_name is not None
    host = batch.host_copy()
    if host is not None:
        return host_sequence_counts(
            host, batch.item_feature_name, batch.contextual_feature_names, [], with_actions
        ).total_tokens
    items = batch.item_lengths()
    candidates = batch.num_candidates if batch.num_candidates is not None else torch.zeros_like(items)
    contextual = [batch.feature_lengths(n) for n in batch.contextual_feature_names]
    return sequence_counts(items, candidates, contextual, with_actions).total_tokens


class _SkippingSampler(torch.utils.data.Sampler[int]):
    """The epoch order of a `UserShardSampler` without its first `skip` indices (resuming mid-epoch)."""

    def __init__(self, sampler: UserShardSampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.sampler))
        return iter(order[self.skip :])


@dataclass
class StepStats:
    """What one optimizer step saw on this rank.

    The loss and gradient norm stay on the device (0-d tensors): reading them is a host synchronization, which the
    trainer does once per logged window, not per step.

    Attributes:
        losses: one per micro-batch: the loss averaged over the global batch (a detached 0-d tensor); divided by the
            data-parallel size and summed over the ranks when logged, the global value.
        samples: users of this rank's micro-batches; tokens: their `sequence_tokens`.
        grad_norm: the dense gradient norm before clipping (0-d tensor), or None when `optim.grad_clip` is off.
    """

    losses: list[Tensor]
    samples: int
    tokens: int
    grad_norm: Tensor | None


@dataclass
class _LogWindow:
    """Training statistics since the last logged step (`start`: when the window's timing began)."""

    losses: list[Tensor] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, stats: StepStats) -> None:
        self.losses.extend(stats.losses)
        self.samples += stats.samples
        self.tokens += stats.tokens

    def loss_sum(self, dp_size: int) -> float:
        """This rank's share of the window's micro-batch losses (each divided by `dp_size`), summed in order on the
        host: one device read for the whole window."""
        if not self.losses:
            return 0.0
        return sum(loss / dp_size for loss in torch.stack(self.losses).double().tolist())


@dataclass
class TrainResult:
    """What a run produced: final evaluation metrics, throughput and the files written."""

    step: int
    metrics: dict[str, float]
    throughput: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)


class Trainer:
    """Trains a GR as described by a `RunConfig` (see `gr_models.trainer.config`).

    In a run of N processes (`torchrun --nproc_per_node N`) every data-parallel rank reads its own users,
    evaluation metrics cover the whole evaluation split across ranks, and rank 0 alone writes the logs, the
    progress bar, TensorBoard and the metrics file (checkpoints are written collectively by every rank).

    Args:
        config: the run.
        train_dataset: overrides the dataset built from `config.data` (its `with_split("eval")` is evaluated).
        model: overrides the model built from the config.
    """

    def __init__(
        self, config: RunConfig, *, train_dataset: SequenceDataset | None = None, model: GRModel | None = None
    ) -> None:
        self.config = config
        self.world = initialize_run_world(config)
        self.device = self.world.device
        self.train_dataset = (
            train_dataset if train_dataset is not None else build_train_dataset(config.data, config.task)
        )
        self.eval_dataset = self.train_dataset.with_split("eval")
        self.model = model if model is not None else build_model(config, self.train_dataset.schema, self.device)
        self.optimizers = OptimizerBundle(self.model, config.optim, config.train.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self._dtype() == torch.float16)
        self.run_dir = config.run_dir
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.recorder = RunRecorder(self.run_dir, tensorboard=self.world.is_main)
        self.pipeline = gr_parallel.make_train_pipeline(
            cast(PipelineKind, config.parallel.pipeline), self.model, self.device, sparse_inputs=self._sparse_inputs()
        )
        self.step = 0
        self.epoch = 0
        self._seed_data_parallel_rank()
        self.batches_into_epoch = 0
        self.train_seconds = 0.0
        self.samples_seen = 0
        self.tokens_seen = 0

    def _sparse_inputs(self) -> SparseInputs | None:
        """What the overlap pipeline distributes ahead: the batch's ids for every sharded table (None unsharded, or
        with tensor parallelism, where only the device copy runs ahead)."""
        embedding = self.model.embedding
        if self.config.parallel.pipeline != "overlap" or not gr_parallel.find_sharded_modules(embedding):
            return None
        if self.world.world_size > self.world.dp_size:
            return None  # tensor-parallel ranks look up parts of the batch, not the batch `sparse_inputs` names
        return lambda batch: embedding.sparse_inputs(batch.features)

    def _dtype(self) -> torch.dtype:
        hstu_config = getattr(self.model, "hstu_config", None)
        return hstu_config.dtype if hstu_config is not None else torch.float32

    def _loader(self, dataset: SequenceDataset, *, train: bool, skip_batches: int = 0) -> torch.utils.data.DataLoader:
        data = self.config.data
        batching: dict[str, Any]
        if train and self.config.parallel.balance_sequences and self.world.dp_size > 1:
            batching = {"batch_sampler": self._balanced_batches(dataset, skip_batches)}
        else:
            batch_size = data.batch_size if train else data.eval_batch_size
            sampler = UserShardSampler(
                len(dataset),
                rank=self.world.dp_rank,
                world_size=self.world.dp_size,
                shuffle=train,
                seed=self.config.seed,
                even_shards=train,  # evaluation covers every user once; `_evaluation_batches` evens the pass count
            )
            sampler.set_epoch(self.epoch)
            skipped = _SkippingSampler(sampler, skip_batches * batch_size) if skip_batches else sampler
            batching = {"batch_size": batch_size, "sampler": skipped}
        workers = data.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            **batching,
            collate_fn=BatchCollator(dataset.schema),
            num_workers=workers,
            prefetch_factor=data.prefetch_factor if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not consume the global RNG (resumed runs match)
            generator=torch.Generator().manual_seed(self.config.seed + self.epoch),
        )

    def _balanced_batches(self, dataset: SequenceDataset, skip_batches: int) -> gr_parallel.BalancedBatchSampler:
        """This rank's part of each global batch (`data.batch_size` x data-parallel size users, the users a
        one-process run with that batch size reads), split across the ranks by attention cost."""
        tokens_per_event = 2 if dataset.schema.action_feature_name is not None else 1
        sampler = gr_parallel.BalancedBatchSampler(
            len(dataset),
            lambda indices: tokens_per_event * dataset.sample_lengths(indices),
            self.config.data.batch_size * self.world.dp_size,
            rank=self.world.dp_rank,
            world_size=self.world.dp_size,
            linear_coefficient=2.5 * self.config.hstu.hidden_size,
            seed=self.config.seed,
        )
        sampler.set_epoch(self.epoch, skip_batches)
        return sampler

    def _batches(self) -> Iterator[Batch]:
        """Training batches forever, epoch after epoch, starting where a resumed run stopped."""
        while True:
            loader = self._loader(self.train_dataset, train=True, skip_batches=self.batches_into_epoch)
            for batch in self.pipeline.batches(loader):
                self.batches_into_epoch += 1
                yield batch
            self.epoch += 1
            self.batches_into_epoch = 0

    # ----------------------------------------------------------------------------------------------- training

    def _optimizer_step(self) -> Tensor | None:
        grad_clip = self.config.optim.grad_clip
        for optimizer in self.optimizers.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = None
        if grad_clip is not None and grad_clip > 0:
            # the norm of the whole model's dense gradient (tensor-parallel shards included), as in one process
            grad_norm = clip_grad_norm_(list(self.model.dense_parameters()), grad_clip).detach()
        for optimizer in self.optimizers.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self.optimizers.scheduler.step()
        self.optimizers.zero_grad()
        return grad_norm

    def train(self) -> TrainResult:
        """Run until `train.max_steps` optimizer steps, evaluating, logging and checkpointing on the way."""
        settings = self.config.train
        if settings.resume:
            self.load_latest_checkpoint()
        self.model.train()
        if settings.grad_accumulation < 1:
            raise ValueError(f"train.grad_accumulation must be >= 1, got {settings.grad_accumulation}")
        bar = ProgressLog(
            settings.max_steps, self.step, self.config.name, enabled=self.world.is_main,
            progress_bar=settings.progress_bar,
        )  # fmt: skip
        if self.step == 0 and settings.eval_every > 0:
            self._evaluate_and_record(bar)  # the untrained baseline, so the curves start at chance
        batches = self._batches()
        window = _LogWindow()
        while self.step < settings.max_steps:
            stats = self.train_step(batches)
            window.add(stats)
            bar.update(1)
            log = self.step % settings.log_every == 0 or self.step == settings.max_steps
            evaluate = (
                settings.eval_every > 0 and self.step % settings.eval_every == 0 and self.step < settings.max_steps
            )
            checkpoint = settings.checkpoint_every > 0 and self.step % settings.checkpoint_every == 0
            if log or evaluate or checkpoint:
                self._drain_device()
            if log:
                self._log_window(window, stats.grad_norm, bar)
                window = _LogWindow()
            if evaluate:
                self._evaluate_and_record(bar)
                window.start = time.perf_counter()
            if checkpoint:
                self.save_checkpoint()
                window.start = time.perf_counter()
        self.pipeline.close()  # the last step logged, so its device work is already counted
        final = self._evaluate_and_record(bar)
        bar.close()
        return self._finish(final)

    def train_step(self, batches: Iterator[Batch]) -> StepStats:
        """One optimizer step over the next `train.grad_accumulation` batches of `batches` (gradients accumulated,
        loss-scaled in float16), counted in `step` and `train_seconds`. Nothing here waits for the device: the
        step's queued work is counted when `_drain_device` waits for it (at logs, evaluations, checkpoints)."""
        accumulation = self.config.train.grad_accumulation
        started = time.perf_counter()
        losses: list[Tensor] = []
        samples = tokens = 0
        for _ in range(accumulation):
            batch = next(batches)
            row_losses, _ = self.model(batch)
            loss = self.world.mean_over_global_batch(row_losses)
            self.scaler.scale(loss / accumulation).backward()
            losses.append(loss.detach())
            samples += batch.batch_size
            tokens += sequence_tokens(batch)
        grad_norm = self._optimizer_step()
        self.train_seconds += time.perf_counter() - started
        self.step += 1
        return StepStats(losses=losses, samples=samples, tokens=tokens, grad_norm=grad_norm)

    def _drain_device(self) -> None:
        """Wait for the training work queued on the device and count the wait in `train_seconds`, so that the
        steps' device time is counted and evaluation or checkpoint time is not."""
        if self.device.type == "cuda":
            started = time.perf_counter()
            torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - started

    def _log_window(self, window: _LogWindow, grad_norm: Tensor | None, bar: ProgressLog) -> None:
        """Log the window's loss, learning rate and throughput over every data-parallel rank (the last step's
        gradient norm too) to TensorBoard, the history and the progress log; count its samples and tokens."""
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        loss_sum, samples, tokens = self.world.sum_over_data_parallel(
            [window.loss_sum(self.world.dp_size), window.samples, window.tokens]
        )
        stats = {
            "loss": loss_sum / len(window.losses),
            "lr": self.optimizers.learning_rate,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
        }
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        self.recorder.scalars("train", stats, self.step)
        bar.log_step(self.step, stats)
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)

    # ---------------------------------------------------------------------------------------------- evaluation

    def _evaluate_and_record(self, bar: ProgressLog) -> dict[str, float]:
        metrics = self.evaluate()
        self.recorder.scalars("eval", metrics, self.step)
        bar.log_evaluation(self.step, metrics)
        self.model.train()
        return metrics

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Metrics over the evaluation split (the first `max_batches`, default `train.eval_batches`, or all).

        With several data-parallel ranks each evaluates its share of the users (and `max_batches` counts batches
        per rank); the metrics combine every rank's predictions, so they are those of the whole split.
        """
        limit = max_batches if max_batches is not None else self.config.train.eval_batches
        self.model.eval()
        return self.model.evaluate(self._evaluation_batches(limit), self.eval_dataset.schema, self.world.dp_group)

    def _evaluation_batches(self, limit: int | None) -> Iterator[tuple[Batch, bool]]:
        """`(batch, counts)` pairs: this rank's evaluation batches (`counts` True), then as many repeats of one
        batch (`counts` False, their results are dropped) as it takes to make every rank run the same number of
        forward passes, which sharded embedding tables need (their lookups are collective)."""
        dataset = self.eval_dataset
        users_per_rank = -(-len(dataset) // self.world.dp_size)
        passes = -(-users_per_rank // self.config.data.eval_batch_size)
        if limit is not None:
            passes = min(passes, limit)
        batches = iter(self._loader(dataset, train=False))
        filler: Batch | None = None
        for _ in range(passes):
            batch = next(batches, None)
            if batch is not None:
                filler = batch
                yield batch, True
            else:
                if filler is None:
                    filler = collate_samples([dataset[0]], dataset.schema)
                yield filler, False

    # --------------------------------------------------------------------------------------------- checkpoints

    def _checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def _loop_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_into_epoch": self.batches_into_epoch,
            "train_seconds": self.train_seconds,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "history": {tag: list(values) for tag, values in self.recorder.history.items()},
            "scheduler": self.optimizers.scheduler.state_dict(),
            "sparse_optimizers": {name: opt.state_dict() for name, opt in self.optimizers.sparse.items()},
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),  # what gr-eval / gr-export rebuild the model from
            "layout": checkpointing.layout_of(self.world),
            "samples_into_epoch": checkpointing.samples_into_epoch(
                self.batches_into_epoch, self.config.data.batch_size, self.world.dp_size
            ),
            "rng_per_rank": checkpointing.gather_per_rank(checkpointing.rng_states(self.device), self.world),
        }

    def save_checkpoint(self) -> Path:
        """Model, optimizers and loop position through gr_checkpoint into `checkpoints/step_<N>`.

        The dense optimizer is gr_checkpoint's `optimizer`; the sparse per-table optimizers, the LR schedule, the
        loss scaler, every rank's RNG states and the data position travel as its `extra_state` (see
        `gr_models.trainer.checkpointing`). Only the `train.keep_last` newest checkpoints are kept. Collective.
        """
        import gr_checkpoint

        path = gr_checkpoint.save_step(
            self._checkpoint_root(),
            self.step,
            self.model,
            self.optimizers.dense,
            extra_state=self._loop_state(),
            keep_last=self.config.train.keep_last,
        )
        return cast(Path, path)  # a synchronous save returns the path

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run directory, or None."""
        import gr_checkpoint

        return gr_checkpoint.latest_checkpoint(self._checkpoint_root())

    def load_latest_checkpoint(self) -> bool:
        """Restore model, optimizers and loop position from the latest checkpoint; False when there is none.

        The checkpoint may come from a run of another world or tensor-parallel size (see
        `gr_models.trainer.checkpointing`). Rank 0 logs what it resumed from and warns about config keys that
        differ from the checkpoint's.
        """
        path = self.latest_checkpoint()
        if path is None:
            return False
        import gr_checkpoint

        state = gr_checkpoint.load(path, self.model, self.optimizers.dense)
        checkpointing.fill_in_older_state(state, gr_checkpoint.read_manifest(path).world_size)
        checkpointing.restore_sparse_optimizers(state, self, path)
        self.optimizers.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_into_epoch = checkpointing.resumed_batches_into_epoch(state, self)
        self.train_seconds = float(state["train_seconds"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])
        for tag, values in state["history"].items():
            self.recorder.history[tag] = [(int(s), float(v)) for s, v in values]
        if not checkpointing.restore_rng(state, self):
            self._seed_data_parallel_rank()
        checkpointing.report_resume(state, self, path)
        return True

    def _seed_data_parallel_rank(self) -> None:
        """In a run of several processes, give each data-parallel rank its own torch RNG stream from here on (by
        seed, data-parallel rank and step), so sampled negatives and dropout masks differ between data-parallel
        ranks, while the tensor-parallel peers of one share a stream: they compute the same replicated activations
        (dropout outside the split layers included), whatever building the sharded model drew on each. Nothing
        changes in a one-process run."""
        if self.world.world_size > 1:
            torch.manual_seed(self.config.seed + 1_000_003 * (self.world.dp_rank + 1) + self.step)

    # ------------------------------------------------------------------------------------------------- results

    def _finish(self, metrics: dict[str, float]) -> TrainResult:
        seconds = max(self.train_seconds, 1e-9)
        throughput = {
            "train_seconds": self.train_seconds,
            "samples_per_s": self.samples_seen / seconds,
            "tokens_per_s": self.tokens_seen / seconds,
            "samples": float(self.samples_seen),
            "tokens": float(self.tokens_seen),
        }
        files = {
            "metrics": str(self.run_dir / "metrics.json"),
            "curves": str(self.run_dir / "curves.png"),
            "tensorboard": str(self.run_dir / "tensorboard"),
        }
        result = TrainResult(step=self.step, metrics=metrics, throughput=throughput, files=files)
        if self.world.is_main:
            self._write_records(result)
        self.recorder.close()
        return result

    def _write_records(self, result: TrainResult) -> None:
        """metrics.json (final metrics, throughput, history, config) and curves.png (rank 0 only)."""
        self.recorder.plot(Path(result.files["curves"]), title=f"{self.config.name} ({self.device.type})")
        payload: dict[str, Any] = {
            "name": self.config.name,
            "step": self.step,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": self.world.world_size,
            "tensor_model_parallel_size": self.world.world_size // self.world.dp_size,
            "pipeline": {
                "kind": self.config.parallel.pipeline,
                "lookups_distributed_ahead": getattr(self.pipeline, "pipelined_calls", 0),
            },
            "metrics": result.metrics,
            "throughput": result.throughput,
            "history": dict(self.recorder.history),
            "config": self.config.to_dict(),
        }
        write_json(Path(result.files["metrics"]), payload)
