"""Two-stage detection (Faster R-CNN, d2l 13.8) on raycv's detection batches, with torchvision's model inside.

Batches are those of :mod:`cvtasks.box_augment`: images float (B, 3, H, W) in [0, 1] and boxes (B, max_objects, 5)
rows (class or -1 for padding, x1, y1, x2, y2 as fractions of the image). torchvision's detection models want a list
of images and one dict per image with boxes in pixels and labels counted from 1 (0 is background): see
:func:`to_targets`. Their detections come back as :mod:`cvtasks.detection`'s [B, K, 6] rows (class or -1,
confidence, x1, y1, x2, y2 as fractions), so TinySSD's mAP code scores both detectors alike.

In training mode torchvision's model returns only its four losses; in evaluation mode only detections. An evaluation
pass here needs both (the loop logs a validation loss), so :func:`forward` runs the stages itself: the backbone
once, the region proposal network once in training mode (its losses and its proposals: the model is built with the
same proposal counts for training and evaluation), then the RoI heads twice on those proposals, in training mode for
their losses and in evaluation mode for the detections.

RoI pooling vs RoI align (tests/test_roi.py pins both to d2l's example): Fast R-CNN's RoI pooling rounds each
proposal and its bins to whole feature cells, so the pooled grid may sit a cell (8-32 input pixels on these feature
maps) off the proposal. Class scores and box offsets tolerate that; Mask R-CNN's per-pixel masks would be misaligned
by it, hence its RoI align, which samples each bin bilinearly at exact positions. torchvision's Faster R-CNN uses
RoI align too (``MultiScaleRoIAlign``), which costs little and helps boxes of small objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from cvtasks import boxes as B
from cvtasks.detection import NO_MATCH

#: torchvision's loss names -> raycv's (logged as ``loss_<name>``, weighted by config ``loss.<name>_weight``).
LOSS_NAMES = {
    "loss_objectness": "rpn_objectness",  # RPN: object vs background per anchor (binary cross-entropy)
    "loss_rpn_box_reg": "rpn_box",  # RPN: smooth L1 of anchor -> proposal offsets
    "loss_classifier": "roi_class",  # RoI head: cross-entropy over classes + background per sampled proposal
    "loss_box_reg": "roi_box",  # RoI head: smooth L1 of proposal -> box offsets
}
#: Class of the padding rows of detections (their confidence and box are zero).
NO_CLASS = -1.0


@dataclass(frozen=True)
class TwoStageOutput:
    """A forward pass: the four unweighted losses (keys: ``LOSS_NAMES`` values) and, in evaluation, detections."""

    losses: dict[str, Tensor]
    detections: Tensor | None  # [B, K, 6]; None in training mode, where torchvision returns none


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def is_two_stage(model: nn.Module) -> bool:
    return isinstance(unwrap(model), GeneralizedRCNN)


@contextmanager
def mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` (and every submodule) in training or evaluation mode for the block, as it was afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


def to_targets(boxes: Tensor, height: int, width: int) -> list[dict[str, Tensor]]:
    """Padded boxes (B, G, 5) as fractions -> per image {"boxes": float (n, 4) pixels, "labels": int64 (n,) from 1}.

    Padding rows (class -1) are dropped, and so are boxes without area (torchvision refuses them in training).
    """
    scale = boxes.new_tensor([width, height, width, height])
    targets = []
    for rows in boxes.float():
        pixels = rows[:, 1:] * scale
        keep = (rows[:, 0] >= 0) & (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
        targets.append({"boxes": pixels[keep], "labels": rows[keep, 0].long() + 1})
    return targets


def to_rows(found: list[dict[str, Tensor]], height: int, width: int, max_rows: int) -> Tensor:
    """torchvision detections (pixels, labels from 1) -> [B, max_rows, 6] rows, padded with class -1 rows."""
    device = found[0]["boxes"].device if found else torch.device("cpu")
    rows = torch.zeros(len(found), max_rows, 6, device=device)
    rows[..., 0] = NO_CLASS
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    for i, image in enumerate(found):
        k = min(len(image["scores"]), max_rows)
        rows[i, :k, 0] = image["labels"][:k].float() - 1
        rows[i, :k, 1] = image["scores"][:k].float()
        rows[i, :k, 2:] = image["boxes"][:k].float() / scale
    return rows


def renamed(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {LOSS_NAMES[key]: value for key, value in losses.items()}


def _stage_one(net: GeneralizedRCNN, images: Tensor, targets: list[dict[str, Tensor]] | None) -> tuple[Any, ...]:
    """(torchvision ImageList, FPN features, proposals per image best first, targets resized as the images, RPN
    losses: empty without targets)."""
    image_list, targets = net.transform(list(images), targets)
    features = net.backbone(image_list.tensors)
    with mode(net.rpn, targets is not None):
        found, losses = net.rpn(image_list, features, targets)
    return image_list, features, found, targets, losses


def forward(model: nn.Module, images: Tensor, boxes: Tensor) -> TwoStageOutput:
    """Losses (training mode: through the model itself, so a DDP wrapper syncs gradients) or losses and detections
    (evaluation mode: the stages one by one, see the module docstring) of a batch."""
    height, width = images.shape[-2:]
    targets = to_targets(boxes, height, width)
    if model.training:
        return TwoStageOutput(renamed(model(list(images), targets)), None)
    net = unwrap(model)
    image_list, features, regions, resized, rpn_losses = _stage_one(net, images, targets)
    with mode(net.roi_heads, True):
        _, roi_losses = net.roi_heads(features, regions, image_list.image_sizes, resized)
    found, _ = net.roi_heads(features, regions, image_list.image_sizes)
    found = net.transform.postprocess(found, image_list.image_sizes, [(height, width)] * len(found))
    return TwoStageOutput(renamed({**rpn_losses, **roi_losses}),
                          to_rows(found, height, width, net.roi_heads.detections_per_img))


def weighted_loss(out: TwoStageOutput, weights: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Sum of each loss times ``weights.<name>_weight`` (the ``loss`` section), and the losses unweighted."""
    total = sum(getattr(weights, f"{name}_weight") * value for name, value in out.losses.items())
    return total, {name: value.detach() for name, value in out.losses.items()}


