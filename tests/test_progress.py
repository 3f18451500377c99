"""Progress on the driver's console: a live bar on a terminal, plain logged lines into a file or a pipe."""

from __future__ import annotations

import io
import logging

import pytest

from pipelines import progress
from pipelines.progress import PROGRESS_ENV, StepProgress, console_style


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_style_follows_the_terminal_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert console_style() == "lines"
    monkeypatch.setattr("sys.stderr", Terminal())
    assert console_style() == "bar"
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    assert console_style() == "lines"
    monkeypatch.setenv(PROGRESS_ENV, "fancy")
    with pytest.raises(ValueError, match="RAYCV_PROGRESS='fancy': use bar or lines"):
        console_style()


def test_lines_style_logs_steps_loss_and_rate_at_most_every_interval(monkeypatch, caplog):
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 62.5])  # the start, then one reading per step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = StepProgress("epoch 2/5", 10, "lines", line_seconds=30.0)
    with caplog.at_level(logging.INFO, logger=progress.__name__):
        for loss in (2.0, 1.5, 1.25, 1.0, 0.75):
            bar.step(100, loss)
        bar.close()
    assert [record.getMessage() for record in caplog.records] == [
        "epoch 2/5: step 3/10, loss 1.25 10 ex/s, 31 s",  # 300 examples in 31 s
        "epoch 2/5: step 5/10, loss 0.75 8 ex/s, 62 s",
    ]


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError, match="progress style 'tty'"):
        StepProgress("pair", 3, "tty")
