"""Neural style transfer on Ray, tracked in MLflow (experiment ``raycv-style``).

Style transfer optimises one image, not a model over a dataset, so it has this small runner instead of Ray Train:

- ``run_pairs``: every content/style pair of the config is one Ray task (``scaling.cpus_per_worker`` CPUs,
  ``scaling.gpus_per_worker`` GPUs), all in parallel, each logging into its own MLflow run.
- ``style_trial``: the Ray Tune trainable of ``raycv tune style`` (``sweep_plan``, through the "stylize" runner of
  pipelines/style_runner.py, hooks it into pipelines/tune.py):
  one stylisation per sampled set of loss weights, reporting every ``style.log_every`` steps so ASHA can stop weak
  trials, ranked by ``ref_loss`` (unweighted losses under the fixed ``loss.ref_*`` weights; lower is better).

Per run MLflow gets the config as params, the loss curves every step, the image every K steps and at the end, both
inputs, and the tag ``raycv.weights`` saying which VGG-19 weights were used (random init is also warned about on the
console and in the run's description).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import ray
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image
from ray import tune

from cvtasks.models.vgg import VGGFeatures
from cvtasks.settings import TaskConfig
from cvtasks.style import (
    DEMO_PREFIX,
    StepResult,
    StyleConfig,
    contact_sheet,
    demo_specs,
    open_image,
    postprocess,
    preprocess,
    seeded_extractor,
    stylize,
)
from pipelines import logs, tracking
from pipelines.config import ConfigError
from pipelines.interrupts import RunInterrupted, fit_run
from pipelines.progress import StepProgress, console_style
from pipelines.report import format_table, ui_command
from pipelines.sweep_plan import SweepPlan, trial_config

log = logging.getLogger(__name__)

METRIC = "ref_loss"  # what sweeps minimise (the style task's declared metric)
IMAGES_DIR = "images"  # run artifacts: images/step_00050.png, ...
RESULT_FILE = "result.png"
INPUT_FILES = ("inputs/content.png", "inputs/style.png")  # both inputs as the optimisation sees them
_MLFLOW_MAX_METRICS = 1000  # per log_batch call
RANDOM_INIT_NOTE = ("**Random-init VGG-19 features**: no pretrained weights were used, so this result shows texture "
                    "statistics of random filters only. See tag raycv.weights.")


# ---------------------------------------------------------------------------------------------------- input pairs

def absolute_spec(spec: str) -> str:
    """A relative local path made absolute (Ray workers run in other folders); URIs and skimage: specs unchanged."""
    if spec.startswith(DEMO_PREFIX) or "://" in spec:
        return spec
    return str(Path(spec).expanduser().resolve())


def configured_pairs(cfg: TaskConfig) -> list[tuple[str, str]]:
    """``style.pairs`` as (content, style) specs with absolute local paths."""
    pairs = cfg.style.pairs
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ConfigError(f"style.pairs must be a non-empty list of [content, style] images, got {pairs!r}")
    return [(absolute_spec(str(content)), absolute_spec(str(style))) for content, style in pairs]


def cli_pairs(contents: Sequence[str], styles: Sequence[str], demo: bool) -> list[list[str]]:
    """Pairs from ``--content``/``--style`` (zipped; a single one on either side goes with each of the other) plus
    the demo pairs for ``--demo``."""
    if bool(contents) != bool(styles):
        raise ConfigError("give --content and --style together (or --demo)")
    if len(contents) != len(styles) and 1 not in (len(contents), len(styles)):
        raise ConfigError(f"{len(contents)} --content but {len(styles)} --style images: give equal numbers, or "
                          "one on either side to pair with each of the other")
    count = max(len(contents), len(styles))
    explicit = [[contents[i % len(contents)], styles[i % len(styles)]] for i in range(count)]
    return [list(pair) for pair in demo_specs()] * demo + explicit


def pair_name(content: str, style: str) -> str:
    """``chelsea-x-brick`` from the images' file stems or demo names."""
    def stem(spec: str) -> str:
        return Path(spec.removeprefix(DEMO_PREFIX)).stem
    return f"{stem(content)}-x-{stem(style)}"


# ------------------------------------------------------------------------------------------------------ one run

def open_run(client: MlflowClient, cfg: TaskConfig, content: str, style: str, tags: dict[str, str] | None = None,
             parent_run_id: str | None = None) -> str:
    """A new MLflow run in ``raycv-style`` for one pair: config as params, the pair as tags."""
    all_tags = {"raycv.kind": "stylize", "raycv.content": content, "raycv.style": style, **(tags or {})}
    return tracking.create_run(client, cfg.task, cfg, run_name=pair_name(content, style), tags=all_tags,
                               parent_run_id=parent_run_id)


