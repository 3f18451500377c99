"""The CIFAR-10 and hotdog tasks: models, weights, param groups, the task interface end to end, learning."""

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from cvtasks.classification import confusion_matrix
from cvtasks.demo import cifar as cifar_demo
from cvtasks.demo import hotdog as hotdog_demo
from cvtasks.models import weights
from cvtasks.models.resnet import cifar_resnet18, finetune_resnet18, head_param_groups
from cvtasks.tasks import get_task
from pipelines.config import load_config
from tests.configs import at_root

LEARN_STEPS = 300
LEARN_BATCH = 32
LEARN_WIDTH = 8


def as_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch as the training loop gets it: writable tensors (decoded arrays may be read-only views)."""
    return {k: torch.as_tensor(np.array(v)) for k, v in batch.items()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    cifar_demo.write(root, seed=0, n_train=2000, n_test=500)
    hotdog_demo.write(root, seed=0, n_train_per_class=4, n_test_per_class=3)
    return root


def task_and_cfg(name, root, **augment):
    cfg = load_config(name)
    cfg = cfg.with_values({"data.root": str(root)})
    cfg = cfg.with_values({f"augment.{key}": value for key, value in augment.items()})
    return get_task(name), cfg


def whole_split(task, cfg, split):
    index = task.index(split, cfg)
    return task.decode({c: index[c].to_numpy() for c in index.columns}, cfg)


# --- models ------------------------------------------------------------------------------------------------------

def test_cifar_resnet18_shapes_and_d2l_structure():
    model = cifar_resnet18(num_classes=10, width=8)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    stem = model[0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    x, sizes = torch.zeros(1, 3, 32, 32), []
    for layer in model[:7]:  # stem conv, BN, ReLU and the four stages
        x = layer(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes[3:] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert sum(len(stage) for stage in model[3:7]) == 8  # 2 residual blocks per stage
    assert cifar_resnet18(num_classes=5, in_channels=1, width=4)(torch.zeros(1, 1, 32, 32)).shape == (1, 5)


def test_finetune_resnet18_scratch_head_and_param_groups():
    model = finetune_resnet18(num_classes=2, weights="scratch")
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    assert model.weights_description.startswith("scratch")
    groups = head_param_groups(model, head_lr_mult=10)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert {id(p) for p in groups[1]["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(groups[0]["params"]) + 2 == len(list(model.parameters()))
    bound = (6 / (512 + 2)) ** 0.5  # xavier-uniform limit for the 512 -> 2 head
    assert model.fc.weight.abs().max() <= bound


def assert_backbone_equal(model, state_dict):
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, state_dict[key]), key


def test_weights_from_state_dict_file_and_checkpoint(tmp_path):
    source = resnet18(num_classes=10)
    sd = source.state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("sd.pt", "ckpt.pt"):
        model = finetune_resnet18(num_classes=3, weights=str(tmp_path / name))
        assert_backbone_equal(model, sd)
        assert model.fc.out_features == 3 and model.weights_description == f"file: {tmp_path / name}"
    loaded, description = weights.resolve_state_dict("scratch", ResNet18_Weights)
    assert loaded is None and description.startswith("scratch")


def test_weights_that_do_not_fit_are_rejected(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit the backbone"):
        finetune_resnet18(num_classes=2, weights=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="neither scratch, imagenet nor an existing file"):
        finetune_resnet18(num_classes=2, weights=str(tmp_path / "missing.pt"))


def test_imagenet_weights_come_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as err:
        finetune_resnet18(num_classes=2, weights="imagenet")
    assert str(expected) in str(err.value) and "ResNet18_Weights.IMAGENET1K_V1" in str(err.value)
    expected.parent.mkdir()
    sd = resnet18().state_dict()
    torch.save(sd, expected)
    model = finetune_resnet18(num_classes=2, weights="imagenet")
    assert_backbone_equal(model, sd)
    assert model.weights_description == f"imagenet: ResNet18_Weights.IMAGENET1K_V1 ({expected})"


# --- tasks -------------------------------------------------------------------------------------------------------

def test_cifar_task_pipeline_shapes(demo_root):
    task, cfg = task_and_cfg("cifar10", demo_root, policy="flip_crop_color")
    assert task.name == "cifar10" and task.metric == "val_acc"
    decoded = whole_split(task, cfg, "val")
    assert decoded["image"].shape == (500, 32, 32, 3) and decoded["label"].dtype == np.int64
    rng = np.random.default_rng(0)
    train = task.augment({k: v[:8] for k, v in decoded.items()}, True, cfg, rng)
    assert train["image"].shape == (8, 3, 32, 32) and train["image"].dtype == np.float32
    assert 0.0 <= train["image"].min() and train["image"].max() <= 1.0  # normalize: none, as d2l
    val = task.augment({k: v[:8] for k, v in decoded.items()}, False, cfg, rng)
    assert np.array_equal(val["image"], decoded["image"][:8].transpose(0, 3, 1, 2) / np.float32(255))
    assert task.class_names(cfg) == list(cifar_demo.CLASS_NAMES)
    cfg = cfg.with_values({"augment.policy": "mixup"})
    with pytest.raises(ValueError, match="Unknown data augmentation policy"):
        task.augment({k: v[:2] for k, v in decoded.items()}, True, cfg, rng)


def test_metrics_summarize_and_artifacts(demo_root):
    task, cfg = task_and_cfg("cifar10", demo_root)
    out = torch.zeros(4, 10)
    out[[0, 1, 2, 3], [3, 1, 1, 7]] = 5.0  # predictions 3, 1, 1, 7
    batch = {"label": torch.tensor([3, 1, 2, 7])}
    sums = task.metric_sums(out, batch, cfg)
    assert float(sums["correct"]) == 3 and float(sums["count"]) == 4
    assert sums["confusion"][2, 1] == 1 and sums["confusion"].sum() == 4 and sums["confusion"].trace() == 3
    doubled = {k: v + sums[k] for k, v in sums.items()}  # additive over batches and workers
    assert task.summarize(doubled, cfg) == {"acc": 0.75}
    loss, parts = task.loss(out, batch, cfg)
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(out, batch["label"]).item()) and parts == {}
    report = task.extra_artifacts(nn.Identity(), sums, cfg)["metrics/val_confusion.json"]
    assert report["classes"][2] == "square" and report["per_class_acc"][2] == 0.0
    assert report["per_class_acc"][3] == 1.0 and report["rows_true_cols_predicted"][2][1] == 1
    assert torch.equal(confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 1]), 2),
                       torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # rows true, columns predicted


def test_renders_are_captioned_grids(demo_root):
    task, cfg = task_and_cfg("cifar10", demo_root)
    decoded = whole_split(task, cfg, "val")
    batch = task.augment({k: v[:10] for k, v in decoded.items()}, True, cfg, np.random.default_rng(0))
    inputs = task.render_inputs(batch, cfg)
    assert isinstance(inputs, Image.Image) and inputs.width > 8 * 96 and inputs.height > 2 * 96
    model = cifar_resnet18(width=4).eval()
    tensors = as_tensors(batch)
    predictions = task.render_predictions(model, tensors, cfg)
    assert predictions.height > inputs.height  # two caption lines instead of one


def test_hotdog_task_pipeline_model_and_groups(demo_root):
    task, cfg = task_and_cfg("hotdog", demo_root, size=64, resize_size=72)
    cfg = cfg.with_values({"model.weights": "scratch"})
    assert task.class_names(cfg) == ["hotdog", "not-hotdog"]
    decoded = whole_split(task, cfg, "train")
    assert decoded["keep"].all() and decoded["image"].dtype == object and len(decoded["label"]) == 8
    rng = np.random.default_rng(0)
    for train in (True, False):
        batch = task.augment(decoded, train, cfg, rng)
        assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == np.float32
    assert batch["image"].min() < 0  # ImageNet-normalised
    model = task.build_model(cfg)
    assert model.fc.out_features == 2
    groups = task.param_groups(model, cfg)
    assert [g["lr_mult"] for g in groups] == [1.0, cfg.optim.head_lr_mult] == [1.0, 10.0]
    rendered = task.render_predictions(model.eval(), as_tensors(batch), cfg)
    assert isinstance(rendered, Image.Image)


def test_hotdog_skip_bad_marks_rows_instead_of_failing(demo_root, tmp_path):
    task, cfg = task_and_cfg("hotdog", demo_root)
    index = task.index("val", at_root(cfg, str(demo_root)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    paths = np.array([index["path"][0], str(bad)], dtype=object)
    batch = {"path": paths, "label": np.array([0, 1])}
    with pytest.raises(Exception, match="bad.png"):
        task.decode(batch, cfg)
    cfg = cfg.with_values({"data.skip_bad": True})
    assert task.decode(batch, cfg)["keep"].tolist() == [True, False]


def test_hotdog_dataset_folder_is_config(demo_root):
    hotdog_demo.write_source(demo_root, n_train_per_class=1, n_test_per_class=1)
    task, cfg = task_and_cfg("hotdog", demo_root)
    cfg = cfg.with_values({"data.dataset": "hotdog-source"})
    cfg = cfg.with_values({"model.weights": "scratch"})
    assert len(task.class_names(cfg)) == 10 and task.build_model(cfg).fc.out_features == 10


def test_cifar_task_learns_demo_data(demo_root):
    """A plain torch loop over the task's own decode/augment/loss: well above chance (10 %) in a few hundred steps."""
    torch.manual_seed(0)
    task, cfg = task_and_cfg("cifar10", demo_root)
    cfg = cfg.with_values({"model.width": LEARN_WIDTH})
    train, val = whole_split(task, cfg, "train"), whole_split(task, cfg, "val")
    model = task.build_model(cfg)
    optimizer = torch.optim.Adam(task.param_groups(model, cfg)[0]["params"], lr=3e-3)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(LEARN_STEPS):
        pick = rng.integers(0, len(train["label"]), LEARN_BATCH)
        batch = task.augment({k: v[pick] for k, v in train.items()}, True, cfg, rng)
        tensors = as_tensors(batch)
        loss, _ = task.loss(task.forward(model, tensors), tensors, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    batch = as_tensors(task.augment(val, False, cfg, rng))
    with torch.no_grad():
        acc = task.summarize(task.metric_sums(task.forward(model, batch), batch, cfg), cfg)["acc"]
    print(f"cifar demo learning check: val_acc {acc:.3f} after {LEARN_STEPS} steps "
          f"in {time.perf_counter() - started:.1f} s")
    assert acc > 0.4