def detections(model: nn.Module, images: Tensor) -> Tensor:
    """[B, K, 6] detection rows of ``model`` on model-ready ``images`` (evaluation mode for the call)."""
    net = unwrap(model)
    with mode(net, False):
        found = net(list(images))
    return to_rows(found, *images.shape[-2:], net.roi_heads.detections_per_img)


def proposals(model: nn.Module, images: Tensor, top: int) -> list[Tensor]:
    """The RPN's ``top`` best proposals per image, (top, 4) boxes as fractions of the image, best first."""
    net = unwrap(model)
    with mode(net, False):
        image_list, _, found, _, _ = _stage_one(net, images, None)
    out = []
    for boxes, (height, width) in zip(found, image_list.image_sizes, strict=True):
        out.append(boxes[:top] / boxes.new_tensor([width, height, width, height]))
    return out


def box_sums(found: Tensor, labels: Tensor, score_threshold: float, iou_threshold: float) -> dict[str, Tensor]:
    """The additive ``class_correct`` / ``class_count`` / ``bbox_abs_sum`` / ``bbox_count`` statistics, per
    ground-truth box instead of TinySSD's per anchor (a two-stage detector has no fixed anchors to score).

    Each ground-truth box is matched to its best-overlapping detection of confidence >= ``score_threshold`` (any
    class); it counts as correct when the IoU is >= ``iou_threshold`` and the class agrees, so ``class_err`` is the
    share of objects missed or misclassified. ``bbox_mae`` is the mean |corner error| (fractions of the image) of
    the matched pairs.

    Args:
        found (Tensor[B, D, 6]): detection rows; labels (Tensor[B, G, 5]): ground truth, padding rows class -1.
    """
    confident = (found[..., 0] >= 0) & (found[..., 1] >= score_threshold)  # [B, D]
    ious = B.box_iou(found[..., 2:], labels[..., 1:]).nan_to_num(NO_MATCH)  # [B, D, G]
    best_iou, best = ious.masked_fill(~confident[..., None], NO_MATCH).max(dim=1)  # [B, G]
    truth = labels[..., 0] >= 0
    matched = truth & (best_iou >= iou_threshold)
    correct = matched & (found[..., 0].gather(1, best) == labels[..., 0])
    matched_boxes = found[..., 2:].gather(1, best[..., None].expand(-1, -1, 4))
    abs_error = ((matched_boxes - labels[..., 1:]).abs() * matched[..., None]).sum()
    return {
        "class_correct": correct.sum().to(torch.float64),
        "class_count": truth.sum().to(torch.float64),
        "bbox_abs_sum": abs_error.to(torch.float64),
        "bbox_count": (4 * matched.sum()).to(torch.float64),
    }
