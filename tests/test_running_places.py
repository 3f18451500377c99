"""raycv where users run it: a token-protected job API, `--resume`, the plain local CLI, and a run stopped by a
signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipelines import logs
from pipelines.config import load_config
from pipelines.train import run_training
from pipelines.warm_cluster import session_processes
from tests.waiting import first_run_with_metric

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Small hotdog inputs keep these runs to seconds per epoch on CPU.
HOTDOG_FAST = ["augment.size=32", "augment.resize_size=36", "data.batch_size=32"]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return _checked(cmd, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout))


def _checked(cmd: list[str], result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _epochs_logged(client: MlflowClient, run_id: str, key: str = "val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_job_api_refuses_requests_without_the_token(ray_cluster):
    """The server itself refuses: plain HTTP, so no client-side token check can stand in for it. (Jobs submitted
    with the token, a sweep and ten concurrent ones, run in tests/test_cluster.py.)"""
    token = Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert _job_api_status(ray_cluster.dashboard_url, None) == 401
    assert _job_api_status(ray_cluster.dashboard_url, "0" * len(token)) == 403
    assert _job_api_status(ray_cluster.dashboard_url, token) == 200


def _job_api_status(dashboard_url: str, token: str | None) -> int:
    """HTTP status of ``GET <dashboard>/api/jobs/`` sent with ``Authorization: Bearer <token>``, or without."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"{dashboard_url.rstrip('/')}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_resume_continues_the_same_mlflow_run(ray_cluster, mlflow_server, demo_root, tmp_path):
    """Also: the resumed epoch gets its place on the cosine schedule, and the worker's torch threads are recorded."""
    base = [f"data.root={demo_root}", "model.weights=scratch", *HOTDOG_FAST, "optim.schedule=cosine",
            "scaling.torch_threads=2"]
    first_cfg = load_config("hotdog", overrides=[*base, "train.epochs=1"])
    first = run_training(first_cfg, mlflow_server.url, storage=str(tmp_path))
    assert list(first.phases) == ["weights and MLflow run", "data pipelines", "worker group to first step",
                                  "training"]
    assert all(seconds > 0 for seconds in first.phases.values())
    resumed = run_training(load_config("hotdog", overrides=[*base, "train.epochs=2"]), mlflow_server.url,
                           resume=first.run_id)
    assert resumed.run_id == first.run_id
    client = MlflowClient(mlflow_server.url)
    assert _epochs_logged(client, first.run_id) == [0, 1]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raycv.torch_threads"] == "2"
    lr = first_cfg.optim.lr
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(first.run_id, "lr"), key=lambda m: m.step)] \
        == [(0, pytest.approx(lr)), (1, pytest.approx(lr * 0.5))]


