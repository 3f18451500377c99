"""Ray Tune sweeps: every trial is a full distributed Ray Train run, tracked as a child of one MLflow parent run.

Composition as Ray 2.60 documents it for Train V2: the Tune trainable is a small driver function that builds a
``TorchTrainer`` (through ``run_training``) with ``TuneReportCallback``, so ASHA sees each epoch's validation
metric and can stop weak trials early. Tune needs each trial function to hold some CPU (0 is refused); it only
drives, so it asks for a sliver and the trial's Train workers request the real resources.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from cvtasks import storage as storage_paths
from cvtasks.settings import ScalingSection, TaskConfig
from cvtasks.tasks import get_task
from pipelines import failures, logs, plots, tracking
from pipelines.cluster import quiet_data_context
from pipelines.config import ConfigError, get_path
from pipelines.handoff import ResolvedWeights
from pipelines.interrupts import RunInterrupted, stop_signals_stop_tune
from pipelines.runners import runner_for
from pipelines.sweep_plan import SweepPlan, trial_config
from pipelines.train import (
    cpus_for_training,
    default_storage,
    run_training,
    with_absolute_data_root,
    worker_cpus,
)
from pipelines.weights import put_weights

log = logging.getLogger(__name__)

#: CPU share the trial's driver function holds (it only drives its TorchTrainer; Tune refuses 0).
TRIAL_DRIVER_CPUS = 0.01
DISTRIBUTIONS = {
    "loguniform": tune.loguniform,
    "uniform": tune.uniform,
    "choice": tune.choice,
    "grid": tune.grid_search,
    "randint": tune.randint,
}
#: Parent-run tag listing the trials that failed: "<trial id>: <error>" lines.
FAILED_TRIALS_TAG = "raycv.failed_trials"
TAG_MAX_CHARS = 8000  # MLflow's limit on a tag value


def search_space(cfg: TaskConfig) -> dict[str, Any]:
    """The task config's ``search:`` section as Tune distributions keyed by dotted config path."""
    space = {}
    for path, spec in (cfg.raw.get("search") or {}).items():
        try:
            get_path(cfg.raw, path)
        except (KeyError, TypeError):
            raise ConfigError(f"search: {path!r} is not a key of the {cfg.task} config") from None
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(f"search.{path}: expected one of {sorted(DISTRIBUTIONS)} -> args, got {spec!r}")
        kind, args = next(iter(spec.items()))
        space[path] = DISTRIBUTIONS[kind](args) if kind in ("choice", "grid") else DISTRIBUTIONS[kind](*args)
    if not space:
        raise ConfigError(f"the {cfg.task} config has no search: section to sweep over")
    return space


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialLines(tune.Callback):
    """One console line per trial as it starts (its sampled values), ends (its last metric, at which of its reports:
    fewer than a full run's when the scheduler stopped it) or fails: what raycv shows of a sweep instead of Tune's
    status tables, which ``-v`` brings back."""

    def __init__(self, metric: str, max_reports: int, report_unit: str) -> None:
        self.metric, self.max_reports, self.report_unit = metric, max_reports, report_unit

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        sampled = ", ".join(f"{path}={_short(value)}" for path, value in trial.config["sampled"].items())
        log.info("trial %s started: %s", trial.trial_id, sampled)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        log.info("trial %s ended at %s %d of %d: %s=%s", trial.trial_id, self.report_unit,
                 result.get("training_iteration", 0), self.max_reports, self.metric,
                 _short(result.get(self.metric, float("nan"))))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning("trial %s failed (the sweep's summary has its error)", trial.trial_id)


def make_scheduler(name: str, max_epochs: int) -> TrialScheduler:
    if name == "asha":
        # Rungs at epochs 1, 2, 4, ...: a trial in the bottom half of its rung stops there.
        return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=1, reduction_factor=2)
    if name == "fifo":
        return FIFOScheduler()
    raise ValueError(f'Unknown scheduler "{name}": use asha or fifo')


