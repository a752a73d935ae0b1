"""Run records: scalar history, TensorBoard event files, the metrics JSON, a PNG of the curves, and the progress
lines a person reads (a tqdm bar on a terminal, else one log line per logged step and per evaluation)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

_log = logging.getLogger("gr_models.trainer")


class RunRecorder:
    """Keeps every logged scalar `(step, value)` by tag and mirrors it to TensorBoard under `run_dir/tensorboard`
    (the event file is created with the first scalar, so a recorder that records nothing writes nothing)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._tensorboard = tensorboard
        self._writer: Any = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.history[tag].append((step, float(value)))
        if self._tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()

    def plot(self, path: Path, title: str) -> Path:
        """One panel for the training loss and one per evaluation metric; written with matplotlib's Agg backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tags = [t for t in self.history if t == "train/loss"] + sorted(t for t in self.history if t.startswith("eval/"))
        columns = min(3, max(1, len(tags)))
        rows = max(1, math.ceil(len(tags) / columns))
        figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
        for axis in axes.flat[len(tags) :]:
            axis.axis("off")
        for axis, tag in zip(axes.flat, tags):
            steps, values = zip(*self.history[tag])
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            axis.set_title(tag)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        figure.suptitle(title)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


class ProgressLog:
    """Training progress on the main rank.

    A tqdm bar (written to `stream`, default stdout) when `progress_bar` is on and `stream` is a terminal; otherwise
    (a file, a pipe, or `progress_bar` off) one `logging` INFO line on the `gr_models.trainer` logger per logged
    step: step, loss, learning rate, samples/s, tokens/s and the estimated time left. Every evaluation is one line
    (through the bar when there is one). Nothing is shown where `enabled` is False (ranks other than 0).
    """

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        *,
        enabled: bool = True,
        progress_bar: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        if enabled and progress_bar and stream.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
        self._started = time.perf_counter()

    @property
    def shows_bar(self) -> bool:
        return self._bar is not None

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at this run's pace (evaluations included), or None before its first step."""
        done = step - self.initial
        if done <= 0:
            return None
        return (self.total - step) * (time.perf_counter() - self._started) / done

    def log_step(self, step: int, stats: dict[str, float]) -> None:
        """`stats`: loss, lr, samples_per_s, tokens_per_s (as the trainer records them)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{stats['loss']:.4f}",
                samples_s=f"{stats['samples_per_s']:.0f}",
                tokens_s=f"{stats['tokens_per_s']:.0f}",
            )
            return
        eta = self.eta_seconds(step)
        _log.info(
            "step %d/%d | loss %.4f | lr %.3g | %.1f samples/s | %.0f tokens/s | ETA %s",
            step, self.total, stats["loss"], stats["lr"], stats["samples_per_s"], stats["tokens_per_s"],
            "?" if eta is None else str(datetime.timedelta(seconds=round(eta))),
        )  # fmt: skip

    def log_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        if self._bar is not None:
            self._bar.write(line)
        else:
            _log.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
