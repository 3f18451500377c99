"""``raycv demo`` / ``make demo``: every workload once on the demo data, then one small sweep and a summary table.

The steps are the ones each task declares (``demo_steps`` on its class): ordinary ``raycv train`` / ``raycv tune``
runs with a few overrides that keep the whole demo within about 10 minutes on 2 CPU cores; the same commands
(without the overrides) are what a user runs on real data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import ray

from cvtasks.catalog import DemoStep
from cvtasks.settings import TaskConfig
from cvtasks.tasks import task_class, task_names
from pipelines.config import load_config
from pipelines.data_commands import make_demo
from pipelines.interrupts import RunInterrupted
from pipelines.report import format_table, ui_command
from pipelines.runners import DemoRow, runner_for
from pipelines.tracking import run_url

log = logging.getLogger(__name__)

def demo_steps() -> list[DemoStep]:
    """Every registered task's declared demo steps: the runs in registry order, then the sweeps."""
    steps = [step for name in task_names() for step in task_class(name).demo_steps]
    return [s for s in steps if s.kind != "tune"] + [s for s in steps if s.kind == "tune"]


def _resolve(overrides: Sequence[str], runs: dict[str, str], cpus: int) -> list[str]:
    """``overrides`` with ``{run:<step>}`` replaced by that step's MLflow run id and ``{cpus}`` by ``cpus``."""
    resolved = []
    for item in overrides:
        for name, run_id in runs.items():
            item = item.replace(f"{{run:{name}}}", run_id)
        resolved.append(item.replace("{cpus}", str(cpus)))
    return resolved


def _tune(step: DemoStep, cfg: TaskConfig, tracking_uri: str) -> DemoRow:
    from mlflow.tracking import MlflowClient

    from pipelines.tune import run_sweep

    outcome = run_sweep(cfg, tracking_uri, **step.sweep)
    experiment_id = MlflowClient(tracking_uri).get_run(outcome.parent_run_id).info.experiment_id
    return DemoRow(f"{step.name} ({len(outcome.trials)} trials)", outcome.parent_run_id, experiment_id,
                   f"best {outcome.metric}", outcome.best_metric, float("nan"), outcome.wall_seconds)


def run_step(step: DemoStep, cfg: TaskConfig, tracking_uri: str) -> DemoRow:
    """A "tune" step is a sweep; any other runs through the runner its task declares."""
    if step.kind == "tune":
        return _tune(step, cfg, tracking_uri)
    return runner_for(step.task).demo(step.name, cfg, tracking_uri)


def _largest_node_cpus() -> int:
    return max(1, *(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]))


def selected_steps(only: list[str] | None = None) -> list[DemoStep]:
    """The demo steps named in ``only`` (all without it), in demo order; ValueError naming any unknown name."""
    declared = demo_steps()
    unknown = sorted(set(only or ()) - {s.name for s in declared})
    if unknown:
        raise ValueError(f"unknown demo step(s) {', '.join(unknown)}; known: {', '.join(s.name for s in declared)}")
    return [s for s in declared if not only or s.name in only]


def run_demo(root: str | Path, tracking_uri: str, steps: list[DemoStep]) -> list[DemoRow]:
    """Write (or reuse) the demo data, run ``steps`` (:func:`selected_steps`), print the summary table and the MLflow
    UI command."""
    started = time.perf_counter()
    print(f"raycv demo: writing or reusing demo datasets under {root}", flush=True)
    make_demo(root)
    cpus = _largest_node_cpus()
    runs: dict[str, str] = {}
    results = []
    for i, step in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {step.kind} {step.name} ...", flush=True)
        overrides = [f"data.root={root}", *_resolve(step.overrides, runs, cpus)]
        try:
            result = run_step(step, load_config(step.task, overrides=overrides), tracking_uri)
        except RunInterrupted as stopped:
            raise RunInterrupted(stopped.signal_number, f"demo step {i} of {len(steps)} ({step.name}) {stopped}; "
                                 "`raycv demo` starts over, reusing the demo data") from None
        runs[step.name] = result.run_id
        results.append(result)
        print(f"[{i}/{len(steps)}] {step.name}: {result.metric} = {result.value:.3f} "
              f"({result.wall_seconds:.0f} s) {run_url(tracking_uri, result.experiment_id, result.run_id)}",
              flush=True)
    print_results(results, tracking_uri, time.perf_counter() - started)
    return results


def print_results(results: list[DemoRow], tracking_uri: str, wall_seconds: float) -> None:
    rows = [[r.name, r.run_id, r.metric, r.value, r.examples_per_sec, r.wall_seconds] for r in results]
    print()
    print(format_table(["step", "mlflow run", "metric", "value", "examples/sec", "wall s"], rows))
    print(f"\ndemo finished in {wall_seconds / 60:.1f} min")
    print(f"MLflow UI: {ui_command(tracking_uri)}")
