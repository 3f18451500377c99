"""Rank 0's MLflow side of a Ray Train run: epochs logged once across restarts, attempts counted, pictures, the
model as tensors, and MLflow's system metrics while it trains."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from cvtasks.classification import ClassificationTask
from cvtasks.tasks.base import Config, Task, TensorBatch
from pipelines import tracking
from pipelines.plots import learning_curves

log = logging.getLogger(__name__)

#: Seconds between samples of the system metrics (MLflow's default is 10 s).
SYSTEM_METRICS_SECONDS = 5.0
#: Validation inputs in the logged model's input example (one: a 224 px image is already ~1.5 MB of JSON).
EXAMPLE_ROWS = 1

#: MLflow tag: how often the worker group started for the run: above 1 after a restart (failure, --resume).
ATTEMPTS_TAG = "raycv.attempts"
#: MLflow tag: when (Unix time) rank 0 got its first training batch.
FIRST_STEP_TAG = "raycv.first_step_at"


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, rank: int, world: int, resumed: bool) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where present) of this worker's machine while it
    trains, under ``system/rank<N>/`` when there are several workers; a restarted attempt continues their steps.

    MLflow's monitor publishes only whole intervals and drops the samples of the one under way when it stops, so a
    run that trains for less than an interval (a 1-epoch demo-size run: under 5 s) would have none; the last, partial
    interval is published here after it stops.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, node_id=f"rank{rank}" if world > 1 else None, resume_logging=resumed,
                                   tracking_uri=tracking_uri, sampling_interval=SYSTEM_METRICS_SECONDS)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        last = monitor.aggregate_metrics()
        if last:
            monitor.publish_metrics(last)
            monitor.mlflow_logger.flush()


class RunLogger:
    """Rank 0's MLflow side of the loop; every method is a no-op on other ranks."""

    def __init__(self, tracking_uri: str, run_id: str, active: bool) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri) if active else None
        self.logged: set[int] = set()  # epochs the MLflow run already has

    def image(self, image: Any, path: str) -> None:
        if self.client:
            tracking.log_image(self.client, self.run_id, image, path)

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.client:
            return
        if epoch in self.logged:
            log.warning("epoch %d is already in MLflow run %s from an interrupted attempt: keeping its first values",
                        epoch, self.run_id)
            return
        tracking.log_epoch(self.client, self.run_id, epoch, metrics)

    def start(self, history: list[dict[str, float]]) -> None:
        """Replay the checkpoint's ``history`` (empty on a fresh start) and note the epochs the run has."""
        if self.client:
            self.logged = tracking.replay_history(self.client, self.run_id, history)

    def mark(self, tags: dict[str, str]) -> None:
        """Set ``tags`` (nothing counted)."""
        if self.client:
            tracking.set_tags(self.client, self.run_id, tags)

    def tags(self, tags: dict[str, str]) -> None:
        """Set ``tags`` and count this start of the worker group in ``raycv.attempts`` (1: no restart so far)."""
        if self.client:
            attempts = int(self.client.get_run(self.run_id).data.tags.get(ATTEMPTS_TAG, "0")) + 1
            tracking.set_tags(self.client, self.run_id, {**tags, ATTEMPTS_TAG: str(attempts)})
            if attempts > 1:
                log.info("attempt %d of MLflow run %s (restarted from its last checkpoint)", attempts, self.run_id)

    def finish(self, task: Task, model: nn.Module, cfg: Config, history: list[dict[str, float]],
               val_batch: TensorBatch | None, val_sums: dict[str, torch.Tensor]) -> None:
        if not self.client:
            return
        client = self.client
        client.log_image(self.run_id, learning_curves(history), artifact_file="plots/learning_curves.png")
        model.eval()
        if val_batch is not None:
            with torch.no_grad():
                client.log_image(self.run_id, task.render_predictions(model, val_batch, cfg),
                                 artifact_file="plots/val_predictions.png")
        for name, value in task.extra_artifacts(model, val_sums, cfg, val_batch).items():
            tracking.log_artifact_value(client, self.run_id, name, value)
        # Tensors only (never a pickled model): predict and model.weights rebuild it with the task's build_model.
        class_names = task.class_names(cfg) if isinstance(task, ClassificationTask) else None
        example, output = model_example(model, task, val_batch)
        tracking.log_model_state(client, self.run_id, model.state_dict(), class_names, example, output)


def model_example(model: nn.Module, task: Task, batch: TensorBatch | None,
                  rows: int = EXAMPLE_ROWS) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(a few model inputs of ``batch``, the model's output for them where it is one tensor) for the model's MLflow
    signature and input example; (None, None) without a batch."""
    if batch is None:
        return None, None
    inputs = batch[task.tensor_keys[0]][:rows]
    with torch.no_grad():
        output = model(inputs)
    return inputs.cpu().numpy(), output.float().cpu().numpy() if isinstance(output, torch.Tensor) else None
