"""cluster.yaml must be a config `ray up` accepts: checked against Ray's own cluster-launcher schema."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_ray_schema_and_has_what_raycv_needs():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # fills defaults and checks the schema, as `ray up` does
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [n for n, t in node_types.items() if n != config["head_node_type"]]
    assert gpu_types and all(node_types[n]["max_workers"] >= 1 for n in gpu_types)
    setup = "\n".join(config["setup_commands"])
    assert "pip install -e /home/ubuntu/raycv" in setup
    assert "MLFLOW_TRACKING_URI=" in setup and "RAY_AUTH_MODE=token" in setup
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["/home/ubuntu/raycv"] == "."


def test_head_serves_the_dashboard_and_job_api_on_loopback_only():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
