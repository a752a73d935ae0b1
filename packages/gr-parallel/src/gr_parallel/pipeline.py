"""Train pipelines: the plain loop, and one that overlaps the next batches' data movement with the
current batch's compute while giving exactly the plain loop's losses.

``make_train_pipeline("overlap", model, device, sparse_inputs=...)`` keeps three batches in flight:

* batch ``i + 2``: its host-to-device copy runs on a side CUDA stream (``batch.to(device,
  non_blocking=True)``; the loader should hand out pinned batches, e.g. ``DataLoader(pin_memory=True)``);
* batch ``i + 1``: the input distribution of every sharded embedding module named by
  ``sparse_inputs`` (TorchRec's ``ShardedModule.input_dist``: the id all-to-alls of static tables and
  of dynamicemb tables) is started on a second side stream;
* batch ``i``: yielded to the caller, whose forward, backward and optimizer step run on the current
  stream; when the forward calls a sharded module, the module takes the input distribution started
  one step earlier and only computes (lookup) and distributes the output.

Tensors made on a side stream and used on another are marked with ``record_stream`` so the caching
allocator does not hand their memory out early; each stream waits for the one that produced its
inputs. Without CUDA (the CPU, gloo) there are no streams and the order of work is the same, so the
input all-to-alls of batch ``i + 1`` (asynchronous on gloo) still overlap batch ``i``'s compute.

Why losses are exactly the plain loop's: the copy and the input distribution are pure functions of
the batch (no table or parameter is read), so running them early changes no value. The embedding
lookup itself is not run ahead: sharded static tables and dynamic tables apply their optimizer
inside batch ``i``'s backward, so a lookup of batch ``i + 1`` before that would read stale rows (and
could insert or evict keys of a dynamic table that batch ``i`` still updates).

Why not TorchRec's ``TrainPipelineSparseDist``: it finds each sharded module's input by ``torch.fx``
tracing the whole model, which fails on models with data-dependent control flow (jagged lengths,
``.item()``, custom attention kernels); and its ``progress`` owns backward and the optimizer step,
leaving no room for gradient accumulation, loss scaling or clipping. Here the model states its
sparse inputs with a function, and the caller keeps its own step.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import nn
from torchrec.distributed.types import Awaitable, ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = [
    "OverlapTrainPipeline",
    "PipelineKind",
    "SparseInputs",
    "TrainPipeline",
    "make_train_pipeline",
    "sparse_inputs_from_attribute",
]

B = TypeVar("B")
PipelineKind = Literal["none", "overlap"]
SparseInputs = Callable[[Any], Mapping[nn.Module, KeyedJaggedTensor]]
"""``sparse_inputs(device_batch) -> {sharded module: the KeyedJaggedTensor its forward will get}``."""


def sparse_inputs_from_attribute(model: nn.Module, attribute: str = "features") -> SparseInputs:
    """``sparse_inputs`` for a model whose every top-level sharded module is called with
    ``getattr(batch, attribute)`` as is (the common TorchRec layout)."""
    modules = _top_sharded_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no TorchRec ShardedModule")
    return lambda batch: dict.fromkeys(modules, getattr(batch, attribute))


def _top_sharded_modules(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, ShardedModule):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def _to_device(batch: B, device: torch.device, non_blocking: bool) -> B:
    if not callable(getattr(batch, "to", None)):
        raise TypeError(f"a pipelined batch needs .to(device, non_blocking=...); got a {type(batch).__name__}")
    return batch.to(device, non_blocking=non_blocking)  # type: ignore[attr-defined]


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    if not callable(getattr(batch, "record_stream", None)):
        raise TypeError(f"a batch copied on a side stream needs .record_stream(stream); got a {type(batch).__name__}")
    batch.record_stream(stream)


class TrainPipeline(Generic[B]):
    """The plain loop: each batch is moved to ``device`` when it is needed, nothing runs ahead.

    Use either :meth:`batches` (the caller runs forward, backward and the optimizer step) or
    :meth:`progress` (one whole step).

    Args:
        model: called as ``model(batch) -> (losses, output)`` by :meth:`progress`.
        device: where batches go.
        optimizers: stepped (then zeroed) by :meth:`progress`; not needed with :meth:`batches`.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, optimizers: Sequence[Any] = ()) -> None:
        self.model = model
        self.device = torch.device(device)
        self.optimizers = list(optimizers)
        self._source: Iterator[B] | None = None

    @property
    def in_flight(self) -> int:
        """Batches drawn from the source but not yet handed out (resume positions must subtract them)."""
        return 0

    def _next(self) -> B:
        """The next device batch; StopIteration when the source is exhausted."""
        assert self._source is not None
        return _to_device(next(self._source), self.device, non_blocking=False)

    def batches(self, source: Iterable[B]) -> Iterator[B]:
        """Device batches of ``source`` in order, for a loop that runs the step itself."""
        self._source = iter(source)
        while True:
            try:
                batch = self._next()
            except StopIteration:
                return
            yield batch

    def progress(self, iterator: Iterator[B]) -> tuple[torch.Tensor, Any]:
        """One training step on the next batch of ``iterator`` (pass the same iterator every step):
        ``losses, output = model(batch)``; ``losses.mean().backward()``; every optimizer steps and is
        zeroed. Returns the detached mean loss and the output; StopIteration when ``iterator`` ends."""
        self._source = iterator
        batch = self._next()
        losses, output = self.model(batch)
        loss = losses.mean()
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        return loss.detach(), output

    def close(self) -> None:
        """Release what the pipeline changed on the model (nothing for the plain loop)."""


