"""``raycv cluster up / status / down``: a local Ray kept running between commands, joined by commands without an
address, stopped without touching any other Ray on the machine (the session's two-node cluster keeps running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipelines import warm_cluster
from pipelines.failures import RunError

BIN = Path(sys.executable).parent
#: What a new shell of the same user has: no address, no auth settings (joining takes them from the state file).
SHELL_ONLY = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _raycv(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "raycv"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def state_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cluster.json"
    monkeypatch.setenv(warm_cluster.STATE_FILE_ENV, str(path))
    return path


def test_a_recorded_cluster_that_does_not_answer_is_not_joined_and_down_clears_it(state_file, tmp_path):
    gone = warm_cluster.WarmCluster(address=f"127.0.0.1:{warm_cluster.free_port()}", dashboard_url="http://x",
                                    cpus=2, session=2**22 + 7, temp_dir=str(tmp_path / "ray"), auth_mode="token",
                                    token_path=None)
    state_file.write_text(json.dumps(gone.__dict__))
    assert warm_cluster.recorded() == gone and warm_cluster.running() is None
    assert warm_cluster.join_if_running() is None
    status = _raycv(["cluster", "status"], dict(os.environ))
    assert status.returncode == 1 and "does not answer" in status.stdout
    assert warm_cluster.down() == (gone, 0) and not state_file.exists()
    assert warm_cluster.down() is None


def test_down_leaves_a_session_that_is_not_the_heads_alone(state_file, tmp_path):
    """After a reboot the recorded session id may belong to someone else's processes: they are not touched."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a session leader, as `ray start` was
    try:
        reused = warm_cluster.WarmCluster(address=f"127.0.0.1:{warm_cluster.free_port()}", dashboard_url="http://x",
                                          cpus=2, session=other.pid, temp_dir=str(tmp_path / "ray"), auth_mode="token",
                                          token_path=None)
        state_file.write_text(json.dumps(reused.__dict__))
        assert warm_cluster.down() == (reused, 0) and not state_file.exists()
        assert other.poll() is None  # still running
    finally:
        other.kill()
        other.wait()


def test_a_state_file_that_is_not_one_names_itself(state_file):
    state_file.write_text("{not json")
    with pytest.raises(RunError, match=f"{state_file}: not a raycv cluster file"):
        warm_cluster.recorded()


@pytest.mark.slow
def test_up_then_a_train_without_address_joins_it_then_down_stops_only_its_processes(ray_cluster, demo_root,
                                                                                     tmp_path, state_file):
    env = {**os.environ, warm_cluster.STATE_FILE_ENV: str(state_file)}
    up = _raycv(["cluster", "up", "--num-cpus", "2"], env)
    assert up.returncode == 0, up.stderr[-3000:]
    cluster = warm_cluster.recorded()
    try:
        assert up.stdout.startswith(f"started a local Ray for raycv at {cluster.address} with 2 CPUs")
        assert _raycv(["cluster", "up"], env).stdout.startswith("already up:")
        assert _raycv(["cluster", "status"], env).returncode == 0

        shell = {key: value for key, value in env.items() if key not in SHELL_ONLY}
        trained = _raycv(["train", "hotdog", "--data-root", str(demo_root), "--epochs", "1", "--set",
                          "model.weights=scratch", "--set", "augment.size=32", "--set", "augment.resize_size=36",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage",
                          str(tmp_path / "ray_results")], shell, timeout=600)
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert f"joining the local Ray of `raycv cluster up` at {cluster.address}" in trained.stderr
        # Without RAY_ADDRESS (the session cluster's, in this process's environment), which `ray list` would ask.
        ray_env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
        drivers = subprocess.run([str(BIN / "ray"), "list", "jobs", "--address", cluster.address, "--format", "json"],
                                 env=ray_env, capture_output=True, text=True, timeout=120, check=True)
        [job] = json.loads(drivers.stdout)  # the run's driver ran on the warm cluster
        assert job["status"] == "SUCCEEDED" and "raycv train hotdog" in job["entrypoint"]
    finally:
        down = _raycv(["cluster", "down"], env)
    assert down.returncode == 0 and down.stdout.startswith(f"stopped the raycv cluster at {cluster.address}")
    assert not [p for p in psutil.process_iter() if _session_of(p) == cluster.session]
    assert [p for p in psutil.process_iter() if _session_of(p) == ray_cluster.head_session]  # still running
    assert not state_file.exists() and not Path(cluster.temp_dir).exists()
    assert _raycv(["cluster", "status"], env).returncode == 1


def _session_of(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None
