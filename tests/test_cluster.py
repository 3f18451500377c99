"""The cluster path, for real: two Ray nodes, datasets, checkpoints and MLflow artifacts on an S3 server (moto on
127.0.0.1, spoken to over HTTP), commands run the way a user runs them, and a node lost in the middle of a run.
That run is also the suite's CIFAR-10 end-to-end run: learning, params, pictures, the logged model.

The session's services (tests/conftest.py): a head and a second node joined with ``ray start --address``, each
with 2 CPUs and one ``raycv_node_slot`` so that workers asking for a slot each land on different nodes; every node
and this driver have the S3 endpoint and credentials in their environment, as a real cluster's nodes would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.pool import ThreadPool
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from cvtasks import storage
from pipelines.config import load_config
from pipelines.predict import load_logged_model
from pipelines.progress import PROGRESS_ENV
from pipelines.train import run_training
from tests.services import NODE_SLOT, add_ray_node, kill_session
from tests.waiting import first_run_with_metric

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: One-epoch settings that keep each task's run to seconds on 2 CPUs.
FAST = {
    "cifar10": ["data.batch_size=128"],
    "hotdog": ["model.weights=scratch", "augment.size=32", "augment.resize_size=36", "data.batch_size=32"],
    "banana": ["data.batch_size=32"],
    "voc": ["data.batch_size=16"],
}
METRIC = {"cifar10": "val_acc", "hotdog": "val_acc", "banana": "val_map50", "voc": "val_miou"}
JOBS = 10
#: Epochs of the run that loses a node in its second; enough to learn well above chance.
LOSS_RUN_EPOCHS = 3
CIFAR_CHANCE = 0.1


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _raycv(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "raycv"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"raycv {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _s3_keys(s3_server, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix,
                                      **({"ContinuationToken": token} if token else {}))
        keys += [item["Key"] for item in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _values(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _latest_run(client: MlflowClient, task: str, kind: str = "train"):
    experiment = client.get_experiment_by_name(f"raycv-{task}")
    return client.search_runs([experiment.experiment_id], f"tags.`raycv.kind` = '{kind}'",
                              order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.fixture(scope="module")
def s3_env(ray_cluster, s3_server) -> dict[str, str]:
    """A user's shell on a cluster node: the S3 endpoint and credentials, ``RAYCV_STORAGE`` on S3, the cluster."""
    return {**os.environ, **ray_cluster.env, "RAY_ADDRESS": ray_cluster.gcs_address,
            "RAYCV_STORAGE": s3_server.uri("raycv")}


@pytest.fixture(scope="module")
def trained(s3_env, mlflow_server, s3_demo_root) -> dict[str, str]:
    """``raycv train TASK --data-root s3://...`` for each dataset task (one epoch); task -> MLflow run id."""
    client, runs = MlflowClient(mlflow_server.url), {}
    for task, items in FAST.items():
        _raycv(["train", task, "--data-root", s3_demo_root, "--epochs", "1", *_sets(items),
                "--tracking-uri", mlflow_server.url], s3_env)
        runs[task] = _latest_run(client, task).info.run_id
    return runs


@pytest.mark.parametrize("task", list(FAST))
def test_each_task_trains_from_s3_with_checkpoints_and_artifacts_on_s3(trained, task, mlflow_server, s3_server):
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(trained[task])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, METRIC[task])] == [0]
    assert run.data.tags["raycv.storage"] == s3_server.uri("raycv")
    checkpoints = _s3_keys(s3_server, f"raycv/{run.data.tags['raycv.train_name']}/")
    assert any(key.endswith("/state.pt") for key in checkpoints), checkpoints[:5]
    artifacts = [key for key in _s3_keys(s3_server, "mlflow/") if f"/{run.info.run_id}/" in key]
    assert any(key.endswith("/config.yaml") for key in artifacts), artifacts
    assert any("/model/" in key for key in artifacts), artifacts
    # raycv train registers its model and moves the alias latest to it
    assert client.get_model_version_by_alias(f"raycv-{task}", "latest").run_id == run.info.run_id


