"""Run records: scalar history, TensorBoard event files, the metrics JSON and a PNG of the curves."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any


class RunRecorder:
    """Keeps every logged scalar `(step, value)` by tag and mirrors it to TensorBoard under `run_dir/tensorboard`."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.history[tag].append((step, float(value)))
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