def step_metrics(result: StepResult, cfg: StyleConfig, first_style: float) -> dict[str, float]:
    """MLflow/Tune metrics of one step: weighted ``*_loss`` (what was minimised), unweighted ``raw_*``, ``ref_loss``
    (raw terms under the fixed reference weights), ``style_reduction`` (raw style at step 1 / now) and ``lr``."""
    metrics = {f"{name}_loss": value for name, value in result.losses.items()}
    metrics |= {f"raw_{name}": value for name, value in result.terms.items()}
    metrics[METRIC] = float(cfg.reference.total(result.terms))
    metrics["style_reduction"] = first_style / max(result.terms["style"], 1e-30)
    metrics["lr"] = result.lr
    return metrics


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), _MLFLOW_MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i : i + _MLFLOW_MAX_METRICS])


def tracked_stylize(client: MlflowClient, run_id: str, cfg: TaskConfig, content_img: Image.Image,
                    style_img: Image.Image, device: str | torch.device = "cpu", extractor: VGGFeatures | None = None,
                    bar: StepProgress | None = None) -> Iterator[tuple[dict[str, float], Image.Image]]:
    """Stylise and log into MLflow run ``run_id``; yields (metrics with ``step``, image) every ``style.log_every``
    steps and at the last, after they are logged (metrics of every step are logged in batches). ``extractor``
    defaults to the one ``style.weights`` names, built here; ``bar`` advances every step."""
    style_cfg = StyleConfig.from_config(cfg)
    if extractor is None:
        extractor = seeded_extractor(style_cfg)
    weight_tags = {"raycv.weights": extractor.weights_description,
                   "raycv.weights_pretrained": str(extractor.pretrained).lower()}
    if not extractor.pretrained:  # build_vgg_features has warned on the console
        weight_tags["mlflow.note.content"] = RANDOM_INIT_NOTE
    tracking.set_tags(client, run_id, weight_tags)
    for img, file in ((content_img, INPUT_FILES[0]), (style_img, INPUT_FILES[1])):
        tracking.log_image(client, run_id, postprocess(preprocess(img, style_cfg.size)), file)
    pending: list[Metric] = []
    first_style = None
    for result in stylize(content_img, style_img, style_cfg, device=device, extractor=extractor):
        first_style = result.terms["style"] if first_style is None else first_style
        metrics = step_metrics(result, style_cfg, first_style)
        now = int(time.time() * 1000)
        pending += [Metric(key, float(value), now, result.step) for key, value in metrics.items()]
        if bar is not None:
            bar.step(0, result.losses["total"])
        if result.image is None:
            continue
        _log_metrics(client, run_id, pending)
        pending = []
        tracking.log_image(client, run_id, result.image, f"{IMAGES_DIR}/step_{result.step:05d}.png")
        if result.step == style_cfg.steps:
            tracking.log_image(client, run_id, result.image, RESULT_FILE)
        yield {**metrics, "step": float(result.step)}, result.image


def _device(cfg: TaskConfig) -> str:
    """The GPU Ray assigned when the config asks for one, else the CPU with as many threads as CPUs reserved."""
    if cfg.scaling.gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("scaling.gpus_per_worker > 0 but this Ray worker sees no CUDA device")
        return "cuda"
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    return "cpu"


# ------------------------------------------------------------------------------------------- pairs as Ray tasks

class InputPair(NamedTuple):
    content: str  # image specs (absolute local paths, URIs or skimage:<name>)
    style: str
    content_img: Image.Image
    style_img: Image.Image


@dataclass
class PairOutcome:
    content: str
    style: str
    run_id: str
    experiment_id: str
    metrics: dict[str, float] = field(default_factory=dict)  # of the last step
    weights: str = ""
    pretrained: bool = False
    output: str | None = None  # the stylised image written on the driver
    wall_seconds: float = 0.0
    error: str | None = None


@ray.remote
def _stylize_task(cfg: TaskConfig, extractor: VGGFeatures, content_img: Image.Image, style_img: Image.Image,
                  tracking_uri: str, run_id: str, console: str, verbose: bool) -> tuple[dict[str, float], Image.Image]:
    """One pair in a Ray worker, with the extractor the driver built and its progress on the driver's console in
    the driver's ``console`` style (:func:`pipelines.progress.console_style`), its debug lines where the driver's
    ``verbose``: (last metrics, final image)."""
    logs.configure_worker_logging(verbose)
    client = MlflowClient(tracking_uri)
    started = time.perf_counter()
    [(content, style)] = configured_pairs(cfg)
    bar = StepProgress(pair_name(content, style), cfg.style.steps, console)
    try:
        progress = tracked_stylize(client, run_id, cfg, content_img, style_img, _device(cfg), extractor, bar)
        metrics, image = deque(progress, maxlen=1)[0]  # run to the end, keep the last
    finally:
        bar.close()
    client.log_metric(run_id, "wall_seconds", time.perf_counter() - started)
    return metrics, image


