"""What a sweep runs per trial, as each runner plans it (:mod:`pipelines.runners`), and each trial's config.

Its own module, with no Ray import, so that a runner can make its plan without importing pipelines.tune, which
imports the runners.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from cvtasks.settings import ScalingSection, TaskConfig
from pipelines.config import set_path


@dataclass(frozen=True)
class SweepPlan:
    """What each trial runs and how trials are ranked; each runner (:mod:`pipelines.runners`) makes its own. Ray
    Train tasks: ``pipelines.tune.sweep_trial``, ``task.metric`` maximised, one report per epoch."""

    #: (Tune config, base=config dict, task_path=..., **shared) -> None
    trainable: Callable[..., None]
    resources: dict[str, float]  # what each trial function itself holds
    metric: str
    mode: str  # "max" or "min"
    max_t: int  # ASHA's budget in reports: at least those of a trial that runs to its end
    full_reports: int  # reports of a trial that runs to its end (the sweep's console lines say "N of full_reports")
    register_model: bool  # whether trials log a model for the Model Registry
    #: extra artifacts on the parent run: (client, parent_run_id, trial rows, searched config paths)
    log_extras: Callable[[MlflowClient, str, list[dict[str, Any]], list[str]], None] | None = None
    #: the ``scaling`` config of the Train workers each trial starts outside ``resources`` (Tune does not see them)
    train_scaling: ScalingSection | None = None
    #: (config, tracking URI) -> keyword arguments resolved once on the driver for every trial (tune.with_parameters)
    shared: Callable[[TaskConfig, str], dict[str, Any]] | None = None
    #: the base config with what trials would read from the dataset resolved on the driver (trials run on any node)
    resolve: Callable[[TaskConfig], TaskConfig] = lambda cfg: cfg
    #: what one of a trial's reports to Tune stands for, in the sweep's console lines
    report_unit: str = "epoch"


def trial_config(base: dict[str, Any], task_path: str, sampled: dict[str, Any]) -> TaskConfig:
    """A trial's typed config: the sweep's ``base`` config dict (of the task at ``task_path``) with the trial's
    ``sampled`` values set at their dotted paths (checked like overrides)."""
    raw = copy.deepcopy(base)
    for path, value in sampled.items():
        set_path(raw, path, value)
    return TaskConfig(raw, task_path)
