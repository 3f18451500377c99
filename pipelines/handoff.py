"""What the driver hands Ray Train: the workers' entry point, the weights' object-store reference and the
controller's fail-fast callback, in a module that imports neither torch, torchvision nor MLflow.

Ray Train's controller and Ray Data's coordinator actors unpickle the trainer (its loop function, config and
callbacks) and the datasets' map functions without running them, and every module those pickles name is imported
there first. ``pipelines.loop``'s imports alone take ~16 s of CPU on a 2-core machine, so a loop function, a config
value or a callback from a heavy module costs each of those processes seconds before the first step. Only the
workers import the training loop; the Ray Data map functions (``pipelines.data``) likewise name their task by
import path instead of carrying the task object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import UserCallback

from pipelines import failures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWeights:
    """A state dict in the Ray object store and where it came from (shown as the MLflow tag ``raycv.weights``)."""

    ref: ray.ObjectRef
    description: str


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: :func:`pipelines.loop.train_loop_per_worker`, imported where it runs (after the
    augment workers start warming up: :func:`pipelines.data.warm_augment_workers`)."""
    from pipelines.data import warm_augment_workers

    warm_augment_workers(config["task"], config["cfg"])
    from pipelines.loop import train_loop_per_worker as train_loop

    train_loop(config)


class FailFastCallback(UserCallback):
    """Ends a Ray Train run at a worker's :class:`~pipelines.failures.DeterministicError` instead of retrying it.

    Ray Train 2.60 retries every worker error up to ``FailureConfig.max_failures`` and has no per-error policy, but
    it does not retry an error raised by a controller callback (a ``ControllerError``): raising here ends the run
    after its first attempt, and ``fit`` raises a ``ControllerError`` carrying this error.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, failures.DeterministicError):
                log.error("worker %d: %s (not retried: every attempt would fail the same way)", rank, error)
                raise error
