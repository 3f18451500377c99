"""``raycv demo`` / ``make demo``: every workload once on the demo data, then one small sweep and a summary table.

The steps are ordinary ``raycv train`` / ``raycv tune`` runs with a few overrides that keep the whole demo within
about 10 minutes on 2 CPU cores; the same commands (without the overrides) are what a user runs on real data.
Hotdog runs three times to show d2l's fine-tuning comparison offline: a ResNet-18 first learns the demo's larger
``hotdog-source`` dataset (the stand-in for ImageNet pretraining), then hot dogs are learnt from those weights and,
for comparison, from scratch, with equal epochs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipelines.config import load_config
from pipelines.datasets import make_demo
from pipelines.report import format_table, ui_command
from pipelines.tracking import LATEST_ALIAS, run_url

log = logging.getLogger(__name__)

#: Small, CPU-friendly hotdog inputs (d2l: 224 crops of images resized to 256).
#: The demo's 160 hot dog training images give 10 steps per epoch at batch 16; crops keep at least 40% of the
#: image so that the food (which decides the class) stays in view.
HOTDOG_CPU = ["augment.size=64", "augment.resize_size=72", "augment.crop_scale=[0.4, 1.0]", "data.batch_size=16"]
#: Hotdog's runs of a few epochs end on small learning-rate steps, so the last epoch (the one reported) is not a
#: noisy jump: with a constant lr hotdog-source once fell from 0.73 to 0.27 val_acc in its last epoch. (cifar10,
#: banana and voc are still far from converged in their few epochs and keep d2l's constant lr: cosine over one
#: epoch fewer left banana at 0.46 mAP and voc at 0.54 mIoU instead of ~0.77 and ~0.73.)
COSINE = "optim.schedule=cosine"
#: A single worker computes on every core: it reserves one CPU (Ray Data keeps the other), but the decoded data is
#: cached, so Ray Data's augment tasks leave that CPU mostly idle. Measured: banana 79 -> 105 examples/sec; CIFAR
#: 1.50x side by side in benchmarks/bench_train.py.
ALL_CORES = "scaling.torch_threads={cpus}"


@dataclass
class DemoStep:
    """One run of the demo: ``kind`` "train", "tune" or "style" of ``task`` with config overrides.

    ``overrides`` may name an earlier step's MLflow run as ``{run:<step name>}`` and the CPU count of the Ray
    cluster's largest node (where a single worker may run) as ``{cpus}``.
    """

    name: str
    task: str
    overrides: list[str] = field(default_factory=list)
    kind: str = "train"
    sweep: dict[str, Any] = field(default_factory=dict)


DEMO_STEPS: list[DemoStep] = [
    DemoStep("cifar10", "cifar10", ["train.epochs=3", "scaling.workers=2", "data.batch_size=64"]),
    DemoStep("hotdog-source", "hotdog", [*HOTDOG_CPU, COSINE, ALL_CORES, "data.dataset=hotdog-source",
                                         "model.weights=scratch", "data.batch_size=64", "optim.name=adam",
                                         "optim.lr=0.002", "train.epochs=5"]),
    # Two epochs each: the head start of fine-tuning shows in the first epochs; by the third, scratch training often
    # catches up on 160 synthetic images (epoch 2 favoured fine-tuning in 3 of 3 runs, epoch 3 in 2 of 3).
    DemoStep("hotdog-finetuned", "hotdog", [*HOTDOG_CPU, COSINE, ALL_CORES,
                                            "model.weights=runs:/{run:hotdog-source}/model", "train.epochs=2"]),
    DemoStep("hotdog-scratch", "hotdog", [*HOTDOG_CPU, COSINE, ALL_CORES, "model.weights=scratch", "train.epochs=2"]),
    DemoStep("banana", "banana", [ALL_CORES, "train.epochs=6"]),
    DemoStep("voc", "voc", [ALL_CORES, "train.epochs=6"]),
    # 3 pairs x 0.66 CPU: all three at once on 2 cores (one thread each) rather than two and then one.
    DemoStep("style", "style", ["style.steps=150", "style.size=[96, 144]", "style.log_every=50",
                                "scaling.cpus_per_worker=0.66"], kind="style"),
    # Workers of 0.49 CPU: two trials (and their 0.01-CPU trial functions) fit beside Ray Data's CPU on 2 cores.
    DemoStep("sweep-hotdog", "hotdog", [*HOTDOG_CPU, COSINE, "model.weights=runs:/{run:hotdog-source}/model",
                                        "train.epochs=2", "scaling.cpus_per_worker=0.49"],
             kind="tune", sweep={"num_samples": 3, "scheduler": "asha", "max_concurrent": 2}),
]


@dataclass
class StepResult:
    name: str
    run_id: str
    experiment_id: str
    metric: str
    value: float
    examples_per_sec: float
    wall_seconds: float


def _resolve(overrides: list[str], runs: dict[str, str], cpus: int) -> list[str]:
    """``overrides`` with ``{run:<step>}`` replaced by that step's MLflow run id and ``{cpus}`` by ``cpus``."""
    resolved = []
    for item in overrides:
        for name, run_id in runs.items():
            item = item.replace(f"{{run:{name}}}", run_id)
        resolved.append(item.replace("{cpus}", str(cpus)))
    return resolved


