"""What raycv's console keeps of the lines Ray's processes print (pipelines.logs)."""

from __future__ import annotations

from pipelines import logs

PREEMPTION_LINE = ("[2026-12-02 13:40:03,768 E 6178 6207] core_worker.cc:2465: Actor with class name: "
                   "'PreemptionWatcher' and ID: 'd1f1' has constructor arguments in the object store and "
                   "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
                   "restart will fail.")
SHUTDOWN_TRACEBACK = [
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f143ba4e480>",
    "Traceback (most recent call last):",
    '  File "/lib/python3.11/_weakrefset.py", line 39, in _remove',
    '  File "/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
    "SystemExit: 1",
]


def test_known_noise_is_dropped_and_the_rest_kept():
    epoch = "epoch 1/2 train_loss=1.43 val_acc=0.64"
    assert logs.worth_showing([PREEMPTION_LINE, epoch]) == [epoch]
    assert logs.worth_showing(["Detected that the Ray Train controller actor (9b7b) is dead. Cleaning up placement "
                               "group = [PlacementGroupID(b289)]"]) == []


def test_the_shutdown_traceback_is_dropped_but_not_other_tracebacks():
    assert logs.worth_showing(SHUTDOWN_TRACEBACK) == []
    failure = ["Traceback (most recent call last):", '  File "task.py", line 3, in decode', "ValueError: bad"]
    assert logs.worth_showing(failure) == failure
    assert logs.worth_showing(["Exception ignored in: <generator>", "Traceback (most recent call last):",
                               "KeyError: 1"])[0] == "Exception ignored in: <generator>"


def test_the_filter_wraps_rays_log_printer_once(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data["lines"]))])
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    logs.filter_process_output()
    logs.filter_process_output()
    assert len(dispatcher.handlers) == 1
    dispatcher.emit({"lines": [PREEMPTION_LINE, "kept"], "pid": 1})
    dispatcher.emit({"lines": [PREEMPTION_LINE], "pid": 1})
    assert printed == [["kept"]]
