"""Ctrl-C and SIGTERM on the driver of a training run or a sweep: the work stops, its MLflow runs say so, and the
command says how to continue it.

Ray Train's own Ctrl-C handler (``TorchTrainer.fit`` installs it on the main thread) aborts the run through its
controller and then exits 1 without a word of why, which left the MLflow run FAILED as "SystemExit: 1"; SIGTERM
(``kill``, ``timeout``, a batch scheduler ending a job) reached Ray's C++ failure handler, which printed stack
dumps. Here both signals raise :class:`RunInterrupted` in the driver's main thread while ``fit`` runs in a helper
thread, where Ray Train installs no handler (as in a Tune trial). The run's Ray Train controller and workers are
actors of this driver's job, so they end with it as ``raycv train`` exits; its checkpoints stay for ``--resume``.
A caller that lives on after the run (a notebook, a test session) keeps Ray Train's own handler (:func:`fit_run`).
A sweep's stop goes to Tune's own, which saves the sweep for ``--resume PATH`` (:func:`stop_signals_stop_tune`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pipelines.failures import RunError

T = TypeVar("T")

#: What stops a run: Ctrl-C, and what ``kill``, ``timeout`` and batch schedulers send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How often the main thread wakes from waiting on ``fit`` (a signal's handler runs only then).
JOIN_SECONDS = 0.2
#: Tune's switch for the SIGINT handler ``Tuner.fit`` installs (its SIGUSR1 handler, the same, stays).
TUNE_SIGINT_SWITCH = "TUNE_DISABLE_SIGINT_HANDLER"


class RunInterrupted(RunError):
    """A stop signal ended the run; the CLI prints the message and exits 128 + the signal's number.

    ``resume``: what ``--resume`` takes to continue the stopped work (a run id, a sweep's path), where it can be;
    the message says what happened, and the command that knows its own options adds how to go on
    (:meth:`with_hint`)."""

    def __init__(self, signal_number: int, message: str | None = None, resume: str | None = None) -> None:
        self.signal_number = signal_number
        self.resume = resume
        super().__init__(message or f"stopped by {signal.Signals(signal_number).name}")

    def with_hint(self, hint: str) -> RunInterrupted:
        """The same stop, its message followed by ``hint`` (how to go on)."""
        return RunInterrupted(self.signal_number, f"{self}; {hint}", self.resume)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within it, SIGINT and SIGTERM raise :class:`RunInterrupted` in the main thread; in any other thread (a Tune
    trial's, where Tune handles signals) it changes nothing.

    The handler raises KeyboardInterrupt, which leaves the block as RunInterrupted: a wait inside Ray (``ray.get``,
    as in ``ray.data.from_pandas``) turns a handler's KeyboardInterrupt into a new one and ends early, but any
    other exception raised there surfaces only when the wait ends, as a SystemError."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def stop(signal_number: int, frame: Any) -> None:
        received.append(signal_number)
        raise KeyboardInterrupt  # the one exception Ray's waits pass on: any other becomes a SystemError after them

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:  # ours, passed on by a wait in Ray (which raises a new one), or Ctrl-C before it
        raise RunInterrupted(received[0] if received else signal.SIGINT) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def fit_interruptibly(fit: Callable[[], T]) -> T:
    """``fit()`` in a helper thread when called on the main thread, which waits for it, so that a stop signal
    reaches :func:`stop_signals_raise`'s handler rather than one ``fit`` installs; elsewhere just ``fit()``."""
    if threading.current_thread() is not threading.main_thread():
        return fit()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as error:  # handed to the main thread below
            outcome["error"] = error

    helper = threading.Thread(target=run, name="raycv-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(JOIN_SECONDS)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """Put back the SIGINT handler that ``TorchTrainer.fit`` replaces on the main thread.

    Ray Train's handler (Ctrl-C aborts the run) closes over the run's controller actor handle, so left installed it
    keeps that controller alive for as long as a long-lived process (a notebook, a test session) runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fit_run(fit: Callable[[], T], stop_signals: bool) -> T:
    """``fit()`` (a ``TorchTrainer``'s, or ``raycv stylize``'s wait for its pairs) on the driver. With
    ``stop_signals`` (a command whose process ends with the work), Ctrl-C and SIGTERM raise :class:`RunInterrupted`
    at once and the process's exit ends the work.
    Without (a caller that lives on), Ray Train's own Ctrl-C handler aborts the run through its controller."""
    if stop_signals:
        with stop_signals_raise():
            return fit_interruptibly(fit)
    with _sigint_handler_restored():
        return fit()


@contextmanager
def stop_signals_stop_tune() -> Iterator[list[int]]:
    """Within it (around ``Tuner.fit`` on the main thread), Ctrl-C and SIGTERM stop a sweep the way Tune stops one
    on Ctrl-C (its handler saves the experiment's state and ends the sweep), and are recorded: the yielded list
    holds the signals received, so the caller knows the sweep was stopped (Tune's results do not say so: a stopped
    trial can read as terminated). Tune's SIGINT handler is switched off and its SIGUSR1 handler, the same, is
    sent instead. (Without this, SIGTERM reached Ray's C++ failure handler, which printed stack dumps.)"""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signal_number: int, frame: Any) -> None:
        received.append(signal_number)
        if len(received) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's stop handler
        else:  # a second one: stop waiting for Tune to save (as a second Ctrl-C does in Tune)
            raise RunInterrupted(received[0])

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    switch = os.environ.get(TUNE_SIGINT_SWITCH)
    os.environ[TUNE_SIGINT_SWITCH] = "1"
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if switch is None:
            os.environ.pop(TUNE_SIGINT_SWITCH, None)
        else:
            os.environ[TUNE_SIGINT_SWITCH] = switch