def sweep_trial(config: dict[str, Any], base: dict[str, Any], task_path: str,
                weights: ResolvedWeights | None = None) -> None:
    """Tune trainable: one sampled config -> one TorchTrainer run, logged as a child MLflow run.

    A restored sweep calls this again for unfinished trials: the child run is found by trial id and resumed from
    its Ray Train checkpoint rather than started over. ``base``, ``task_path``: the sweep's config (see
    :func:`~pipelines.sweep_plan.trial_config`); ``weights``: ``model.weights`` as the sweep's driver read it.
    """
    context = tune.get_context()
    trial_id = context.get_trial_id()
    client = MlflowClient(config["tracking_uri"])
    quiet_data_context()  # this trial's driver builds the run's Ray Data pipelines
    cfg = trial_config(base, task_path, config["sampled"])
    existing = tracking.find_child_run(client, config["parent_run_id"], trial_id)
    tags = {"raycv.kind": "trial", "raycv.trial_id": trial_id, "raycv.trial_name": context.get_trial_name()}
    run_training(
        cfg, config["tracking_uri"], resume=existing, storage=config["storage"],
        run_tags=tags, parent_run_id=config["parent_run_id"], callbacks=[TuneReportCallback()],
        held_cpus=config["held_cpus"], weights=weights, run_name=f"{cfg.task}-{context.get_trial_name()}",
        concurrent_runs=config.get("concurrent_runs", 1),  # absent from sweeps started before it was added
    )


def shared_weights(cfg: TaskConfig, tracking_uri: str) -> dict[str, Any]:
    """``model.weights`` read once on the sweep's driver for every trial: a trial may run on a node without the
    weights file or torch hub cache (unless the search space varies the weights, then each trial reads its own)."""
    if "model.weights" in (cfg.raw.get("search") or {}):
        return {}
    return {"weights": put_weights(cfg, tracking_uri)}


def train_sweep_plan(cfg: TaskConfig) -> SweepPlan:
    """The plan of a Ray Train task. Trials get ASHA budget ``epochs + 1``: a trial reaching ASHA's ``max_t`` is
    stopped at once, which would cut off its last epoch's model logging; the rungs stay the same."""
    task = get_task(cfg.task)
    return SweepPlan(trainable=sweep_trial, resources={"CPU": TRIAL_DRIVER_CPUS}, metric=task.metric,
                     mode=task.metric_mode, max_t=cfg.train.epochs + 1, full_reports=cfg.train.epochs,
                     register_model=True, train_scaling=cfg.scaling, shared=shared_weights,
                     resolve=task.resolve_for_workers)


def fitting_concurrency(requested: int, train_scaling: ScalingSection | None, cluster_cpus: float,
                        driver_cpus: float = TRIAL_DRIVER_CPUS) -> int:
    """``requested`` concurrent trials, lowered to what the cluster fits with one CPU left for Ray Data.

    Tune only sees each trial function's ``driver_cpus``, not the Train workers it starts: past this limit the
    trials' worker groups wait for each other's CPUs and the sweep stalls instead of queueing. The trial functions'
    own CPUs are counted for all ``requested`` trials (a bound: fewer run when the cap applies).
    """
    if not train_scaling:
        return requested
    held = requested * driver_cpus
    workers = train_scaling.workers
    trial_worker_cpus = workers * worker_cpus(train_scaling.cpus_per_worker, workers, cluster_cpus, held)
    fits = max(1, math.floor(cpus_for_training(cluster_cpus, held) / trial_worker_cpus + 1e-9))
    if requested > fits:
        log.warning("--max-concurrent %d: each trial's workers hold %g CPU on this %g-CPU cluster; running %d at a "
                    "time", requested, trial_worker_cpus, cluster_cpus, fits)
        return fits
    return requested


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_path: str
    best_config: dict[str, Any]
    best_metric: float
    best_run_id: str | None
    registered_version: str | None
    trials: list[dict[str, Any]]
    wall_seconds: float
    metric: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # trial id -> its error, one line


