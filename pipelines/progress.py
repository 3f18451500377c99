"""Progress of long work on the driver's console: rank 0's progress through each training epoch, and each
content/style pair of ``raycv stylize``.

On a terminal, a live bar: ``ray.experimental.tqdm_ray`` sends the bar's state from the Ray worker as log lines and
the driver draws it with tqdm, so a run shows one bar rather than a line per step. Into a file or a pipe (``ray job
submit``'s logs, CI, ``> run.log``) a redrawn bar is a run-on line of carriage returns, so there the worker logs a
plain line every :data:`LINE_SECONDS` instead. The driver picks the style (:func:`console_style`), since only it
knows where its console goes, and hands it to the workers.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Seconds between refreshes of the bar's loss and examples/sec (each reads the loss from the device).
REFRESH_SECONDS = 1.0
#: Seconds between progress lines where the console is not a terminal.
LINE_SECONDS = 30.0
#: Environment variable that overrides the style: ``bar`` or ``lines``.
PROGRESS_ENV = "RAYCV_PROGRESS"
STYLES = ("bar", "lines")


def console_style() -> str:
    """``bar`` where the driver's console (stderr, where tqdm draws) is a terminal, else ``lines``; ``$RAYCV_PROGRESS``
    overrides it."""
    style = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if style and style not in STYLES:
        raise ValueError(f"{PROGRESS_ENV}={style!r}: use {' or '.join(STYLES)}")
    return style or ("bar" if sys.stderr.isatty() else "lines")


def steps_per_epoch(rows: int, workers: int, batch_size: int) -> int:
    """Steps each worker takes over its equal share of ``rows``."""
    return max(1, math.ceil(rows / max(workers, 1) / max(batch_size, 1)))


class StepProgress:
    """Steps done and left, the latest loss and, where steps see examples, examples/sec: a live bar (with tqdm's
    ETA) in ``bar`` style, a logged line every ``line_seconds`` in ``lines`` style."""

    def __init__(self, label: str, steps: int, style: str = "bar", line_seconds: float = LINE_SECONDS) -> None:
        if style not in STYLES:
            raise ValueError(f"progress style {style!r}: use {' or '.join(STYLES)}")
        self.label, self.steps, self.line_seconds = label, steps, line_seconds
        self.bar = None
        if style == "bar":
            from ray.experimental import tqdm_ray  # only where a bar is drawn

            self.bar = tqdm_ray.tqdm(desc=label, total=steps, unit="step")
        self.started = time.perf_counter()
        self.refreshed = self.started
        self.done = 0
        self.examples = 0

    def step(self, examples: int, loss: torch.Tensor | float) -> None:
        self.examples += examples
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        now = time.perf_counter()
        if now - self.refreshed < (REFRESH_SECONDS if self.bar is not None else self.line_seconds):
            return
        self.refreshed = now
        rate = f" {self.examples / max(now - self.started, 1e-9):.0f} ex/s" if self.examples else ""
        if self.bar is not None:
            self.bar.set_description(f"{self.label} loss {float(loss):.4g}{rate}")
        else:
            log.info("%s: step %d/%d, loss %.4g%s, %.0f s", self.label, self.done, self.steps, float(loss), rate,
                     now - self.started)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochProgress(StepProgress):
    """One training epoch's progress: ``epoch 2/5 loss 0.8123 412 ex/s``."""

    def __init__(self, epoch: int, epochs: int, steps: int, style: str = "bar") -> None:
        super().__init__(f"epoch {epoch + 1}/{epochs}", steps, style)