def load_pairs(cfg: TaskConfig) -> list[InputPair]:
    """Check the config and open every pair's images on the driver, so that a missing or bad file fails before
    anything starts (a :class:`DataFormatError` naming it)."""
    StyleConfig.from_config(cfg)
    return [InputPair(content, style, open_image(content), open_image(style)) for content, style in
            configured_pairs(cfg)]


def run_pairs(cfg: TaskConfig, inputs: Sequence[InputPair], tracking_uri: str,
              output_dir: str | Path) -> list[PairOutcome]:
    """Stylise each of ``inputs`` (from :func:`load_pairs`) as parallel Ray tasks; write the results to
    ``output_dir``. A pair that fails is marked FAILED in MLflow and reported in its outcome's ``error``; the other
    pairs go on.

    The VGG-19 extractor is built once here, on the driver, and shared through the object store: a ``style.weights``
    file is read (tensor-only) where the user named it, and a bad one fails before any run or task starts."""
    extractor = ray.put(seeded_extractor(StyleConfig.from_config(cfg)))
    client = MlflowClient(tracking_uri)
    experiment_id = tracking.ensure_experiment(client, tracking.experiment_name(cfg.task))
    resources = {"num_cpus": cfg.scaling.cpus_per_worker,
                 "num_gpus": cfg.scaling.gpus_per_worker}
    outcomes, pending = [], {}
    console = console_style()
    for content, style, content_img, style_img in inputs:
        pair_cfg = cfg.with_values({"style.pairs": [[content, style]]})  # the run's params show its own pair
        run_id = open_run(client, pair_cfg, content, style)
        log.info("%s: MLflow %s", pair_name(content, style), tracking.run_url(tracking_uri, experiment_id, run_id))
        outcomes.append(PairOutcome(content, style, run_id, experiment_id))
        ref = _stylize_task.options(**resources).remote(pair_cfg, extractor, content_img, style_img, tracking_uri,
                                                        run_id, console, logs.verbose())
        pending[ref] = (outcomes[-1], time.perf_counter())
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    try:
        # the main thread waits for a helper thread: a signal's handler cannot interrupt ray.wait
        fit_run(lambda: _collect_pairs(client, pending, output_dir), stop_signals=True)
    except RunInterrupted as stopped:  # the pairs' Ray tasks end with this driver
        unended = [o for o in outcomes if client.get_run(o.run_id).info.status == "RUNNING"]
        for outcome in unended:
            client.set_terminated(outcome.run_id, status="KILLED")
        raise RunInterrupted(stopped.signal_number, f"{stopped} with {len(outcomes) - len(unended)} of "
                             f"{len(outcomes)} pairs ended: the MLflow runs of the others are marked KILLED") from None
    return outcomes


def _collect_pairs(client: MlflowClient, pending: dict[Any, tuple[PairOutcome, float]],
                   output_dir: str | Path) -> None:
    """Wait for each of ``pending``'s pair tasks, save its image and end its MLflow run (FAILED where it failed)."""
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        outcome, started = pending.pop(ref)
        try:
            outcome.metrics, image = ray.get(ref)
        except Exception as exc:  # one failed pair must not lose the others
            outcome.error = str(exc).strip().splitlines()[-1]
            client.set_terminated(outcome.run_id, status="FAILED")
            log.error("%s failed: %s", pair_name(outcome.content, outcome.style), exc)
            continue
        outcome.wall_seconds = time.perf_counter() - started
        output = Path(output_dir) / f"{pair_name(outcome.content, outcome.style)}_{outcome.run_id[:8]}.png"
        image.save(output)
        outcome.output = str(output)
        tags = client.get_run(outcome.run_id).data.tags
        outcome.weights = tags.get("raycv.weights", "")
        outcome.pretrained = tags.get("raycv.weights_pretrained") == "true"
        client.set_terminated(outcome.run_id, status="FINISHED")


def summary(outcomes: Sequence[PairOutcome], task: str, tracking_uri: str) -> str:
    """The console report of ``run_pairs``: one row per pair, where the files and runs are, random init loudly."""
    rows = [[pair_name(o.content, o.style), o.run_id, int(o.metrics.get("step", 0)),
             o.metrics.get("style_reduction", float("nan")), o.metrics.get("raw_content", float("nan")),
             o.metrics.get(METRIC, float("nan")), o.wall_seconds, o.output or f"FAILED: {o.error}"] for o in outcomes]
    lines = ["", format_table(["pair", "mlflow run", "steps", "style loss fell x", "content loss", METRIC, "wall s",
                               "output"], rows)]
    if len(outcomes) == 1:
        lines.append(f"\nMLflow: {tracking.run_url(tracking_uri, outcomes[0].experiment_id, outcomes[0].run_id)}")
    lines.append(f"MLflow UI: {ui_command(tracking_uri)} (experiment {tracking.experiment_name(task)})")
    random_init = sorted({o.weights for o in outcomes if o.error is None and not o.pretrained})
    if random_init:
        lines += ["", "!" * 100, "!!! WARNING: these results were made with RANDOM-INIT VGG-19 features, not ImageNet "
                  "weights: texture statistics only."] + [f"!!! {w}" for w in random_init] + ["!" * 100]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ sweeps (Tune)