@pytest.mark.parametrize("model", ["runs", "default"])
def test_predict_reads_an_image_and_a_model_on_s3(trained, s3_env, mlflow_server, s3_demo_root, tmp_path, model):
    """With --model runs:/..., and without --model: models:/raycv-hotdog@latest, the newest raycv train."""
    image = storage.join(s3_demo_root, "hotdog", "test", "hotdog",
                         storage.list_dir(storage.join(s3_demo_root, "hotdog", "test", "hotdog"))[0])
    out = tmp_path / "predictions"
    chosen = ["--model", f"runs:/{trained['hotdog']}/model"] if model == "runs" else []
    _raycv(["predict", "hotdog", image, *chosen, "--out", str(out), "--tracking-uri", mlflow_server.url], s3_env)
    assert (out / "predictions.json").read_text().count(image) == 1


def test_stylize_reads_its_images_from_s3(s3_env, mlflow_server, s3_demo_root, tmp_path):
    folder = storage.join(s3_demo_root, "hotdog", "train", "hotdog")
    content, style = (storage.join(folder, name) for name in storage.list_dir(folder)[:2])
    out = tmp_path / "styled"
    result = _raycv(["stylize", "--content", content, "--style", style, "--steps", "4", "--size", "32", "32",
                     "--set", "style.log_every=2", "--output-dir", str(out), "--tracking-uri", mlflow_server.url],
                    {**s3_env, PROGRESS_ENV: "bar"})  # as on a terminal
    assert list(out.glob("*.png")), result.stdout
    assert "step/s]" in result.stdout + result.stderr  # the pair's progress bar, drawn on the driver


def test_data_check_make_demo_and_reuse_on_s3(s3_env, s3_server, s3_demo_root):
    assert _raycv(["data", "check", "banana", "--root", s3_demo_root], s3_env).stdout.strip().endswith("ok")
    made = s3_server.uri("made")
    _raycv(["data", "make-demo", "--root", made, "--only", "cifar10"], s3_env)
    assert any(key.endswith("cifar-10-batches-py/.raycv-demo") for key in _s3_keys(s3_server, "made/"))
    again = _raycv(["data", "make-demo", "--root", made, "--only", "cifar10"], s3_env)
    assert "reusing it" in again.stdout + again.stderr
    assert _raycv(["data", "check", "cifar10", "--root", made], s3_env).stdout.strip().endswith("ok")


