"""How a task runs, by the runner it declares (``Workload.runner``): ``raycv train``, a demo step, a sweep's plan.

Two runners exist: "train" (Ray Train over a Ray Data stream, here) and "stylize" (one optimised image per Ray task,
:mod:`pipelines.style_runner`). The CLI, the demo and Tune ask :func:`runner_for` and never look at a task's name.
This module imports nothing heavy, so the CLI can build its parser without torch or Ray.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import psutil

from cvtasks.settings import TaskConfig
from cvtasks.tasks import get_task, task_class, task_names

if TYPE_CHECKING:
    from pipelines.sweep_plan import SweepPlan

#: runner name -> "module:Class" (constructed without arguments)
RUNNERS: dict[str, str] = {
    "train": "pipelines.runners:TrainRunner",
    "stylize": "pipelines.style_runner:StyleRunner",
}


#: Files for people (stylised images) go under OUTPUT_DIR/<task>.
OUTPUT_DIR = "outputs"


@dataclass(frozen=True)
class RunRequest:
    """What ``raycv train`` asked for besides the config."""

    tracking_uri: str
    address: str | None = None
    storage: str | None = None
    resume: str | None = None  # a run id or "latest"
    epochs_given: bool = False  # --epochs on the command line
    output_dir: str = OUTPUT_DIR  # a task's files for people go under <output_dir>/<task>


@dataclass
class DemoRow:
    """One row of the demo's summary table."""

    name: str
    run_id: str
    experiment_id: str
    metric: str
    value: float
    examples_per_sec: float
    wall_seconds: float


class Runner(Protocol):
    def preflight(self, cfg: TaskConfig, tracking_uri: str) -> None:
        """Every check that needs no Ray, run before Ray starts: bad input fails in seconds, in one line."""

    def train(self, cfg: TaskConfig, request: RunRequest) -> int:
        """``raycv train``: run ``cfg`` and print what ran and where to see it; returns the exit status."""

    def demo(self, step: str, cfg: TaskConfig, tracking_uri: str) -> DemoRow:
        """One ``raycv demo`` step: run ``cfg`` tracked as the demo step ``step``."""

    def sweep_plan(self, cfg: TaskConfig) -> SweepPlan:
        """What each trial of ``raycv tune`` runs and how trials are ranked."""


def runner_for(task_name: str) -> Runner:
    """The runner task ``task_name`` declares."""
    runner = get_task(task_name).runner
    if runner not in RUNNERS:
        raise ValueError(f'task {task_name!r} declares runner "{runner}"; known: {", ".join(sorted(RUNNERS))}')
    module, name = RUNNERS[runner].split(":")
    return getattr(importlib.import_module(module), name)()


def tasks_run_by(runner: str) -> list[str]:
    """The registered tasks that declare ``runner``."""
    return [name for name in task_names() if task_class(name).runner == runner]


class TrainRunner:
    """Ray Train: ``run_training`` over the task's Ray Data pipelines, tracked in MLflow."""

    def preflight(self, cfg: TaskConfig, tracking_uri: str) -> None:
        from pipelines.train import preflight

        preflight(cfg, tracking_uri)

    def train(self, cfg: TaskConfig, request: RunRequest) -> int:
        from mlflow.tracking import MlflowClient

        from pipelines.cluster import connect
        from pipelines.data import task_path, warm_map_workers
        from pipelines.interrupts import stop_signals_raise
        from pipelines.report import print_summary, seconds_line
        from pipelines.tracking import LATEST_ALIAS, registered_name
        from pipelines.train import resume_run_id, run_training

        task = cfg.task
        resume = resume_run_id(MlflowClient(request.tracking_uri), task, request.resume) if request.resume else None
        started = time.perf_counter()
        phases = {"start-up": time.time() - psutil.Process().create_time()}  # the interpreter and imports so far
        self.preflight(cfg, request.tracking_uri)
        phases["checks"] = time.perf_counter() - started
        connect(request.address)
        with stop_signals_raise():  # over Ray's own SIGTERM handler, set by connect: it exits 15 without a word
            warm_map_workers(task_path(get_task(task)))
            phases["Ray"] = time.perf_counter() - started - phases["checks"]
            outcome = run_training(cfg, request.tracking_uri, resume=resume, storage=request.storage,
                                   register_alias=LATEST_ALIAS, stop_signals=True)
            print_summary([(task, outcome)], request.tracking_uri, metric_key=None)
            print(seconds_line({**phases, **outcome.phases}))
            if outcome.registered_version:
                print(f"registered as {registered_name(task)} version {outcome.registered_version} (alias "
                      f"'{LATEST_ALIAS}'): raycv predict {task} IMAGE... uses it")
        return 0

    def demo(self, step: str, cfg: TaskConfig, tracking_uri: str) -> DemoRow:
        from pipelines.tracking import LATEST_ALIAS
        from pipelines.train import run_training

        outcome = run_training(cfg, tracking_uri, run_tags={"raycv.demo_step": step}, register_alias=LATEST_ALIAS,
                               run_name=f"demo-{step}", stop_signals=True)
        metric = get_task(cfg.task).metric
        return DemoRow(step, outcome.run_id, outcome.experiment_id, metric, outcome.metrics.get(metric, 0.0),
                       outcome.metrics.get("examples_per_sec", 0.0), outcome.wall_seconds)

    def sweep_plan(self, cfg: TaskConfig) -> SweepPlan:
        from pipelines.tune import train_sweep_plan

        return train_sweep_plan(cfg)