def _train(step: DemoStep, cfg: dict, tracking_uri: str) -> StepResult:
    from cvtasks.tasks import get_task
    from pipelines.train import run_training

    outcome = run_training(cfg, tracking_uri, run_tags={"raycv.demo_step": step.name},
                           register_alias=LATEST_ALIAS, run_name=f"demo-{step.name}")
    metric = get_task(step.task).metric
    return StepResult(step.name, outcome.run_id, outcome.experiment_id, metric, outcome.metrics.get(metric, 0.0),
                      outcome.metrics.get("examples_per_sec", 0.0), outcome.wall_seconds)


def _tune(step: DemoStep, cfg: dict, tracking_uri: str) -> StepResult:
    from mlflow.tracking import MlflowClient

    from cvtasks.tasks import get_task
    from pipelines.tune import run_sweep

    outcome = run_sweep(cfg, tracking_uri, **step.sweep)
    metric = get_task(step.task).metric
    experiment_id = MlflowClient(tracking_uri).get_run(outcome.parent_run_id).info.experiment_id
    return StepResult(f"{step.name} ({len(outcome.trials)} trials)", outcome.parent_run_id, experiment_id,
                      f"best {metric}", outcome.best_metric, float("nan"), outcome.wall_seconds)


def _style(step: DemoStep, cfg: dict, tracking_uri: str) -> StepResult:
    """All configured content/style pairs in parallel; the row reports the first pair (with the others' count)."""
    from pipelines.style import load_pairs, run_pairs

    outcomes = run_pairs(cfg, load_pairs(cfg), tracking_uri, Path("outputs") / "style")
    failed = [o for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"style transfer failed for {failed[0].content} + {failed[0].style}: {failed[0].error}")
    first = outcomes[0]
    return StepResult(f"{step.name} ({len(outcomes)} pairs)", first.run_id, first.experiment_id,
                      "style_reduction", first.metrics.get("style_reduction", float("nan")), float("nan"),
                      max(o.wall_seconds for o in outcomes))


RUNNERS: dict[str, Callable[[DemoStep, dict, str], StepResult]] = {"train": _train, "tune": _tune, "style": _style}


def _largest_node_cpus() -> int:
    return max(1, *(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]))


def run_demo(root: str | Path, tracking_uri: str, only: list[str] | None = None) -> list[StepResult]:
    """Write (or reuse) the demo data, run the demo steps, print the summary table and the MLflow UI command."""
    started = time.perf_counter()
    steps = [s for s in DEMO_STEPS if not only or s.name in only]
    if only and len(steps) != len(set(only)):
        known = ", ".join(s.name for s in DEMO_STEPS)
        raise ValueError(f"unknown demo step(s) in {only}; known: {known}")
    print(f"raycv demo: writing or reusing demo datasets under {root}", flush=True)
    make_demo(root)
    cpus = _largest_node_cpus()
    runs: dict[str, str] = {}
    results = []
    for i, step in enumerate(steps, 1):
        print(f"\n[{i}/{len(steps)}] {step.kind} {step.name} ...", flush=True)
        overrides = [f"data.root={root}", *_resolve(step.overrides, runs, cpus)]
        result = RUNNERS[step.kind](step, load_config(step.task, overrides=overrides), tracking_uri)
        runs[step.name] = result.run_id
        results.append(result)
        print(f"[{i}/{len(steps)}] {step.name}: {result.metric} = {result.value:.3f} "
              f"({result.wall_seconds:.0f} s) {run_url(tracking_uri, result.experiment_id, result.run_id)}",
              flush=True)
    print_results(results, tracking_uri, time.perf_counter() - started)
    return results


def print_results(results: list[StepResult], tracking_uri: str, wall_seconds: float) -> None:
    rows = [[r.name, r.run_id, r.metric, r.value, r.examples_per_sec, r.wall_seconds] for r in results]
    print()
    print(format_table(["step", "mlflow run", "metric", "value", "examples/sec", "wall s"], rows))
    print(f"\ndemo finished in {wall_seconds / 60:.1f} min")
    print(f"MLflow UI: {ui_command(tracking_uri)}")
