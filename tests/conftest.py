"""Session-wide real services: one Ray cluster and one MLflow server for the whole test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.services import (
    enable_token_auth,
    start_mlflow_server,
    start_ray_cluster,
    stop_mlflow_server,
    stop_ray_cluster,
)

# Tests report no usage statistics. This also keeps Ray Data's usage poller from querying a Prometheus server
# that is not there and logging the failures while the interpreter shuts down.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Before any test module imports ray (which reads the auth mode once): the session's cluster requires a token.
RAY_AUTH_ENV = enable_token_auth(Path(tempfile.mkdtemp(prefix="raycv-auth-")))


@pytest.fixture(scope="session")
def ray_cluster():
    """A `ray start --head` cluster on 127.0.0.1 with token auth; this process is connected to it as a driver."""
    import ray

    cluster = start_ray_cluster(RAY_AUTH_ENV)
    os.environ["RAY_ADDRESS"] = cluster.gcs_address
    ray.init(address=cluster.gcs_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    stop_ray_cluster(cluster)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_mlflow_server(server)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo datasets, written once per session (small sizes where the writers allow)."""
    from pipelines.datasets import make_demo

    root = tmp_path_factory.mktemp("demo-data")
    make_demo(root, seed=0)
    return root