class _NodeKiller(threading.Thread):
    """Waits until the run tagged ``marker`` has logged epoch 0 and is into epoch 1, then kills the second node's
    processes (only those: its session) and joins a replacement node, as a cluster's autoscaler would."""

    def __init__(self, cluster, tracking_uri: str, marker: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.client, self.marker = cluster, MlflowClient(tracking_uri), marker
        self.first_nodes: list[str] = []
        self.killed_node = ""
        self.epochs_before_kill: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run = self._wait_for_epoch_zero()
            self.first_nodes = run.data.tags["raycv.worker_nodes"].split(",")
            time.sleep(3)  # into epoch 1 (the second epoch)
            self.epochs_before_kill = sorted(int(m.step) for m in
                                             self.client.get_metric_history(run.info.run_id, "epoch"))
            head = ray.get_runtime_context().get_node_id()
            self.killed_node = next(n for n in self.first_nodes if n != head)
            assert kill_session(self.cluster.worker_sessions[-1]) > 0
            add_ray_node(self.cluster)
        except BaseException as error:  # reported by the test
            self.error = error

    def _wait_for_epoch_zero(self):
        experiment = self.client.get_experiment_by_name("raycv-cifar10")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if experiment is None:
                experiment = self.client.get_experiment_by_name("raycv-cifar10")
            runs = self.client.search_runs([experiment.experiment_id], f"tags.`raycv.test` = '{self.marker}'") \
                if experiment else []
            if runs and self.client.get_metric_history(runs[0].info.run_id, "epoch"):
                return self.client.get_run(runs[0].info.run_id)
            time.sleep(0.5)
        raise TimeoutError("the run never logged its first epoch")


@pytest.fixture(scope="module")
def node_loss_run(ray_cluster, mlflow_server, s3_server, s3_demo_root):
    """CIFAR-10 on two workers, one per node; the second node dies in epoch 2 (see :class:`_NodeKiller`)."""
    marker = uuid.uuid4().hex
    cfg = load_config("cifar10", overrides=[
        f"data.root={s3_demo_root}", f"train.epochs={LOSS_RUN_EPOCHS}", "scaling.workers=2", "data.batch_size=64",
        f"scaling.worker_resources={{{NODE_SLOT}: 1}}", "train.max_failures=3",
    ])
    killer = _NodeKiller(ray_cluster, mlflow_server.url, marker)
    killer.start()
    outcome = run_training(cfg, mlflow_server.url, storage=s3_server.uri("raycv"), run_tags={"raycv.test": marker})
    killer.join(timeout=60)
    assert killer.error is None, repr(killer.error)
    return outcome, killer, MlflowClient(mlflow_server.url)


def test_two_node_run_survives_losing_a_node_mid_epoch(node_loss_run):
    """The run finishes from its S3 checkpoint on the head and a replacement node, in the same MLflow run, every
    epoch logged once."""
    outcome, killer, client = node_loss_run
    run = client.get_run(outcome.run_id)
    assert len(set(killer.first_nodes)) == 2, killer.first_nodes  # one worker per node before the loss
    assert killer.epochs_before_kill == [0]  # the node died during the second epoch
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["raycv.attempts"]) >= 2  # the worker group really restarted
    last_nodes = run.data.tags["raycv.worker_nodes"].split(",")
    assert len(set(last_nodes)) == 2 and killer.killed_node not in last_nodes
    for key in ("epoch", "train_loss", "train_acc", "val_acc", "val_loss", "examples_per_sec"):
        assert _steps(client, outcome.run_id, key) == list(range(LOSS_RUN_EPOCHS)), key
    experiment_runs = client.search_runs([outcome.experiment_id], "tags.`raycv.kind` = 'train'")
    assert [r.info.run_id for r in experiment_runs].count(outcome.run_id) == 1
    experiment = client.get_experiment(outcome.experiment_id)
    assert experiment.name == "raycv-cifar10"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_cifar10_learns_well_above_chance_through_the_loss(node_loss_run):
    outcome, _, client = node_loss_run
    losses, accuracy = _values(client, outcome.run_id, "train_loss"), _values(client, outcome.run_id, "val_acc")
    assert losses[-1] < 0.8 * losses[0]
    assert accuracy[-1] > CIFAR_CHANCE + 0.25, accuracy
    assert outcome.metrics["val_acc"] == pytest.approx(accuracy[-1])


def test_run_records_config_params_and_pictures(node_loss_run):
    outcome, _, client = node_loss_run
    run = client.get_run(outcome.run_id)
    assert run.data.params["scaling.workers"] == "2"
    assert run.data.params["optim.name"] == "adam"
    assert {"config.yaml", "plots/learning_curves.png", "plots/train_augmented.png", "plots/val_predictions.png",
            "metrics/val_confusion.json"} <= _artifacts(client, outcome.run_id)


def test_logged_model_loads_over_http_and_predicts(node_loss_run, mlflow_server):
    """The model is logged as tensors only (``model/state_dict.pt`` + class names), its artifacts on S3 behind the
    tracking server, and rebuilt from the run's config."""
    outcome, _, client = node_loss_run
    assert {"model/state_dict.pt", "model/class_names.json"} <= _artifacts(client, outcome.run_id, "model")
    model, _ = load_logged_model("cifar10", f"runs:/{outcome.run_id}/model", mlflow_server.url)
    with torch.no_grad():
        scores = model(torch.from_numpy(np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)))
    assert scores.shape == (4, 10)


