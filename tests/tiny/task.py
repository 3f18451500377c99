"""A task defined outside cvtasks and pipelines, registered at test time: the proof that the Task interface and
the task's own declarations (dataset, demo writer, config file, demo step) are all a new task needs.

"Which side": 16x16 grey images with a bright square on the left or the right half; the label is the side. Its
on-disk format is its own: ``tiny-sides/<split>.npz`` holding ``images`` (N, 16, 16) uint8 and ``labels`` (N,).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cvtasks.catalog import Dataset, DemoStep
from cvtasks.errors import DataFormatError
from cvtasks.settings import Section
from cvtasks.tasks.base import Batch, Config, Task, TensorBatch

FOLDER = "tiny-sides"
SIZE = 16
SPLITS = {"train": 256, "val": 64}


def write(root: str | Path, seed: int = 0) -> None:
    """The demo writer: ``root/tiny-sides/{train,val}.npz``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        labels = rng.integers(0, 2, count)
        images = rng.integers(0, 60, (count, SIZE, SIZE)).astype(np.uint8)
        for image, label in zip(images, labels):
            top, left = rng.integers(0, SIZE - 5), rng.integers(0, SIZE // 2 - 5) + label * (SIZE // 2)
            image[top : top + 5, left : left + 5] = 230
        np.savez(folder / f"{split}.npz", images=images, labels=labels)


@dataclass(frozen=True)
class TinyModel(Section):
    width: int  # channels of its one convolution


class TinyTask(Task):
    name = "tiny"
    metric = "val_acc"
    sections = {"model": TinyModel}
    config_file = Path(__file__).with_name("tiny.yaml")
    datasets = (Dataset("tiny-sides", FOLDER, demo_writer=f"{__name__}:write"),)
    demo_steps = (DemoStep("tiny", "tiny", ("train.epochs=1",)),)

    def index(self, split: str, cfg: Config) -> pd.DataFrame:
        path = Path(cfg.data.root) / FOLDER / f"{split}.npz"
        if not path.is_file():
            raise DataFormatError(str(path), "missing (raycv data make-demo --only tiny-sides writes it)")
        with np.load(path) as data:
            return pd.DataFrame({"pixels": list(data["images"].reshape(len(data["labels"]), -1)),
                                 "label": data["labels"].astype(np.int64)})

    def decode(self, batch: Batch, cfg: Config) -> Batch:
        images = np.stack(list(batch["pixels"])).reshape(-1, SIZE, SIZE).astype(np.uint8)
        return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)}

    def augment_pixels(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        images = batch["image"][..., None].copy()  # (N, H, W, 1) uint8: the model sees them / 255
        if train:  # a vertical flip keeps the side
            flip = rng.random(len(images)) < 0.5
            images[flip] = images[flip, ::-1]
        return {"image": images, "label": batch["label"]}

    def build_model(self, cfg: Config) -> nn.Module:
        width = cfg.model.width
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 2)),
                             nn.Flatten(), nn.Linear(2 * width, 2))

    def loss(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = nn.functional.cross_entropy(out, batch["label"])
        return loss, {"ce": loss.detach()}

    def metric_sums(self, out: torch.Tensor, batch: TensorBatch, cfg: Config) -> dict[str, torch.Tensor]:
        correct = (out.argmax(1) == batch["label"]).sum().float()
        return {"correct": correct, "count": torch.tensor(float(len(out)))}

    def summarize(self, sums: dict[str, torch.Tensor], cfg: Config) -> dict[str, float]:
        return {"acc": float(sums["correct"] / sums["count"].clamp(min=1))}

    def render_inputs(self, batch: Batch, cfg: Config) -> Image.Image:
        return Image.fromarray((np.concatenate(list(batch["image"][:8, 0]), axis=1) * 255).astype(np.uint8))

    def render_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        return Image.fromarray((torch.cat(list(batch["image"][:8, 0]), dim=1).numpy() * 255).astype(np.uint8))

    def predict_files(self, model: nn.Module, paths: list[str], out_dir: Path, cfg: Config) -> list[Path]:
        """``<stem>.json`` per image: which side its bright square is on."""
        written = []
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("L").resize((SIZE, SIZE)), dtype=np.float32) / 255.0
            side = int(model(torch.from_numpy(pixels)[None, None]).argmax(1))
            written.append(out_dir / f"{Path(path).stem}.json")
            written[-1].write_text(json.dumps({"side": ["left", "right"][side]}))
        return written
