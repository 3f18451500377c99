"""The worker's named steps (pipelines.steps) called directly, without Ray, on the test-defined tiny task."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

from cvtasks import tasks as registry
from cvtasks.demo import cifar as demo_cifar
from cvtasks.tasks import get_task
from pipelines.config import load_config
from pipelines.steps import (
    _autocast,
    channels_last_inputs,
    channels_last_model,
    epoch_metrics,
    evaluate,
    make_optimizer,
    train_one_epoch,
)
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


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A small CIFAR-10 demo set: 3-channel images (the tiny task's single channel has no NHWC layout to test)."""
    root = tmp_path_factory.mktemp("cifar")
    demo_cifar.write(root, n_train=64, n_test=32)
    return root


def _nhwc(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_channels_last_changes_the_layout_not_the_results(monkeypatch, cifar_root):
    """train.channels_last is applied on CPU too (a layout change only): CIFAR-10's task and model (width 8, with
    batch norm) give the same losses and metrics. In float64, so that only the layout differs: in float32 the two
    layouts' kernels round differently and the gradients of the conv biases ahead of batch norm (zero up to
    rounding) point anywhere, which training then magnifies (val loss 3e-4 apart after two steps)."""
    seen: list[torch.Tensor] = []
    cls = type(get_task("cifar10"))
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, model, batch: seen.append(batch["image"])
                        or forward(self, model, batch))

    def run(channels_last: bool) -> tuple[list[float], dict[str, float], nn.Module]:
        cfg = load_config("cifar10", overrides=[f"data.root={cifar_root}", "model.width=8", "optim.name=sgd",
                                                "optim.lr=0.05", f"train.channels_last={str(channels_last).lower()}"])
        task, device = get_task("cifar10"), torch.device("cpu")
        torch.manual_seed(0)
        model = channels_last_model(task.build_model(cfg).double(), cfg.train.channels_last)
        optimizer = make_optimizer(task.param_groups(model, cfg), cfg.optim)
        train_batches, val_batches = (
            [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in split]
            for split in (batches(task, cfg, "train", True, 32), batches(task, cfg, "val", False, 32)))
        passes = [evaluate(task, model, val_batches, cfg, device),
                  train_one_epoch(task, model, optimizer, train_batches, cfg, device),
                  evaluate(task, model, val_batches, cfg, device)]
        losses = [float(p.loss["loss_sum"] / p.loss["loss_count"]) for p in passes]
        return losses, {k: float(v.sum()) for k, v in passes[-1].metrics.items()}, model

    plain, plain_val, plain_model = run(False)
    assert seen and not any(_nhwc(x) for x in seen)
    seen.clear()
    nhwc, nhwc_val, nhwc_model = run(True)
    assert seen and all(_nhwc(x) for x in seen)
    convs = [m.weight for m in nhwc_model.modules() if isinstance(m, nn.Conv2d)]
    # 1x1 kernels are contiguous in both layouts; the 3x3 ones show the conversion.
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs) and any(_nhwc(w) for w in convs)
    assert not any(_nhwc(m.weight) for m in plain_model.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(nhwc, plain, rtol=1e-9, atol=0.0)
    assert nhwc_val == plain_val


def test_amp_is_a_no_op_on_cpu(monkeypatch, tmp_path):
    """train.amp on CPU: no autocast, so bit-identical losses (bfloat16 autocast is for GPUs only)."""
    assert isinstance(_autocast(torch.device("cpu"), True), contextlib.nullcontext)
    monkeypatch.setitem(registry.TASKS, "tiny", f"{TinyTask.__module__}:{TinyTask.__name__}")
    write(tmp_path)
    task, device = TinyTask(), torch.device("cpu")
    results = []
    for amp in ("false", "true"):
        cfg = load_config("tiny", overrides=[f"data.root={tmp_path}", f"train.amp={amp}"])
        torch.manual_seed(0)
        model = task.build_model(cfg)
        optimizer = make_optimizer(task.param_groups(model, cfg), cfg.optim)
        train = train_one_epoch(task, model, optimizer, batches(task, cfg, "train", True, 32), cfg, device)
        val = evaluate(task, model, batches(task, cfg, "val", False, 64), cfg, device)
        results.append((train.loss, val.loss, val.metrics))
    for plain, amp in zip(*results, strict=True):
        assert plain.keys() == amp.keys() and all(torch.equal(plain[k], amp[k]) for k in plain)


def test_channels_last_inputs_converts_only_4d_float_tensors():
    batch = {"image": torch.rand(2, 3, 4, 5), "mask": torch.zeros(2, 4, 5, dtype=torch.long),
             "ids": torch.zeros(2, 3, 4, 5, dtype=torch.uint8)}
    assert channels_last_inputs(batch, False) is batch
    out = channels_last_inputs(batch, True)
    assert _nhwc(out["image"])
    assert torch.equal(out["image"], batch["image"]) and out["mask"] is batch["mask"] and out["ids"] is batch["ids"]


@pytest.mark.parametrize("name", ["cifar10", "hotdog", "banana", "voc"])
def test_every_task_model_runs_channels_last(name):
    """Each Ray Train task's model (at small sizes) gives the same outputs with NHWC weights and inputs, so a GPU
    run's channels-last path has no view of a non-contiguous tensor."""
    from cvtasks.models.fcn import build_fcn
    from cvtasks.models.resnet import cifar_resnet18, finetune_resnet18
    from cvtasks.models.ssd import TinySSD

    build, shape = {"cifar10": (lambda: cifar_resnet18(10, width=8), (2, 3, 32, 32)),
                    "hotdog": (lambda: finetune_resnet18(2, "scratch"), (2, 3, 64, 64)),
                    "banana": (lambda: TinySSD(1, width=0.25), (2, 3, 64, 64)),
                    "voc": (lambda: build_fcn(21, "scratch"), (2, 3, 64, 96))}[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(shape)
    with torch.no_grad():
        expected = model(x)
        nhwc = channels_last_model(copy.deepcopy(model), True)
        got = nhwc(channels_last_inputs({"image": x}, True)["image"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
