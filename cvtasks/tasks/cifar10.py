"""CIFAR-10 image classification with d2l's CIFAR ResNet-18 (d2l 13.1, image augmentation).

Data: ``cifar-10-batches-py`` under ``data.root`` (:mod:`cvtasks.formats.cifar`). The index carries each image's raw
bytes, so ``decode`` is one reshape per batch. Inputs stay in [0, 1] (d2l's ``ToTensor`` only); training batches get
``augment.policy`` (d2l: random horizontal flip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn

from cvtasks.catalog import Dataset, DemoStep, Download
from cvtasks.classification import ClassificationTask
from cvtasks.formats import cifar
from cvtasks.models.resnet import cifar_resnet18
from cvtasks.settings import Section
from cvtasks.tasks.base import Batch, Config


@dataclass(frozen=True)
class Cifar10Model(Section):
    width: int  # channels of the first ResNet-18 stage (d2l: 64)


class Cifar10Task(ClassificationTask):
    name = "cifar10"
    sections = {**ClassificationTask.sections, "model": Cifar10Model}
    datasets = (Dataset(
        "cifar10", "cifar-10-batches-py", demo_writer="cvtasks.demo.cifar:write", demo_cost=3,
        # The CIFAR page publishes an MD5 only; this SHA-256 of the same 170,498,071-byte file is the one
        # torchvision's prototype datasets and TFDS check.
        download=Download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "sha256",
                          "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", "cifar-10-batches-py"),
    ),)
    demo_steps = (DemoStep("cifar10", "cifar10", ("train.epochs=3", "scaling.workers=2", "data.batch_size=64")),)

    def index(self, split: str, cfg: Config) -> pd.DataFrame:
        return cifar.index(cfg.data.root, split)

    def decode(self, batch: Batch, cfg: Config) -> Batch:
        images = cifar.decode_pixels(batch["pixels"], batch["path"], batch["row"])
        return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)}

    def build_model(self, cfg: Config) -> nn.Module:
        return cifar_resnet18(num_classes=len(self.class_names(cfg)), width=cfg.model.width)

    def read_class_names(self, cfg: Config) -> list[str]:
        return cifar.read_label_names(cfg.data.root)
