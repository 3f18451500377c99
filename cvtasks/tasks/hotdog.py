"""Hot dog / not hot dog by fine-tuning torchvision's ResNet-18 (d2l 13.2).

Data: ``<data.root>/<data.dataset>/{train,test}/<class>/*`` (:mod:`cvtasks.formats.imagefolder`); the class count
comes from the folders, so the same task pretrains on a larger dataset of that layout (``data.dataset``).
``decode`` returns a boolean ``keep`` column: with ``data.skip_bad`` an unreadable image is logged and gets
``keep=False`` (the pipeline drops and counts it); without, it raises DataFormatError naming the file.

Model: the backbone from ``model.weights`` (``imagenet`` from the local torch hub cache, ``scratch``, or a file),
a new xavier-initialised ``fc`` head trained at ``optim.head_lr_mult`` x the base learning rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from cvtasks.classification import ClassificationTask
from cvtasks.formats import imagefolder
from cvtasks.models.resnet import finetune_resnet18, head_param_groups
from cvtasks.tasks.base import Batch, Config


class HotdogTask(ClassificationTask):
    name = "hotdog"

    def index(self, root: str, split: str, cfg: Config) -> pd.DataFrame:
        return imagefolder.index(root, cfg["data"]["dataset"], split)

    def decode(self, batch: Batch, cfg: Config) -> Batch:
        images, keep = imagefolder.decode_images(batch["path"], skip_bad=bool(cfg["data"]["skip_bad"]))
        return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64), "keep": keep}

    def build_model(self, cfg: Config) -> nn.Module:
        return finetune_resnet18(len(self.class_names(cfg)), str(cfg["model"]["weights"]))

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
        return head_param_groups(model, float(cfg["optim"]["head_lr_mult"]))

    def read_class_names(self, cfg: Config) -> list[str]:
        data = cfg["data"]
        return imagefolder.find_classes(imagefolder.split_dir(data["root"], data["dataset"], "train"))