def test_local_cli_train_then_predict(demo_root, tmp_path):
    """No cluster address: `raycv train` starts its own local Ray; `raycv predict` uses the logged model. Also what a
    newcomer sees: quiet output, progress lines fit for a log file, where the seconds went, and a run that explains
    itself."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [arg for item in HOTDOG_FAST for arg in ("--set", item)]
    trained = _run([str(BIN / "raycv"), "train", "hotdog", "--data-root", str(demo_root), "--epochs", "1",
                    "--set", "model.weights=scratch", *sets, "--tracking-uri", tracking,
                    "--storage", str(tmp_path / "ray_results")], env)
    console = trained.stdout + trained.stderr
    for internal in ("Execution plan of Dataset", "Reporting training result", "Checkpoint successfully created",
                     "Started training worker group"):
        assert internal not in console, internal  # Ray's INFO lines only with -v
    for noise in (*logs.KNOWN_NOISE, "RayDeprecationWarning"):
        assert noise not in console, noise
    # Besides the bars: raycv's lines, MLflow creating its database, Ray's one C++ PreemptionWatcher line (measured:
    # 16). Not counted: the traceback Ray 2.60's placement-group cleaner sometimes prints as the local Ray shuts down
    # (its monitor thread polls the State API of a cluster that is going away; seen once in 4 runs).
    lines = [line for line in console.splitlines()
             if line.strip() and "epoch 1/1" not in line and "(PlacementGroupCleaner pid=" not in line]
    assert len(lines) <= 18, "\n".join(lines)
    # into a pipe, as into a log file, progress comes as plain lines, not a bar redrawn with carriage returns
    assert "\r" not in console and "step/s]" not in console
    assert "epoch 1/1 train_loss=" in console
    assert console.count("\nseconds: start-up ") == 1
    client = MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("raycv-hotdog").experiment_id])[0]
    assert run.info.run_name.startswith("hotdog-1w-")
    assert run.data.tags["raycv.metric"] == "val_acc" and "val_acc" in run.data.tags["mlflow.note.content"]
    inputs = {tag.value: item.dataset for item in run.inputs.dataset_inputs for tag in item.tags}
    assert set(inputs) == {"train", "val"}
    assert json.loads(inputs["train"].source)["uri"] == str(demo_root / "hotdog")
    assert json.loads(inputs["val"].profile)["num_rows"] == 200
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.metrics["seconds_worker_group_to_first_step"] > 0
    images = sorted((demo_root / "hotdog" / "test" / "hotdog").glob("*.png"))[:2]
    out = tmp_path / "predictions"
    _run([str(BIN / "raycv"), "predict", "hotdog", "--model", f"runs:/{run.info.run_id}/model",
          *map(str, images), "--out", str(out), "--tracking-uri", tracking], env)

    records = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert all(r["class"] in ("hotdog", "not-hotdog") and 0.0 <= r["probability"] <= 1.0 for r in records)
    assert (out / "predictions.png").stat().st_size > 0


def test_sigterm_stops_a_run_that_says_how_to_continue_it(demo_root, tmp_path):
    """``kill`` (or a batch scheduler) mid-run: one line naming the run and how to go on, exit 128 + 15, the MLflow
    run KILLED with its epochs, no stack dump from Ray's C++ signal handler, and the command's own Ray gone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [arg for item in HOTDOG_FAST for arg in ("--set", item)]
    cmd = [str(BIN / "raycv"), "train", "hotdog", "--data-root", str(demo_root), "--epochs", "50",
           "--set", "model.weights=scratch", *sets, "--tracking-uri", tracking, "--storage", str(tmp_path / "ray")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own session, which the local Ray it starts inherits
    client = MlflowClient(tracking)
    run_id = first_run_with_metric(client, "raycv-hotdog", "val_acc", _process_output(proc))
    proc.send_signal(signal.SIGTERM)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, console[-3000:]
    [stopped] = _raycv_lines(console)  # Ray forwards the workers' lines late: not always the last one
    assert stopped.startswith("raycv: stopped by SIGTERM after ") and f"--resume {run_id} continues it" in stopped
    assert "SIGTERM received" not in console
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert f"after {len(_epochs_logged(client, run_id))} of 50 epochs" in stopped
    assert _session_processes_left(proc.pid) == [], "the command's local Ray outlived it"


def test_sigterm_while_ray_starts_says_so_and_leaves_no_ray(demo_root, tmp_path):
    """SIGTERM while ``ray.init`` starts the command's local Ray (its GCS up, the rest starting): Ray's own handler,
    installed as ``ray.init`` begins, would exit 15 without a word."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [str(BIN / "raycv"), "train", "hotdog", "--data-root", str(demo_root), "--epochs", "1",
           "--set", "model.weights=scratch", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--storage", str(tmp_path / "ray")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not any("gcs_server" in _name(p) for p in session_processes(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "no local Ray started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, console[-3000:]
    assert _raycv_lines(console) == ["raycv: stopped by SIGTERM while Ray started"], console[-3000:]
    assert _session_processes_left(proc.pid) == [], "the command's local Ray outlived it"


def _name(process) -> str:
    """A psutil process's name, or "" once it has gone."""
    try:
        return process.name()
    except psutil.Error:  # it exited while we looked
        return ""


def test_ctrl_c_stops_the_demo_naming_its_step_with_the_run_killed(ray_cluster, demo_root, tmp_path):
    """Ctrl-C (SIGINT to the command's process group) in a demo step's training: one line naming the step and its
    run, exit 130, the run KILLED. The demo joins the session's cluster ($RAY_ADDRESS)."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(BIN / "raycv"), "demo", "--root", str(demo_root), "--only", "hotdog-source", "--tracking-uri", tracking]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    client = MlflowClient(tracking)
    run_id = first_run_with_metric(client, "raycv-hotdog", "val_acc", _process_output(proc))
    os.killpg(proc.pid, signal.SIGINT)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, console[-3000:]
    [stopped] = _raycv_lines(console)
    assert stopped.startswith("raycv: demo step 1 of 1 (hotdog-source) stopped by SIGINT after "), stopped
    assert f"MLflow run {run_id} is marked KILLED" in stopped and "`raycv demo` starts over" in stopped
    assert "--resume" not in stopped  # raycv demo has no --resume
    assert client.get_run(run_id).info.status == "KILLED"


def _raycv_lines(console: str) -> list[str]:
    """The command's own closing lines (``raycv: ...``) in its console."""
    return [line for line in console.splitlines() if line.startswith("raycv: ")]


def _process_output(proc: subprocess.Popen) -> Callable[[], str | None]:
    """For :func:`first_run_with_metric`: the end of ``proc``'s output once it has exited, None while it runs."""
    return lambda: proc.communicate()[0][-3000:] if proc.poll() is not None else None


def _session_processes_left(session: int, grace_s: float = 30) -> list:
    """Processes still in session ``session`` after up to ``grace_s`` seconds."""
    deadline = time.monotonic() + grace_s
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_sigterm_stops_stylize_and_kills_its_unended_runs(demo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = demo_root / "hotdog" / "train" / "hotdog"
    content, style = sorted(folder.glob("*.png"))[:2]
    cmd = [str(BIN / "raycv"), "stylize", "--content", str(content), "--style", str(style), "--steps", "5000",
           "--size", "48", "48", "--set", "style.log_every=1", "--output-dir", str(tmp_path / "styled"),
           "--tracking-uri", tracking]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = MlflowClient(tracking)
    run_id = first_run_with_metric(client, "raycv-style", "total_loss", _process_output(proc))
    proc.send_signal(signal.SIGTERM)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, console[-3000:]
    assert _raycv_lines(console) == ["raycv: stopped by SIGTERM with 0 of 1 pairs ended: the MLflow runs of the "
                                     "others are marked KILLED"]
    assert client.get_run(run_id).info.status == "KILLED"
    assert _session_processes_left(proc.pid) == [], "the command's local Ray outlived it"
