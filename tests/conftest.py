"""Session-wide real services: one two-node Ray cluster, one S3 server and one MLflow server (artifacts on S3) for
the whole test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.services import (
    enable_token_auth,
    start_mlflow_server,
    start_ray_cluster,
    start_s3_server,
    stop_mlflow_server,
    stop_ray_cluster,
    stop_s3_server,
)

# Tests report no usage statistics. This also keeps Ray Data's usage poller from querying a Prometheus server
# that is not there and logging the failures while the interpreter shuts down.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Commands the tests run without an address start a local Ray, not join a `raycv cluster up` of the developer's.
os.environ["RAYCV_CLUSTER_FILE"] = str(Path(tempfile.mkdtemp(prefix="raycv-cluster-")) / "cluster.json")
# Before any test module imports ray (which reads the auth mode once): the session's cluster requires a token.
RAY_AUTH_ENV = enable_token_auth(Path(tempfile.mkdtemp(prefix="raycv-auth-")))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1; this process (the tests' driver) reaches it through ``AWS_ENDPOINT_URL``."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop_s3_server(server)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Two Ray nodes on 127.0.0.1 (``ray start --head`` + ``ray start --address``) with token auth, every node
    configured for the S3 server; this process is connected to it as a driver."""
    import ray

    # Every node's environment as cluster.yaml sets it: token auth, S3 access, checkpoint storage on S3 (jobs run
    # with their node's environment, not the submitter's).
    cluster = start_ray_cluster({**RAY_AUTH_ENV, **s3_server.env, "RAYCV_STORAGE": s3_server.uri("raycv")})
    os.environ["RAY_ADDRESS"] = cluster.gcs_address
    ray.init(address=cluster.gcs_address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    stop_ray_cluster(cluster)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """``mlflow server`` with a SQLite store whose artifacts (models, pictures) go to the S3 server."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server.uri("mlflow"), s3_server.env)
    yield server
    stop_mlflow_server(server)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo datasets, written once per session (small sizes where the writers allow)."""
    from pipelines.data_commands import make_demo

    root = tmp_path_factory.mktemp("demo-data")
    make_demo(root, seed=0)
    return root


@pytest.fixture(scope="session")
def s3_demo_root(s3_server, demo_root):
    """The demo datasets the training tasks read, uploaded to ``s3://<bucket>/datasets``."""
    from cvtasks import storage

    root = s3_server.uri("datasets")
    for folder in ("cifar-10-batches-py", "hotdog", "banana-detection", "VOCdevkit"):
        storage.upload_tree(demo_root / folder, storage.join(root, folder))
    return root
