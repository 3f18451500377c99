"""Waiting, in the tests, for a run that a command or a Ray job is training to log its first epoch."""

from __future__ import annotations

import time
from collections.abc import Callable

from mlflow.tracking import MlflowClient


def first_run_with_metric(client: MlflowClient, experiment: str, metric: str, ended: Callable[[], str | None],
                          since_ms: int = 0, timeout: float = 300) -> str:
    """The run id of the first run in ``experiment`` started at or after ``since_ms`` that has logged ``metric``.

    Polls until there is one; ``ended()`` says whether what trains it stopped first: None while it runs, else the
    end of its output, which the failure shows.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = ended()
        assert output is None, output
        found = client.get_experiment_by_name(experiment)  # created by the run itself where it is the first
        runs = client.search_runs([found.experiment_id], f"attributes.start_time >= {since_ms}") if found else []
        for run in runs:
            if client.get_metric_history(run.info.run_id, metric):
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no {metric} logged in {experiment} within {timeout} s")
