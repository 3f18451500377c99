"""benchmarks/gpu.sh without a GPU (one clear line, nothing run) and benchmarks/gpu_report.py's table read back from
an MLflow store shaped like the script's runs. The script itself is run on CPU by ``RAYCV_GPU_DRY_RUN=1``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import ensure_experiment, experiment_name

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.sh"


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report", REPO / "benchmarks" / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: it would benchmark")
def test_gpu_script_stops_in_one_line_without_a_gpu(tmp_path):
    env = {**os.environ, "RAYCV_BIN": f"{sys.executable} -m pipelines", "PYTHON": sys.executable,
           "RAYCV_GPU_WORK": str(tmp_path / "work")}
    env.pop("RAYCV_GPU_DRY_RUN", None)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); "
                                          "RAYCV_GPU_DRY_RUN=1 runs the same commands on CPU"]
    assert not (tmp_path / "work").exists()


def test_gpu_report_reads_last_epochs_and_style_rates(tmp_path):
    report = _report_module()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    for task, rates in {"cifar10": [900.0, 1200.0, 1182.5], "voc": [50.0]}.items():
        run = client.create_run(ensure_experiment(client, experiment_name(task)))
        for epoch, rate in enumerate(rates):
            client.log_metric(run.info.run_id, "examples_per_sec", rate, step=epoch)
        client.set_terminated(run.info.run_id)
    style = ensure_experiment(client, experiment_name("style"))
    for seconds in (2.0, 4.0):
        run = client.create_run(style, tags={"raycv.kind": "stylize"})
        client.log_param(run.info.run_id, "style.steps", "200")
        client.log_metric(run.info.run_id, "wall_seconds", seconds)
        client.set_terminated(run.info.run_id)
    status = tmp_path / "status.tsv"
    status.write_text("cifar10\tok\t63\nvoc\ttimed out\t120\nstyle\tok\t30\n")
    out = tmp_path / "results.md"

    assert report.main(["--tracking-uri", uri, "--status", str(status), "--out", str(out), "--device", "H200"]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| task")}
    assert rows["cifar10"][1:8] == ["1,182", "900", "3", "4,729 on 2 GPUs", "2,364", "0.5", "ok 63 s"]
    assert rows["voc"][1:8] == ["50", "50", "1", "227 on 1 GPU", "227", "0.22", "timed out 120 s"]
    assert rows["hotdog"][1] == "-" and rows["hotdog"][7] == "not run" and "no MLflow run" in rows["hotdog"][8]
    assert rows["style (steps/sec)"][1] == "75"  # mean of 200/2 and 200/4
    assert "Device: H200." in out.read_text()