def test_sweep_job_on_two_nodes_with_s3_storage_then_resume_from_s3(ray_cluster, s3_env, mlflow_server, s3_server,
                                                                   s3_demo_root):
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".", "--",
              "raycv", "tune", "hotdog", "--data-root", s3_demo_root, "--epochs", "1", "--num-samples", "1",
              "--scheduler", "fifo", *_sets(FAST["hotdog"]), "--tracking-uri", mlflow_server.url]
    result = subprocess.run(submit, cwd=REPO, env=s3_env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
    path = output.split("--resume ")[-1].split()[0]
    assert path.startswith(s3_server.uri("raycv", "sweep-hotdog-")), path

    client = MlflowClient(mlflow_server.url)
    parent = _latest_run(client, "hotdog", kind="sweep")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias("raycv-hotdog", "best").run_id in {c.info.run_id for c in children}

    resumed = _raycv(["tune", "hotdog", "--resume", path, "--data-root", s3_demo_root, "--epochs", "1",
                      *_sets(FAST["hotdog"]), "--tracking-uri", mlflow_server.url], s3_env)
    assert parent.info.run_id in resumed.stdout
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_ray_job_stop_leaves_the_run_killed_with_raycvs_line_in_the_log(ray_cluster, s3_env, mlflow_server,
                                                                        s3_demo_root):
    """``ray job stop`` sends the job's processes SIGTERM and SIGKILL 3 s later (``RAY_JOB_STOP_WAIT_TIME_S``): within
    that the MLflow run is marked KILLED with its epochs, and the job's log ends with how to continue it."""
    since_ms = int(time.time() * 1000)
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url, "--working-dir", ".",
         "--", "raycv", "train", "hotdog", "--data-root", s3_demo_root, "--epochs", "50", *_sets(FAST["hotdog"]),
         "--tracking-uri", mlflow_server.url],
        cwd=REPO, env=s3_env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    job_id = submitted.stdout.split("Job '")[1].split("'")[0]
    jobs, client = JobSubmissionClient(ray_cluster.dashboard_url), MlflowClient(mlflow_server.url)
    run_id = first_run_with_metric(
        client, "raycv-hotdog", METRIC["hotdog"],
        lambda: jobs.get_job_logs(job_id)[-3000:] if jobs.get_job_status(job_id).is_terminal() else None, since_ms)

    stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_cluster.dashboard_url, job_id],
                             cwd=REPO, env=s3_env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert jobs.get_job_status(job_id) == JobStatus.STOPPED
    assert client.get_run(run_id).info.status == "KILLED"
    # The count is the driver's when it stopped: the workers, ended with the driver, may log one more epoch.
    line = re.compile(rf"^raycv: stopped by SIGTERM after \d+ of 50 epochs: MLflow run {run_id} is marked KILLED",
                      re.MULTILINE)
    deadline = time.monotonic() + 30
    while not line.search(logs := jobs.get_job_logs(job_id)) and time.monotonic() < deadline:
        time.sleep(1)  # the job API serves the log file as its agent last read it
    assert line.search(logs), logs[-3000:]


def test_ten_concurrent_job_submissions_all_succeed(ray_cluster, s3_env, s3_demo_root):
    def submit(_: int) -> str:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", ray_cluster.dashboard_url,
             "--working-dir", ".", "--", "raycv", "data", "check", "hotdog", "--root", s3_demo_root],
            cwd=REPO, env=s3_env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout.split("Job '")[1].split("'")[0]

    with ThreadPool(JOBS) as pool:
        job_ids = pool.map(submit, range(JOBS))
    assert len(set(job_ids)) == JOBS
    jobs = JobSubmissionClient(ray_cluster.dashboard_url)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        statuses = {job: jobs.get_job_status(job) for job in job_ids}
        if all(status.is_terminal() for status in statuses.values()):
            break
        time.sleep(2)
    assert all(status == JobStatus.SUCCEEDED for status in statuses.values()), statuses
    assert all(jobs.get_job_logs(job).strip().endswith("ok") for job in job_ids)


def test_a_shell_without_the_clusters_token_gets_one_line_not_a_traceback(ray_cluster, tmp_path):
    """The cluster uses token auth; a shell without ``RAY_AUTH_MODE=token`` (or the token) cannot join it: raycv says
    what to set, in one line, and exits 2."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    result = subprocess.run(
        [str(BIN / "raycv"), "demo", "--address", ray_cluster.gcs_address, "--root", str(tmp_path / "demo"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raycv: error: cannot connect to the Ray cluster at {ray_cluster.gcs_address}")
    assert "RAY_AUTH_MODE=token" in last and "Traceback" not in result.stderr
