"""The worker's named steps (pipelines.steps) called directly, without Ray, on the test-defined tiny task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cvtasks import tasks as registry
from pipelines.config import load_config
from pipelines.steps import epoch_metrics, evaluate, make_optimizer, train_one_epoch
from tests.tiny.task import TinyTask, write


def batches(task: TinyTask, cfg: dict, split: str, train: bool, size: int) -> list[dict[str, torch.Tensor]]:
    index = task.index(split, cfg)
    decoded = task.decode({c: index[c].to_numpy() for c in index.columns}, cfg)
    arrays = task.augment(decoded, train, cfg, np.random.default_rng(0))
    return [{k: torch.from_numpy(v[i : i + size]) for k, v in arrays.items()} for i in range(0, len(index), size)]


def test_train_one_epoch_evaluate_and_epoch_metrics(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TASKS, "tiny", f"{TinyTask.__module__}:{TinyTask.__name__}")
    write(tmp_path)
    cfg = load_config("tiny", overrides=[f"data.root={tmp_path}"])
    task, device = TinyTask(), torch.device("cpu")
    torch.manual_seed(0)
    model = task.build_model(cfg)
    optimizer = make_optimizer(task.param_groups(model, cfg), cfg.optim)
    train_batches, val_batches = batches(task, cfg, "train", True, 32), batches(task, cfg, "val", False, 64)
    first: list[dict[str, torch.Tensor]] = []
    steps: list[int] = []

    before = evaluate(task, model, val_batches, cfg, device, on_first_batch=first.append)
    for _ in range(4):
        train = train_one_epoch(task, model, optimizer, train_batches, cfg, device,
                                on_step=lambda n, loss: steps.append(n))
    after = evaluate(task, model, val_batches, cfg, device)

    assert first[0] is val_batches[0] and not model.training
    assert train.examples == 256 and sum(steps) == 4 * 256 and train.seconds > 0
    metrics, val_sums = epoch_metrics(task, cfg, train, after, world=1, device=device)
    assert set(metrics) == {"train_loss", "train_loss_ce", "train_acc", "val_loss", "val_loss_ce", "val_acc",
                            "examples_per_sec"}
    assert metrics["examples_per_sec"] == pytest.approx(train.examples / train.seconds)
    assert float(val_sums["count"]) == 64
    assert metrics["val_acc"] > 0.9 > task.summarize(before.metrics, cfg)["acc"]
