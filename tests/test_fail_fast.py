"""Errors fail fast, once, in one line: driver-side checks before Ray starts, deterministic worker errors that
Ray Train does not retry, `--resume` of unfinished runs only, sweeps whose trials failed."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.exceptions import RayTaskError
from ray.train import ControllerError

from cvtasks.errors import DataFormatError
from pipelines import cli, failures, tracking, tune
from pipelines.config import ConfigError, check_values, load_config
from pipelines.handoff import FailFastCallback
from pipelines.run_logging import ATTEMPTS_TAG
from pipelines.train import ERROR_TAG, check_config, preflight, resume_run_id, run_training


def _hotdog_root(tmp_path, classes=("hotdog", "not-hotdog"), val_classes=None):
    """A tiny hotdog image folder dataset: two images per class and split."""
    for split, names in (("train", classes), ("test", val_classes or classes)):
        for name in names:
            folder = tmp_path / "hotdog" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 60, 80, 120)).save(folder / f"{i}.png")
    return tmp_path


@pytest.fixture
def ray_connects(monkeypatch) -> list[str | None]:
    """Records every call of ``pipelines.cluster.connect`` (the CLI's one way to Ray) and makes it fail: a test
    asserts the list stays empty, i.e. the command failed before it asked for Ray (this test process may already
    be a driver of the session's cluster, so ``ray.is_initialized()`` cannot tell)."""
    calls: list[str | None] = []

    def connect(address: str | None = None, num_cpus: int | None = None) -> None:
        calls.append(address)
        raise AssertionError("the command reached Ray")

    monkeypatch.setattr("pipelines.cluster.connect", connect)
    return calls


def _cli(argv: list[str], capsys) -> tuple[int, list[str], float]:
    started = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - started
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("raycv:")], seconds


@pytest.mark.parametrize("override, message", [
    ("scaling.workers=0", "scaling.workers must be at least 1"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("data.batch_size=0", "data.batch_size must be at least 1"),
    ("data.eval_batch_size=-4", "data.eval_batch_size must be at least 1"),
    ("optim.lr=0", "optim.lr must be above 0"),
    ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker must be above 0"),
])
def test_value_constraints(override, message):
    with pytest.raises(ConfigError, match=message):
        check_values(load_config("hotdog", overrides=[override]))


@pytest.mark.parametrize("override, message", [
    ("optim.name=adamw", 'Unknown optimizer "adamw"'),
    ("optim.schedule=linear", 'Unknown optim.schedule "linear"'),
    ("data.cache=disk", 'Unknown data.cache mode "disk"'),
    ("data.augment_on=gpu", 'Unknown data.augment_on "gpu"'),
    ("augment.normalize=bogus", 'Unknown augment.normalize "bogus"'),
])
def test_unknown_names_are_refused_by_the_code_that_uses_them(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_config("cifar10", overrides=[override]))


def test_style_config_passes_value_checks():
    check_values(load_config("style"))  # no workers, epochs or batch sizes: nothing to refuse


def test_preflight_finds_missing_root_and_differing_class_lists(tmp_path):
    with pytest.raises(DataFormatError, match="data root not found"):
        preflight(load_config("hotdog", overrides=[f"data.root={tmp_path / 'nowhere'}"]), "sqlite:///unused.db")
    root = _hotdog_root(tmp_path, val_classes=("hotdog", "not-hotdog", "pizza"))
    with pytest.raises(DataFormatError, match="pizza"):
        preflight(load_config("hotdog", overrides=[f"data.root={root}"]), "sqlite:///unused.db")


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "scaling.workers must be at least 1"),
    (["--data-root", "/nonexistent/raycv"], "/nonexistent/raycv: data root not found"),
    (["--set", "optim.name=adamw"], 'Unknown optimizer "adamw"'),
])
def test_cli_fails_in_one_line_before_ray_starts(command, args, message, capsys, tmp_path, ray_connects):
    code, lines, seconds = _cli([command, "hotdog", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                                capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("raycv: error: ") and message in lines[0], lines
    assert ray_connects == []
    assert seconds < 10


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("weights, message", [
    # hotdog's default, offline (the mirror refuses): one line with the alternatives
    ("imagenet", "ResNet18_Weights.IMAGENET1K_V1 is not in the torch hub cache"),
    ("/nonexistent/weights.pt", "neither scratch, imagenet nor an existing file"),
    ("runs:/0123456789abcdef/model", "model.weights runs:/0123456789abcdef/model"),
])
def test_cli_missing_weights_fail_in_one_line_before_ray_starts(command, weights, message, capsys, tmp_path,
                                                                 monkeypatch, ray_connects):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("RAYCV_WEIGHTS_URL", "http://127.0.0.1:9")  # nothing listens there: as offline
    root = _hotdog_root(tmp_path)
    code, lines, seconds = _cli([command, "hotdog", "--data-root", str(root), "--set", f"model.weights={weights}",
                                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capsys)
    assert code == 2
    assert len(lines) == 1 and message in lines[0], lines
    assert ray_connects == []
    assert seconds < 10


def test_deterministic_cause_looks_through_ray_and_ray_train_wrappers():
    bad = DataFormatError("/data/x.png", "not an image")
    try:
        raise RuntimeError("streaming failed") from bad
    except RuntimeError as exc:
        chained = exc
    task_error = RayTaskError("map", "Traceback ...\nlong remote text", bad).as_instanceof_cause()
    for wrapped in (chained, task_error, ControllerError(failures.DeterministicError("/data/x.png: not an image"))):
        assert failures.one_line(wrapped) == "/data/x.png: not an image"
        assert failures.deterministic_cause(wrapped) is not None
    assert failures.deterministic_cause(RuntimeError("injected failure")) is None
    assert failures.one_line(RuntimeError("worker died\nmore")) == "RuntimeError: worker died"


def test_fail_fast_worker_function_and_callback():
    @failures.fail_fast
    def bad_data(config):
        raise RuntimeError("iterating failed") from DataFormatError("/d/7.png", "truncated PNG")

    @failures.fail_fast
    def crash(config):
        raise RuntimeError("injected failure")

    with pytest.raises(failures.DeterministicError, match="truncated PNG") as caught:
        bad_data({})
    with pytest.raises(RuntimeError, match="injected"):
        crash({})
    callback = FailFastCallback()
    callback.after_exception(None, {0: RuntimeError("injected failure")})  # a crash: Ray Train retries it
    with pytest.raises(failures.DeterministicError):
        callback.after_exception(None, {0: RuntimeError("x"), 1: caught.value})


def test_resume_latest_picks_unfinished_runs_only(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="no earlier cifar10 training run"):
        resume_run_id(client, "cifar10", "latest")
    failed = tracking.create_run(client, "cifar10", load_config("cifar10"), tags={"raycv.kind": "train"})
    client.set_terminated(failed, status="FAILED")
    finished = tracking.create_run(client, "cifar10", load_config("cifar10"), tags={"raycv.kind": "train"})
    client.set_terminated(finished, status="FINISHED")
    assert resume_run_id(client, "cifar10", "latest") == failed
    client.update_run(failed, status="FINISHED")
    with pytest.raises(ConfigError, match=f"nothing to resume: the newest cifar10 run {finished} is FINISHED"):
        resume_run_id(client, "cifar10", "latest")
    assert resume_run_id(client, "cifar10", finished) == finished  # an explicit id may continue a finished run


def test_cli_resume_with_nothing_to_resume_is_one_line(tmp_path, capsys, ray_connects):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = tracking.create_run(client, "hotdog", load_config("hotdog"), tags={"raycv.kind": "train"})
    client.set_terminated(run, status="FINISHED")
    root = _hotdog_root(tmp_path)
    code, lines, _ = _cli(["train", "hotdog", "--resume", "--data-root", str(root), "--tracking-uri", uri], capsys)
    assert code == 2 and len(lines) == 1 and f"run {run} is FINISHED" in lines[0]
    assert ray_connects == []


@dataclass
class _Result:
    """What `_record_trials` reads of a Tune result."""

    trial_id: str
    error: BaseException | None
    value: float = math.nan
    config: dict[str, Any] = field(default_factory=lambda: {"sampled": {"optim.lr": 0.01}})

    @property
    def metrics(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, **({} if math.isnan(self.value) else {"val_acc": self.value})}


def _record(tmp_path, results):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.create_run(client, "hotdog", load_config("hotdog"), tags={"raycv.kind": "sweep"})
    plan = tune.SweepPlan(trainable=lambda c: None, resources={}, metric="val_acc", mode="max", max_t=2,
                          full_reports=2, register_model=False)
    outcome = tune._record_trials(client, plan, parent, "/x", results, {"optim.lr": None})
    return client, parent, outcome


def test_sweep_records_which_trials_failed_and_why(tmp_path):
    bad = RayTaskError("sweep_trial", "Traceback\n...", failures.DeterministicError("/d/3.png: not an image"))
    client, parent, outcome = _record(tmp_path, [
        _Result("t1", None, 0.7), _Result("t2", bad.as_instanceof_cause()), _Result("t3", RuntimeError("OOM\nkilled")),
    ])
    assert outcome.failed == {"t2": "/d/3.png: not an image", "t3": "RuntimeError: OOM"}
    assert outcome.best_metric == 0.7
    tags = client.get_run(parent).data.tags
    assert tags[tune.FAILED_TRIALS_TAG] == "t2: /d/3.png: not an image\nt3: RuntimeError: OOM"
    csv_text = client.download_artifacts(parent, "trials.csv", str(tmp_path))
    assert "/d/3.png: not an image" in open(csv_text).read()


def test_sweep_where_every_trial_failed_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tune, "_record_trials", lambda *a: tune.SweepOutcome(
        parent_run_id=a[2], experiment_path="/x", best_config={}, best_metric=math.nan, best_run_id=None,
        registered_version=None, trials=[{"trial": "t1"}, {"trial": "t2"}], wall_seconds=0.0, metric="val_acc",
        failed={"t1": "/d/3.png: not an image", "t2": "/d/3.png: not an image"}))
    client, parent, outcome = _record(tmp_path, [])
    # run_sweep's ending, after Tune: the parent run FAILED and one line naming the first trial's error
    with pytest.raises(failures.RunError, match=r"every trial of the sweep failed \(2\); the first, t1: /d/3.png"):
        tune._finish_sweep(client, outcome, time.perf_counter())
    assert client.get_run(parent).info.status == "FAILED"


def _newest_run(client: MlflowClient, task: str):
    experiment = client.get_experiment_by_name(f"raycv-{task}")
    return client.search_runs([experiment.experiment_id], "tags.`raycv.kind` = 'train'",
                              order_by=["start_time DESC"], max_results=1)[0]


def _tiny_hotdog(root, *extra: str) -> dict:
    return load_config("hotdog", overrides=[
        f"data.root={root}", "model.weights=scratch", "augment.size=32", "augment.resize_size=36",
        "data.batch_size=32", "train.epochs=1", "train.max_failures=2", *extra,
    ])


@pytest.mark.slow
def test_corrupt_sample_found_by_a_worker_fails_the_run_once(ray_cluster, mlflow_server, demo_root, tmp_path):
    """The corrupt image is past the rows the driver probes and the split is streamed (not decoded on the driver):
    only the worker's Ray Data pipeline meets it. One attempt, not 1 + max_failures; the MLflow run says why."""
    root = tmp_path / "data"
    shutil.copytree(demo_root / "hotdog", root / "hotdog")
    victim = sorted((root / "hotdog" / "test" / "not-hotdog").glob("*.png"))[-1]
    victim.write_bytes(b"this is not a PNG")
    with pytest.raises(failures.DeterministicError, match=victim.name) as caught:
        run_training(_tiny_hotdog(root, "data.cache=stream"), mlflow_server.url, storage=str(tmp_path / "rr"))
    assert "\n" not in str(caught.value)
    client = MlflowClient(mlflow_server.url)
    run = _newest_run(client, "hotdog")
    assert run.info.status == "FAILED"
    assert str(victim) in run.data.tags[ERROR_TAG]
    assert run.data.tags[ATTEMPTS_TAG] == "1"  # the worker group started once: no retry


@pytest.mark.slow
def test_a_worker_crash_is_still_retried(ray_cluster, mlflow_server, demo_root, tmp_path):
    outcome = run_training(_tiny_hotdog(demo_root, "train.inject_failure_at_epoch=0"), mlflow_server.url,
                           storage=str(tmp_path / "rr"))
    run = MlflowClient(mlflow_server.url).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[ATTEMPTS_TAG] == "2"


def test_predict_without_a_trained_model_says_what_to_do(tmp_path, capsys, ray_connects):
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64)).save(image)
    code, lines, _ = _cli(["predict", "banana", str(image), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                          capsys)
    assert code == 2 and len(lines) == 1
    assert "models:/raycv-banana@latest" in lines[0] and "run `raycv train banana` first" in lines[0]