def run_sweep(
    cfg: TaskConfig, tracking_uri: str, num_samples: int, scheduler: str = "asha", max_concurrent: int = 1,
    resume: str | None = None, storage: str | None = None,
) -> SweepOutcome:
    """Run (or with ``resume``, a path printed by an earlier sweep, continue) a sweep over ``cfg["search"]``."""
    started = time.perf_counter()
    plan = runner_for(cfg.task).sweep_plan(cfg)
    client = MlflowClient(tracking_uri)
    storage = storage or default_storage()
    space = search_space(cfg)
    if resume:
        experiment_path = storage_paths.absolute(resume).rstrip("/")
        parent_run_id = tracking.find_sweep_run(client, cfg.task, experiment_path)
        if parent_run_id is None:
            raise ValueError(f"--resume: no MLflow sweep run records the Tune experiment {experiment_path}")
        client.update_run(parent_run_id, status="RUNNING")
    else:
        parent_run_id = tracking.create_run(client, cfg.task, cfg, run_name=tracking.run_name(cfg.task, "sweep"),
                                            tags={"raycv.kind": "sweep", "raycv.metric": plan.metric})
        experiment_path = f"{storage}/sweep-{cfg.task}-{parent_run_id[:12]}"
        tracking.set_tags(client, parent_run_id, {
            "raycv.sweep_path": experiment_path, "raycv.scheduler": scheduler,
            "raycv.num_samples": str(num_samples),
        })
        client.log_dict(parent_run_id, cfg.raw["search"], "search_space.yaml")
    log.info("sweep %s: MLflow parent run %s; resume with --resume %s", cfg.task, parent_run_id, experiment_path)

    # The base config reaches the trials beside their Tune config, not in it: Tune's console shows each trial's
    # config, which is then its sampled values only (and a restored sweep takes the base of the resuming command).
    base = {k: v for k, v in plan.resolve(with_absolute_data_root(cfg)).raw.items() if k != "search"}
    shared = plan.shared(cfg, tracking_uri) if plan.shared is not None else {}
    trainable = tune.with_parameters(plan.trainable, base=base, task_path=cfg.task_path, **shared)
    trainable = tune.with_resources(trainable, plan.resources)
    driver_cpus = plan.resources.get("CPU", 0.0)
    max_concurrent = fitting_concurrency(max_concurrent, plan.train_scaling,
                                         float(ray.cluster_resources().get("CPU", 0.0)), driver_cpus)
    param_space = {
        "sampled": space, "tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "storage": storage,
        # what the concurrent trial functions hold: each trial's workers leave Ray Data a whole CPU beside them
        "held_cpus": max_concurrent * driver_cpus,
        # trials starting together all see the same free object store: each caches in its share of the room
        "concurrent_runs": max_concurrent,
    }
    try:
        if resume:
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            storage_path, name = storage_paths.split_last(experiment_path)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=plan.metric, mode=plan.mode, num_samples=num_samples,
                    scheduler=make_scheduler(scheduler, plan.max_t), max_concurrent_trials=max_concurrent,
                ),
                # Tune's own status tables only with -v; else one line per trial start and end (TrialLines)
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path, verbose=2 if logs.verbose() else 0,
                    callbacks=[] if logs.verbose() else [TrialLines(plan.metric, plan.full_reports, plan.report_unit)]),
            )
        with stop_signals_stop_tune() as stop_signals:
            results = tuner.fit()
    except BaseException as error:  # a second stop signal ends the wait for Tune to save: RunInterrupted
        client.set_terminated(parent_run_id, status="KILLED" if isinstance(error, RunInterrupted) else "FAILED")
        raise
    outcome = _record_trials(client, plan, parent_run_id, experiment_path, results, space,
                             stopped=bool(stop_signals))
    if stop_signals:
        client.set_terminated(parent_run_id, status="KILLED")
        finished = sum(run.info.status == "FINISHED" for run in tracking.child_runs(client, parent_run_id))
        raise RunInterrupted(stop_signals[0], f"sweep stopped by {signal.Signals(stop_signals[0]).name} (finished "
                             f"trials: {finished}): MLflow parent run {parent_run_id} is marked KILLED",
                             resume=experiment_path)
    return _finish_sweep(client, outcome, started)


def _finish_sweep(client: MlflowClient, outcome: SweepOutcome, started: float) -> SweepOutcome:
    """End the parent run: FINISHED, or FAILED with a one-line error when every trial failed."""
    outcome.wall_seconds = time.perf_counter() - started
    client.log_metric(outcome.parent_run_id, "wall_seconds", outcome.wall_seconds)
    if outcome.trials and len(outcome.failed) == len(outcome.trials):
        client.set_terminated(outcome.parent_run_id, status="FAILED")
        trial_id, error = next(iter(outcome.failed.items()))
        raise failures.RunError(f"every trial of the sweep failed ({len(outcome.failed)}); the first, {trial_id}: "
                                f"{error}")
    client.set_terminated(outcome.parent_run_id, status="FINISHED")
    return outcome


