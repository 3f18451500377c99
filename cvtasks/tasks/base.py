"""The small interface through which every task plugs into raycv's generic Ray pipeline.

Data flows as dicts of numpy arrays (Ray Data's "numpy" batch format) until the training loop turns
them into tensors:

    index(split, cfg)   -> DataFrame, one row per sample (paths, labels; nothing decoded)
    decode(batch)       -> uint8 arrays; deterministic, so the pipeline may cache its output
    augment_pixels      -> augmented ``image`` pixels (N, H, W, 3), uint8 unless photometric steps made them float
                           in [0, 1], and the targets; freshly random each call when train=True: what the pipeline
                           moves between processes (a quarter of float32 inputs' bytes)
    inputs_from_pixels  -> the model-ready float32 (N, 3, H, W) ``image``, on the device where the model runs
    augment(batch)      -> both in numpy: model-ready float32 / int64 arrays (prediction, tests, pictures)
    forward/loss        -> weighted loss and its named parts
    metric_sums         -> additive tensors, summed over batches and workers, then ``summarize``d

``cfg`` is the task's resolved, typed config (:class:`cvtasks.settings.TaskConfig`) built from its YAML and the
overrides: one dataclass per section, the task's own sections declared in ``sections``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from cvtasks import transforms as T
from cvtasks.catalog import Workload
from cvtasks.settings import TaskConfig

Batch = dict[str, np.ndarray]
TensorBatch = dict[str, torch.Tensor]
#: The task's typed config (:class:`cvtasks.settings.TaskConfig`): ``cfg.data.batch_size``, ``cfg.detect...``.
Config = TaskConfig


class Task(Workload, ABC):
    """One computer-vision workload trained by Ray Train: data format, augmentation, model, loss, metrics, pictures.

    ``metric`` (see :class:`~cvtasks.catalog.Workload`) is a validation metric, a key returned by ``summarize``
    with its "val_" prefix.
    """
    #: Keys of the augmented batch that are model inputs / targets, moved to the device as tensors.
    tensor_keys: ClassVar[tuple[str, ...]] = ("image", "label")
    #: Whether ``metric_sums`` also runs on training batches (off where it is costly, e.g. mAP after NMS).
    train_metrics: ClassVar[bool] = True
    #: Whether ``decode`` gives images of varying sizes (object arrays of rows): a training worker that augments them
    #: shuffles its rows as references (``pipelines.loop.locally_shuffled``), where Ray Data's shuffle buffer copies
    #: every image through Arrow (most of a VOC epoch).
    ragged_decode: ClassVar[bool] = False

    @abstractmethod
    def index(self, split: str, cfg: Config) -> pd.DataFrame:
        """One row per sample of ``split`` ("train" or "val") of the dataset under ``cfg.data.root``."""

    @abstractmethod
    def decode(self, batch: Batch, cfg: Config) -> Batch:
        """Index rows -> decoded uint8 arrays. Must be deterministic: its output may be cached.

        A task may add a boolean column ``keep``: rows with ``keep=False`` (bad files skipped under
        ``data.skip_bad``, images too small to crop) are dropped by the pipeline, which counts and logs them.
        """

    @abstractmethod
    def augment_pixels(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        """Decoded arrays -> arrays of one shape per key (random when ``train``): the ``image`` as augmented pixels
        (N, H, W, 3), uint8, or float32 in [0, 1] after photometric steps, and the targets as the model needs them."""

    def input_stats(self, cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (mean, std) that model inputs are standardised with; None: inputs are pixels / 255."""
        return None

    def augment(self, batch: Batch, train: bool, cfg: Config, rng: np.random.Generator) -> Batch:
        """Decoded arrays -> model-ready arrays: :meth:`augment_pixels` with the ``image`` made the model's float32
        (N, 3, H, W) input in numpy, as :meth:`inputs_from_pixels` makes it from a tensor."""
        out = self.augment_pixels(batch, train, cfg, rng)
        return {**out, "image": self.model_inputs(out["image"], cfg)}

    def model_inputs(self, pixels: np.ndarray, cfg: Config) -> np.ndarray:
        """Augmented pixels (N, H, W, C) -> the model's float32 (N, C, H, W) input, in numpy."""
        return T.to_input(pixels, *(self.input_stats(cfg) or (None, None)))

    def inputs_from_pixels(self, batch: TensorBatch, cfg: Config) -> TensorBatch:
        """A batch of :meth:`augment_pixels` as tensors -> the model's batch: the ``image`` standardised into float32
        (N, 3, H, W), channels-last when ``train.channels_last`` is on, on the pixels' device."""
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        image = T.pixels_to_input(batch["image"], *(self.input_stats(cfg) or (None, None)), memory_format)
        return {**batch, "image": image}

    @abstractmethod
    def build_model(self, cfg: Config) -> nn.Module:
        """A fresh model (pretrained weights resolved from ``cfg`` where the task uses them).

        A model built from pretrained weights may carry a ``weights_description`` attribute saying what was used;
        raycv shows it on the console and as the MLflow tag ``raycv.weights``.
        """

    def param_groups(self, model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
        """Optimizer parameter groups; ``lr`` in a group is a multiple of the base lr (key ``lr_mult``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_mult": 1.0}]

    def forward(self, model: nn.Module, batch: TensorBatch) -> Any:
        return model(batch["image"])

    @abstractmethod
    def loss(self, out: Any, batch: TensorBatch, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total loss (mean over the batch) and its named, detached parts."""

    @abstractmethod
    def metric_sums(self, out: Any, batch: TensorBatch, cfg: Config) -> dict[str, torch.Tensor]:
        """Additive statistics of one batch (counts, sums, histograms, confusion matrices)."""

    @abstractmethod
    def summarize(self, sums: dict[str, torch.Tensor], cfg: Config) -> dict[str, float]:
        """Metrics from statistics summed over all batches and workers, keyed without a split prefix.

        The loop adds "train_"/"val_": ``{"acc": 0.9}`` becomes ``val_acc``, which ``metric`` names.
        """

    @abstractmethod
    def render_inputs(self, batch: Batch, cfg: Config) -> Image.Image:
        """A grid of augmented training samples, as the model sees them."""

    @abstractmethod
    def render_predictions(self, model: nn.Module, batch: TensorBatch, cfg: Config) -> Image.Image:
        """A grid of validation samples with predictions drawn against the truth."""

    def extra_artifacts(self, model: nn.Module, sums: dict[str, torch.Tensor], cfg: Config,
                        val_batch: TensorBatch | None = None) -> dict[str, Any]:
        """Task-specific files for MLflow: name -> PIL image, text or dict (JSON). None by default.

        ``sums``: the last validation pass's statistics; ``val_batch``: its first batch, when kept.
        """
        return {}

    def resolve_for_workers(self, cfg: Config) -> Config:
        """``cfg`` with what the workers would otherwise read from the dataset outside the Ray Data stream (class
        names...) resolved here, on the driver: a worker may run on a node without the driver's files."""
        return cfg

    @abstractmethod
    def predict_files(self, model: nn.Module, paths: list[str], out_dir: Path, cfg: Config) -> list[Path]:
        """``raycv predict``: run ``model`` (in eval mode, on CPU) on image files, write results under ``out_dir``.

        ``cfg`` is the config the model was trained with. Returns the files written (pictures, JSON).
        """
