"""Stop signals on a run's driver (pipelines.interrupts), in this process: the main thread gets RunInterrupted
while the work goes on in a helper thread, and a sweep's stop goes to Tune's handler. Whole commands under SIGTERM:
tests/test_running_places.py (raycv train) and tests/test_sweep.py (raycv tune)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipelines.interrupts import (
    TUNE_SIGINT_SWITCH,
    RunInterrupted,
    fit_interruptibly,
    stop_signals_raise,
    stop_signals_stop_tune,
)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_raises_run_interrupted_and_the_handlers_come_back(number):
    before = signal.getsignal(number)
    started = threading.Event()

    def fit() -> str:
        started.set()
        time.sleep(5)
        return "finished"

    def send() -> None:
        started.wait(5)
        os.kill(os.getpid(), number)

    threading.Thread(target=send, daemon=True).start()
    began = time.perf_counter()
    with pytest.raises(RunInterrupted) as stopped, stop_signals_raise():
        fit_interruptibly(fit)
    assert time.perf_counter() - began < 2.5  # the main thread did not wait for fit to end
    assert stopped.value.signal_number == number
    assert str(stopped.value) == f"stopped by {signal.Signals(number).name}"
    assert signal.getsignal(number) is before


def test_a_stop_signal_ends_a_wait_inside_ray_at_once(ray_cluster):
    """In ``ray.get`` (Ray Data's ``from_pandas`` waits in one while a run's splits are built) a handler's
    KeyboardInterrupt ends the wait at once, and the block turns it into RunInterrupted with the signal's number;
    any other exception raised there would surface only once the wait ends, as a SystemError."""
    import ray

    @ray.remote(num_cpus=0)
    def sleeper() -> None:
        time.sleep(60)

    waited = sleeper.remote()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    began = time.perf_counter()
    with pytest.raises(RunInterrupted) as stopped, stop_signals_raise():
        ray.get(waited)
    assert time.perf_counter() - began < 10
    assert stopped.value.signal_number == signal.SIGTERM
    ray.cancel(waited, force=True)


def test_fit_interruptibly_returns_fits_result_and_raises_its_error():
    assert fit_interruptibly(lambda: 42) == 42

    def broken() -> None:
        raise FileNotFoundError("no such split")

    with pytest.raises(FileNotFoundError, match="no such split"):
        fit_interruptibly(broken)


def test_off_the_main_thread_nothing_changes():
    """A Tune trial runs its training off the main thread: no handlers (Python refuses them there), fit in place."""
    seen = {}

    def trial() -> None:
        with stop_signals_raise():
            seen["thread"] = fit_interruptibly(lambda: threading.current_thread().name)

    worker = threading.Thread(target=trial, name="trial")
    worker.start()
    worker.join(5)
    assert seen == {"thread": "trial"}


def test_stop_signals_reach_tunes_stop_handler_once_and_are_recorded(monkeypatch):
    """Tune's handler for SIGUSR1 (``Tuner.fit`` installs it; Tune's own SIGINT handler is switched off within) gets
    the first stop signal; a second one stops at once."""
    monkeypatch.delenv(TUNE_SIGINT_SWITCH, raising=False)
    tune_stops = []
    before = signal.getsignal(signal.SIGUSR1)
    try:
        with stop_signals_stop_tune() as received:
            assert os.environ[TUNE_SIGINT_SWITCH] == "1"
            signal.signal(signal.SIGUSR1, lambda number, frame: tune_stops.append(number))  # as Tuner.fit does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert received == [signal.SIGINT] and tune_stops == [signal.SIGUSR1]
            with pytest.raises(RunInterrupted):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert TUNE_SIGINT_SWITCH not in os.environ
