"""Progress bars drawn on the driver's console by Ray's distributed tqdm: rank 0's bar for each training epoch, and
one per content/style pair of ``raycv stylize``.

A Ray worker's output reaches the driver as log lines; ``ray.experimental.tqdm_ray`` sends the bar's state that way
and the driver draws it with tqdm, so a run shows one live bar rather than a line per step.
"""

from __future__ import annotations

import math
import time

import torch
from ray.experimental import tqdm_ray

#: Seconds between refreshes of the bar's loss and examples/sec (each reads the loss from the device).
REFRESH_SECONDS = 1.0


def steps_per_epoch(rows: int, workers: int, batch_size: int) -> int:
    """Steps each worker takes over its equal share of ``rows``."""
    return max(1, math.ceil(rows / max(workers, 1) / max(batch_size, 1)))


class StepProgress:
    """Steps done and left (with tqdm's ETA), the latest loss and, where steps see examples, examples/sec."""

    def __init__(self, label: str, steps: int) -> None:
        self.label = label
        self.bar = tqdm_ray.tqdm(desc=label, total=steps, unit="step")
        self.started = time.perf_counter()
        self.refreshed = self.started
        self.examples = 0

    def step(self, examples: int, loss: torch.Tensor | float) -> None:
        self.examples += examples
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.refreshed >= REFRESH_SECONDS:
            self.refreshed = now
            rate = f" {self.examples / max(now - self.started, 1e-9):.0f} ex/s" if self.examples else ""
            self.bar.set_description(f"{self.label} loss {float(loss):.4g}{rate}")

    def close(self) -> None:
        self.bar.close()


class EpochProgress(StepProgress):
    """One training epoch's bar: ``epoch 2/5 loss 0.8123 412 ex/s``."""

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        super().__init__(f"epoch {epoch + 1}/{epochs}", steps)