@dataclass
class _PendingDist:
    """A sharded module's input distribution started ahead: its context, the awaitable of the
    distributed input, and what the forward's argument must look like."""

    context: Any
    request: Awaitable[Any]
    signature: tuple[tuple[str, ...], int, int]


def _signature(features: KeyedJaggedTensor) -> tuple[tuple[str, ...], int, int]:
    """(keys, stride, number of ids): read from shapes only, no device synchronization."""
    return tuple(features.keys()), features.stride(), features.values().numel()


class OverlapTrainPipeline(TrainPipeline[B]):
    """Copy of batch ``i + 2``, input distribution of batch ``i + 1`` and compute of batch ``i``
    overlapped (see the module docstring); same batches, same losses as :class:`TrainPipeline`.

    Args:
        model, device, optimizers: as for :class:`TrainPipeline`.
        sparse_inputs: ``device batch -> {sharded module: KJT it is called with}`` for the modules
            whose input distribution should run ahead, each a TorchRec ``ShardedModule`` inside
            ``model`` (e.g. from ``DistributedModelParallel`` or ``gr_parallel.shard_embedding_modules``)
            that the model's forward calls once per batch with exactly that KJT; later calls of the
            same module in a forward (e.g. a lookup of sampled negatives) run unpipelined. ``None``:
            only the copy is overlapped.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        optimizers: Sequence[Any] = (),
        *,
        sparse_inputs: SparseInputs | None = None,
    ) -> None:
        super().__init__(model, device, optimizers)
        self.sparse_inputs = sparse_inputs
        on_cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device=self.device) if on_cuda else None
        self._dist_stream = torch.cuda.Stream(device=self.device) if on_cuda else None
        self._copied: deque[tuple[B, torch.cuda.Event | None]] = deque()  # batch, its copy's end
        self._ready: tuple[B, torch.cuda.Event | None, dict[nn.Module, _PendingDist]] | None = None
        self._armed: dict[nn.Module, _PendingDist] = {}
        self._originals: dict[nn.Module, Any] = {}
        self._model_modules: set[int] | None = None
        self._exhausted = False
        self.pipelined_calls = 0
        """Sharded-module forwards served by an input distribution started ahead (for checks and logs)."""

    @property
    def in_flight(self) -> int:
        return len(self._copied) + (self._ready is not None)

    def _stream(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _enqueue_copy(self) -> None:
        if self._exhausted or self._source is None:
            return
        try:
            host_batch = next(self._source)
        except StopIteration:
            self._exhausted = True
            return
        with self._stream(self._copy_stream):
            batch = _to_device(host_batch, self.device, non_blocking=True)
            copied = self._copy_stream.record_event() if self._copy_stream is not None else None
        self._copied.append((batch, copied))

    def _check_module(self, module: nn.Module) -> None:
        if not isinstance(module, ShardedModule):
            raise TypeError(f"sparse_inputs names a {type(module).__name__}, not a TorchRec ShardedModule")
        if self._model_modules is None:
            self._model_modules = {id(m) for m in self.model.modules()}
        if id(module) not in self._model_modules:
            raise ValueError(f"sparse_inputs names a {type(module).__name__} that is not inside the model")

    def _start_dist(
        self, batch: B, copied: torch.cuda.Event | None
    ) -> tuple[B, torch.cuda.Event | None, dict[nn.Module, _PendingDist]]:
        """Start (on the dist stream, after ``batch``'s copy) the input distribution of ``batch`` for
        every named module."""
        pending: dict[nn.Module, _PendingDist] = {}
        if self.sparse_inputs is None:
            return batch, copied, pending
        with self._stream(self._dist_stream):
            if self._dist_stream is not None and copied is not None:
                self._dist_stream.wait_event(copied)
                _record_stream(batch, self._dist_stream)
            for module, features in self.sparse_inputs(batch).items():
                if module not in self._originals:
                    self._check_module(module)
                    self._patch(module)
                context = module.create_context()  # type: ignore[operator]
                splits = module.input_dist(context, features)  # type: ignore[operator]
                pending[module] = _PendingDist(context, splits.wait(), _signature(features))
        return batch, copied, pending

    def _patch(self, module: nn.Module) -> None:
        self._originals[module] = module.__dict__.get("forward")
        module.forward = functools.partial(self._pipelined_forward, module, module.forward)  # type: ignore[method-assign]

    def _pipelined_forward(self, module: nn.Module, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        pending = self._armed.pop(module, None)
        if pending is None:
            return original(*args, **kwargs)
        features = args[0] if args else next(iter(kwargs.values()), None)
        if len(args) + len(kwargs) != 1 or not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"a pipelined {type(module).__name__} must be called with one KeyedJaggedTensor")
        if _signature(features) != pending.signature:
            raise RuntimeError(
                f"sparse_inputs gave the {type(module).__name__} (keys, batch size, ids) = {pending.signature}, "
                f"but the model's forward called it with {_signature(features)}: sparse_inputs must return "
                "exactly what the forward passes to each module"
            )
        with self._stream(self._dist_stream):
            dist_input = pending.request.wait()
        if self._dist_stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._dist_stream)
            dist_input.record_stream(current)
            pending.context.record_stream(current)
        self.pipelined_calls += 1
        return module.compute_and_output_dist(pending.context, dist_input)  # type: ignore[operator]

    def _next(self) -> B:
        if self._ready is None:
            if not self._copied:
                self._enqueue_copy()
            if not self._copied:
                raise StopIteration
            self._ready = self._start_dist(*self._copied.popleft())
        batch, copied, pending = self._ready
        self._ready = None
        unused = [type(m).__name__ for m in self._armed]
        if unused:
            raise RuntimeError(
                f"the forward of the previous batch did not call {unused}, whose input distribution "
                "sparse_inputs had started: name only modules that every forward calls"
            )
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            _record_stream(batch, current)
        self._armed = pending
        if not self._copied:
            self._enqueue_copy()
        if self._copied:
            self._ready = self._start_dist(*self._copied.popleft())
        self._enqueue_copy()
        return batch

    def batches(self, source: Iterable[B]) -> Iterator[B]:
        self._reset()
        return super().batches(source)

    def _reset(self) -> None:
        self._copied.clear()
        self._ready = None
        self._armed = {}
        self._exhausted = False

    def close(self) -> None:
        """Give the sharded modules their own forward back and drop batches in flight."""
        for module, original in self._originals.items():
            if original is None:
                del module.forward
            else:
                module.forward = original  # type: ignore[method-assign]
        self._originals.clear()
        self._reset()


def make_train_pipeline(
    kind: PipelineKind,
    model: nn.Module,
    device: torch.device | str,
    optimizers: Sequence[Any] = (),
    *,
    sparse_inputs: SparseInputs | None = None,
) -> TrainPipeline[Any]:
    """The train pipeline of a config's ``pipeline: none|overlap``.

    ``"none"``: :class:`TrainPipeline` (the plain loop; ``sparse_inputs`` is not used);
    ``"overlap"``: :class:`OverlapTrainPipeline` (``sparse_inputs`` as documented there). Both give the
    same batches in the same order.
    """
    if kind == "none":
        return TrainPipeline(model, device, optimizers)
    if kind == "overlap":
        return OverlapTrainPipeline(model, device, optimizers, sparse_inputs=sparse_inputs)
    raise ValueError(f"unknown pipeline {kind!r}: choose 'none' or 'overlap'")