def _record_trials(client: MlflowClient, plan: SweepPlan, parent_run_id: str, experiment_path: str,
                     results: Any, space: dict[str, Any], stopped: bool = False) -> SweepOutcome:
    """Log the sweep's table, plots and best config on the parent run; register the best trial's model.
    ``stopped``: a stop signal ended the sweep, leaving trials unfinished (those never started are left out)."""
    metric = plan.metric
    trials = []
    for result in results:
        if result.config is None:  # a trial that a stop signal kept from starting
            continue
        sampled = result.config["sampled"]
        reported = result.metrics or {}
        trial_id = reported.get("trial_id", "")
        child = tracking.find_child_run(client, parent_run_id, trial_id) if trial_id else None
        value = reported.get(metric, math.nan)
        epochs_done = reported.get("training_iteration", 0)
        trials.append({**sampled, metric: value, "epochs": epochs_done,
                       "error": failures.one_line(result.error) if result.error else "",
                       "run_id": child, "trial": trial_id})
    finite = [t for t in trials if isinstance(t[metric], float) and not math.isnan(t[metric])]
    best = (max if plan.mode == "max" else min)(finite, key=lambda t: t[metric]) if finite else None
    _close_child_runs(client, parent_run_id, trials, stopped)
    client.log_text(parent_run_id, _csv(trials), "trials.csv")
    failed = {t["trial"]: t["error"] for t in trials if t["error"]}
    if failed:
        log.warning("%d of %d trials failed: %s", len(failed), len(trials),
                    "; ".join(f"{k}: {v}" for k, v in failed.items()))
        tracking.set_tags(client, parent_run_id, {FAILED_TRIALS_TAG: _failed_lines(failed)})
    if best is not None:
        best_config = {k: best[k] for k in space}
        client.log_dict(parent_run_id, best_config, "best_config.yaml")
        client.log_metric(parent_run_id, f"best_{metric}", best[metric])
        tracking.set_tags(client, parent_run_id, {"raycv.best_run_id": str(best["run_id"])})
        client.log_image(parent_run_id, plots.metric_vs_params(trials, metric, list(space)),
                         artifact_file="plots/metric_vs_hyperparameters.png")
    if plan.log_extras is not None:
        plan.log_extras(client, parent_run_id, trials, list(space))
    version = None
    if best is not None and best["run_id"] and plan.register_model and not stopped:  # unfinished: no model yet
        task = client.get_run(parent_run_id).data.tags["raycv.task"]
        version = _register_if_better(client, task, best["run_id"], metric, best[metric], plan.mode)
    return SweepOutcome(
        parent_run_id=parent_run_id, experiment_path=experiment_path,
        best_config={k: best[k] for k in space} if best else {}, best_metric=best[metric] if best else math.nan,
        best_run_id=best["run_id"] if best else None, registered_version=version, trials=trials, wall_seconds=0.0,
        metric=metric, failed=failed,
    )


def _register_if_better(client: MlflowClient, task: str, run_id: str, metric: str, value: float,
                        mode: str) -> str | None:
    """Register the sweep winner and move alias ``best`` to it, unless the model ``best`` names now scored as well
    or better on ``metric``; returns the new version or None."""
    current = tracking.alias_metric(client, task, tracking.BEST_ALIAS, metric)
    if current is not None and not (value > current if mode == "max" else value < current):
        log.info("%s@%s keeps its model: %s %.4g, this sweep's best %.4g", tracking.registered_name(task),
                 tracking.BEST_ALIAS, metric, current, value)
        return None
    return tracking.register_model(client, task, run_id, tracking.BEST_ALIAS)


def _failed_lines(failed: dict[str, str]) -> str:
    """``FAILED_TRIALS_TAG``'s value, within MLflow's tag length limit."""
    text = "\n".join(f"{trial_id}: {error}" for trial_id, error in failed.items())
    return text[:TAG_MAX_CHARS]


def _close_child_runs(client: MlflowClient, parent_run_id: str, trials: list[dict[str, Any]],
                      stopped: bool = False) -> None:
    """End the child runs of trials the scheduler stopped: KILLED and tagged ``raycv.early_stopped``.

    A stopped trial is one Tune ended without an error whose run did not finish. Depending on timing its run is
    still RUNNING (the trial actor was killed outright) or already ended by ``run_training`` (Tune's stop reached
    the trial as ``SystemExit``); either way it is marked the same here. When a stop signal ended the sweep
    (``stopped``), such runs are KILLED untagged: the signal, not the scheduler, may have stopped them, and Tune's
    results do not say which.
    """
    ended_without_error = {t["run_id"] for t in trials if t["run_id"] and not t["error"]}
    for run in tracking.child_runs(client, parent_run_id):
        if run.info.status == "FINISHED":
            continue
        if run.info.run_id in ended_without_error:
            if not stopped:
                tracking.set_tags(client, run.info.run_id, {"raycv.early_stopped": "true"})
            client.set_terminated(run.info.run_id, status="KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED" if stopped else "FAILED")


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
