"""Style transfer end to end: a demo-sized stylisation on CPU, the pairs on a real Ray cluster logging to a real
MLflow server, and a tiny sweep through ``raycv tune``'s machinery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cvtasks.style import StyleConfig, content_loss, demo_image, preprocess, seeded_extractor, stylize
from pipelines.config import load_config

pytestmark = pytest.mark.slow

#: Small enough for ~1 minute on 2 CPU cores; weights "random" so the numbers do not depend on the torch hub cache.
DEMO_SIZE = (64, 96)
DEMO_STEPS = 200
TINY = ["style.size=[32, 48]", "style.weights=random", "scaling.cpus_per_worker=1"]


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads spin against other processes (measured 4x
    the CPU time per step under load); one thread takes ~0.14 CPU-s per 64x96 step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_stylisation_cuts_style_loss_and_keeps_content_bounded(one_thread):
    cfg = StyleConfig(size=DEMO_SIZE, steps=DEMO_STEPS, log_every=DEMO_STEPS // 2, weights="random")
    content = demo_image("chelsea")
    extractor = seeded_extractor(cfg)
    started = time.perf_counter()
    results = list(stylize(content, demo_image("immunohistochemistry"), cfg, extractor=extractor))
    wall = time.perf_counter() - started
    with torch.no_grad():  # the content loss of an unrelated photo: the scale "bounded" is measured against
        target, _ = extractor.extract(preprocess(content, cfg.size))
        unrelated, _ = extractor.extract(preprocess(demo_image("astronaut"), cfg.size))
    unrelated_loss = content_loss(unrelated[0], target[0]).item()
    first, middle, last = results[0], results[DEMO_STEPS // 2 - 1], results[-1]
    factor = first.terms["style"] / last.terms["style"]
    print(f"\n{DEMO_SIZE} x {DEMO_STEPS} steps in {wall:.0f} s: raw style {first.terms['style']:.3g} -> "
          f"{last.terms['style']:.3g} (x{factor:.0f} lower), raw content 0 -> {last.terms['content']:.3g} "
          f"(astronaut: {unrelated_loss:.3g}), total {first.losses['total']:.3g} -> {last.losses['total']:.3g}")
    assert factor > 10
    # Content: the image starts as the content image (loss 0); it drifts, but stays far closer to it than an
    # unrelated photo is, and has levelled off rather than still growing.
    assert first.terms["content"] == 0.0
    assert 0 < last.terms["content"] < 0.5 * unrelated_loss
    assert last.terms["content"] < 1.5 * middle.terms["content"]
    assert last.losses["total"] < 0.5 * first.losses["total"]
    assert last.image is not None and last.image.size == (DEMO_SIZE[1], DEMO_SIZE[0])


def test_pairs_run_as_ray_tasks_and_log_to_mlflow(ray_cluster, mlflow_server, tmp_path):
    from pipelines.style import INPUT_FILES, RESULT_FILE, load_pairs, run_pairs

    cfg = load_config("style", overrides=[*TINY, "style.steps=6", "style.log_every=3"])
    cfg = cfg.with_values({"style.pairs": [["skimage:chelsea", "skimage:brick"],
                                           ["skimage:coffee", "skimage:immunohistochemistry"]]})
    outcomes = run_pairs(cfg, load_pairs(cfg), mlflow_server.url, tmp_path / "out")
    assert [o.error for o in outcomes] == [None, None]
    client = MlflowClient(mlflow_server.url)
    for outcome in outcomes:
        assert Path(outcome.output).is_file() and not outcome.pretrained
        run = client.get_run(outcome.run_id)
        assert run.info.status == "FINISHED"
        assert client.get_experiment(run.info.experiment_id).name == "raycv-style"
        tags = run.data.tags
        assert tags["raycv.weights"].startswith("random-init") and tags["raycv.weights_pretrained"] == "false"
        assert "Random-init" in tags["mlflow.note.content"]
        assert tags["raycv.content"] == outcome.content and run.data.params["loss.style_weight"] == "10000.0"
        assert json_pairs(run.data.params["style.pairs"]) == [[outcome.content, outcome.style]]
        for key in ("content_loss", "style_loss", "tv_loss", "total_loss", "ref_loss"):
            assert [m.step for m in client.get_metric_history(outcome.run_id, key)] == [1, 2, 3, 4, 5, 6], key
        files = {a.path for folder in (None, "images", "inputs") for a in client.list_artifacts(outcome.run_id, folder)}
        assert {"images/step_00003.png", "images/step_00006.png", RESULT_FILE, *INPUT_FILES} <= files


def test_style_sweep_ranks_by_ref_loss_and_logs_a_contact_sheet(ray_cluster, mlflow_server, tmp_path):
    from pipelines.tune import run_sweep

    cfg = load_config("style", overrides=[*TINY, "style.size=[32, 32]", "style.steps=4", "style.log_every=1"])
    outcome = run_sweep(cfg, mlflow_server.url, num_samples=3, scheduler="asha", max_concurrent=3,
                        storage=str(tmp_path / "ray"))
    assert outcome.metric == "ref_loss" and outcome.registered_version is None
    values = [t["ref_loss"] for t in outcome.trials]
    assert len(values) == 3 and outcome.best_metric == min(values)
    client = MlflowClient(mlflow_server.url)
    assert "contact_sheet.png" in {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    children = {t["run_id"] for t in outcome.trials}
    assert None not in children and len(children) == 3
    statuses = {client.get_run(run_id).info.status for run_id in children}
    assert "FINISHED" in statuses and statuses <= {"FINISHED", "KILLED"}


def json_pairs(value: str) -> list:
    import json

    return json.loads(value)
