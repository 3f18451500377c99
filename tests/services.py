"""Real services for the tests, all on 127.0.0.1: a two-node Ray cluster with token authentication, an
S3-compatible object store (moto's server) and an MLflow tracking server whose artifacts live in that store.

Each is started as a user would start it (``ray start --head`` and ``ray start --address``, ``moto_server``,
``mlflow server --artifacts-destination s3://...``), each in its own session (process group), and stopped by
killing exactly the processes of that session, never another Ray or server on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipelines.warm_cluster import free_port, session_processes, signal_processes

BIN = Path(sys.executable).parent
#: Logical CPUs each of the test cluster's two nodes advertises: Ray Train workers and Ray Data tasks must fit side
#: by side on a 2-core machine (the cores are shared, only the scheduler's bookkeeping is raised).
NODE_CPUS = 2
#: A custom resource every node has one of: workers that each ask for one land on distinct nodes.
NODE_SLOT = "raycv_node_slot"
S3_BUCKET = "raycv-test"


def wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what every node and client needs: token auth, the S3 endpoint and credentials
    temp_dir: Path  # parent of each node's own Ray temp dir (separate, as on separate machines)
    head_session: int  # session id of the head node's processes
    worker_sessions: list[int]  # session ids of the other nodes' processes, one per node, oldest first


def enable_token_auth(workdir: Path) -> dict[str, str]:
    """Write a fresh Ray auth token and switch this process (and its children) to token auth.

    Must run before ``ray`` is first imported: Ray reads the auth mode once, at import.
    """
    token = workdir / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    os.environ.update(env)
    return env


def _ray_start(args: list[str], env: dict[str, str], gcs_address: str) -> int:
    """Run ``ray start ARGS`` as the leader of a new session; returns that session's id.

    Ray's daemons (GCS, raylet, agents, and the worker processes a raylet forks) inherit the session, so a node is
    stopped, or lost on purpose, by killing exactly that session's processes.
    """
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}",
         f"--resources={json.dumps({NODE_SLOT: 1})}", "--disable-usage-stats", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # RAY_ADDRESS: Ray's own helper processes that call ray.init() find this cluster even where other Ray
        # instances run on the same machine.
        env={**os.environ, **env, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": gcs_address},
    )
    output, _ = process.communicate(timeout=180)
    if process.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{output[-3000:]}")
    return process.pid


def start_ray_cluster(env: dict[str, str]) -> RayCluster:
    """A head and one more node joined with ``ray start --address``, each with ``NODE_CPUS`` CPUs and one
    ``NODE_SLOT``; ``env`` (token auth, S3) is the environment of every node, so jobs and workers inherit it and
    find this virtualenv's ``raycv`` on PATH."""
    # Short: Ray's unix sockets live under it and socket paths are limited to ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="raycv-ray-"))
    port, dash = free_port(), free_port()
    gcs = f"127.0.0.1:{port}"
    from pipelines.local_ray import worker_pool_config  # imports ray: not before enable_token_auth

    # The head's system config, which every node joining it takes: as raycv's own local Ray has it.
    pool = json.dumps(worker_pool_config(NODE_CPUS))
    head = _ray_start(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                       f"--temp-dir={temp_dir / 'head'}", f"--system-config={pool}"], env, gcs)
    cluster = RayCluster(gcs_address=gcs, dashboard_url=f"http://127.0.0.1:{dash}", env=env, temp_dir=temp_dir,
                         head_session=head, worker_sessions=[])
    add_ray_node(cluster)
    return cluster


def add_ray_node(cluster: RayCluster) -> int:
    """Join one more node to ``cluster`` (``ray start --address``); returns its session id.

    Each node has a temp dir of its own, as on its own machine: nodes sharing one would share the runtime-env
    agents' package folders, where one node's agent deletes what a job on another node runs in.
    """
    temp_dir = cluster.temp_dir / f"node{len(cluster.worker_sessions) + 1}"
    session = _ray_start([f"--address={cluster.gcs_address}", f"--temp-dir={temp_dir}"], cluster.env,
                         cluster.gcs_address)
    cluster.worker_sessions.append(session)
    return session


def kill_session(session: int, sig: int = signal.SIGKILL) -> int:
    """Signal every process of ``session`` (one Ray node, or a server); returns how many there were."""
    procs = session_processes(session)
    signal_processes(procs, sig, grace_s=15)
    return len(procs)


def stop_ray_cluster(cluster: RayCluster) -> None:
    """Stop this cluster's nodes only (``ray stop`` would also stop any other Ray on the machine)."""
    for session in [*cluster.worker_sessions, cluster.head_session]:
        kill_session(session, signal.SIGTERM)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    env: dict[str, str]  # what every client needs: endpoint and (dummy) credentials

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def start_s3_server(workdir: Path) -> S3Server:
    """moto's S3-compatible server on 127.0.0.1 with one bucket; clients reach it through ``AWS_ENDPOINT_URL``
    (boto3 and pyarrow's S3 filesystem both honour it) with dummy credentials."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "s3-server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "raycv-test",
           "AWS_SECRET_ACCESS_KEY": "raycv-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited; see {workdir / 's3-server.log'}")
        with urllib.request.urlopen(endpoint, timeout=2) as response:
            return response.status == 200

    wait_for(healthy, f"S3 server on {endpoint}")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="raycv-test", aws_secret_access_key="raycv-test",
                 region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
    return S3Server(endpoint=endpoint, bucket=S3_BUCKET, process=process, env=env)


def stop_s3_server(server: S3Server) -> None:
    kill_session(server.process.pid, signal.SIGTERM)


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen


def start_mlflow_server(workdir: Path, artifacts: str, env: dict[str, str]) -> MlflowServer:
    """``mlflow server`` proxying artifacts to ``artifacts`` (an ``s3://`` URI), with the store's ``env``."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", artifacts, "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited; see {workdir / 'mlflow-server.log'}")
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200

    wait_for(healthy, f"mlflow server on {url}", timeout=120)
    return MlflowServer(url=url, process=process)


def stop_mlflow_server(server: MlflowServer) -> None:
    kill_session(server.process.pid, signal.SIGTERM)