def _retire_earlier_attempt(client: MlflowClient, parent_run_id: str, trial_id: str) -> None:
    """A restored sweep reruns an unfinished style trial from step 0 (no checkpoint): its old run is closed as
    KILLED and loses its trial id tag, so the sweep's summary finds the new run."""
    old = tracking.find_child_run(client, parent_run_id, trial_id)
    if old is not None:
        client.delete_tag(old, "raycv.trial_id")
        tracking.set_tags(client, old, {"raycv.restarted_trial_id": trial_id})
        client.set_terminated(old, status="KILLED")


def style_trial(config: dict[str, Any], base: dict[str, Any], task_path: str) -> None:
    """Tune trainable: stylise the first configured pair with the sampled weights, as a child run of the sweep,
    reporting every ``style.log_every`` steps (the run is closed before the last report, which may end the trial)."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    client = MlflowClient(config["tracking_uri"])
    cfg = trial_config(base, task_path, config["sampled"])
    content, style = configured_pairs(cfg)[0]
    _retire_earlier_attempt(client, config["parent_run_id"], trial_id)
    tags = {"raycv.kind": "trial", "raycv.trial_id": trial_id, "raycv.trial_name": context.get_trial_name()}
    run_id = open_run(client, cfg, content, style, tags, parent_run_id=config["parent_run_id"])
    steps = cfg.style.steps
    progress = tracked_stylize(client, run_id, cfg, open_image(content), open_image(style), _device(cfg))
    for metrics, _ in progress:
        if metrics["step"] == steps:
            client.set_terminated(run_id, status="FINISHED")
        tune.report(metrics)


def _latest_image(client: MlflowClient, run_id: str) -> Image.Image | None:
    """The last image a (possibly early-stopped) run logged under IMAGES_DIR."""
    files = sorted(a.path for a in client.list_artifacts(run_id, IMAGES_DIR) if a.path.endswith(".png"))
    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with Image.open(client.download_artifacts(run_id, files[-1], tmp)) as img:
            return img.convert("RGB")


def log_contact_sheet(client: MlflowClient, parent_run_id: str, trials: list[dict[str, Any]],
                      params: list[str]) -> None:
    """``contact_sheet.png`` on the sweep's parent run: every trial's latest image, best ``ref_loss`` first,
    captioned with its sampled weights, its ``ref_loss`` and how many reports it made before it ended or was
    stopped (``epochs`` in tune.py's trial rows)."""
    ranked = sorted((t for t in trials if t.get("run_id")), key=lambda t: (math.isnan(t[METRIC]), t[METRIC]))
    images, captions = [], []
    for trial in ranked:
        image = _latest_image(client, trial["run_id"])
        if image is None:
            continue
        images.append(image)
        captions.append([f"{p.rsplit('.', 1)[-1].removesuffix('_weight')} {trial[p]:.3g}" for p in params]
                        + [f"{METRIC} {trial[METRIC]:.3g}", f"{int(trial['epochs'])} reports"])
    if images:
        client.log_image(parent_run_id, contact_sheet(images, captions), artifact_file="contact_sheet.png")


def with_absolute_pairs(cfg: TaskConfig) -> TaskConfig:
    """``style.pairs`` with local paths made absolute, for trials that run in other folders and on other nodes."""
    return cfg.with_values({"style.pairs": [list(pair) for pair in configured_pairs(cfg)]})


def sweep_plan(cfg: TaskConfig) -> SweepPlan:
    """How pipelines/tune.py sweeps style transfer. Checks the config and opens the first pair here on the driver
    (bad input fails before any trial starts); trials get the pairs with absolute local paths."""
    style_cfg = StyleConfig.from_config(cfg)
    for spec in configured_pairs(cfg)[0]:
        open_image(spec)
    reports = -(-style_cfg.steps // style_cfg.log_every)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return SweepPlan(trainable=style_trial, resources=resources, metric=METRIC, mode="min", max_t=reports,
                     full_reports=reports, register_model=False, log_extras=log_contact_sheet,
                     resolve=with_absolute_pairs, report_unit="report")
