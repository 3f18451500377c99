"""Loss and metrics of single-shot multibox detection (d2l 13.7), with mAP@0.5 from additive statistics.

Model output (cvtasks.models.ssd.TinySSD): anchors [1, A, 4], class logits [B, A, C + 1] (background first),
offsets [B, A * 4]. Ground truth: labels [B, G, 5] rows (class, x1, y1, x2, y2), padding rows with class -1.

Average precision is VOC-style (all-point interpolated area under the precision envelope) at IoU 0.5, computed
from per-class histograms over confidence bins of true and false positives plus ground-truth counts. Histograms
add up over batches and workers, so summing them and then summarising gives the same mAP as one pass over all
images on one machine. Confidences are quantised to ``1 / num_bins``: detections in one bin count as tied, i.e.
as one point of the precision-recall curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cvtasks import boxes as B
from cvtasks.settings import Section


@dataclass(frozen=True)
class DetectSettings(Section):
    """The ``detect`` section: post-processing of detections into boxes, and what is shown and binned."""

    nms_threshold: float  # NMS drops a box whose IoU with a better one exceeds this
    pos_threshold: float  # detections less confident than this are background
    max_candidates: int  # most confident candidates per image that enter NMS
    score_threshold: float  # pictures and predict show detections at least this confident
    score_bins: int  # confidence bins of the mAP histograms (additive across workers)

DEFAULT_SCORE_BINS = 1000
#: An IoU below every real one, for pairs that must never match (other class, padding).
NO_MATCH = -1.0


@dataclass(frozen=True)
class Targets:
    """multibox_target's labels of every anchor."""

    bbox_offset: Tensor  # [B, A * 4]
    bbox_mask: Tensor  # [B, A * 4], 1 for offsets of anchors with an object
    class_labels: Tensor  # [B, A] int64, 0 = background, class + 1 otherwise


@dataclass(frozen=True)
class SSDOutput:
    """A forward pass with the labels of its anchors, so loss and metrics label the anchors only once."""

    anchors: Tensor  # [1, A, 4]
    cls_preds: Tensor  # [B, A, C + 1] logits, background first
    bbox_preds: Tensor  # [B, A * 4]
    target: Targets


def targets(anchors: Tensor, labels: Tensor) -> Targets:
    with torch.no_grad():
        return Targets(*B.multibox_target(anchors, labels.float()))


def forward(model: torch.nn.Module, images: Tensor, labels: Tensor) -> SSDOutput:
    anchors, cls_preds, bbox_preds = model(images)
    return SSDOutput(anchors, cls_preds, bbox_preds, targets(anchors, labels))


def loss_parts(cls_preds: Tensor, bbox_preds: Tensor, target: Targets) -> tuple[Tensor, Tensor]:
    """(cross-entropy over all anchors' classes, L1 over the offsets of anchors with objects), each a mean.

    As d2l's ``calc_loss``: the L1 term averages |pred - target| * mask over all offsets of all anchors (masked
    ones count as zero), so both terms are per-anchor means and d2l's ``lr=0.2`` applies unchanged.
    """
    num_classes = cls_preds.shape[-1]
    cls = F.cross_entropy(cls_preds.float().reshape(-1, num_classes), target.class_labels.reshape(-1))
    bbox = F.l1_loss(bbox_preds.float() * target.bbox_mask, target.bbox_offset * target.bbox_mask)
    return cls, bbox


def anchor_sums(cls_preds: Tensor, bbox_preds: Tensor, target: Targets) -> dict[str, Tensor]:
    """d2l's ``cls_eval`` / ``bbox_eval`` statistics: correct anchor classes, anchors, |offset error| sum, offsets."""
    correct = (cls_preds.argmax(dim=-1) == target.class_labels).sum()
    abs_error = ((target.bbox_offset - bbox_preds.float()) * target.bbox_mask).abs().sum()
    return {
        "class_correct": correct.to(torch.float64),
        "class_count": torch.tensor(float(target.class_labels.numel()), dtype=torch.float64),
        "bbox_abs_sum": abs_error.to(torch.float64),
        "bbox_count": torch.tensor(float(target.bbox_offset.numel()), dtype=torch.float64),
    }


def detect(anchors: Tensor, cls_preds: Tensor, bbox_preds: Tensor, nms_threshold: float = B.DEFAULT_IOU_THRESHOLD,
           pos_threshold: float = B.DEFAULT_POS_THRESHOLD, max_candidates: int | None = None) -> Tensor:
    """d2l's ``multibox_detection`` on model output: [B, K, 6] rows (class or -1, confidence, x1, y1, x2, y2).

    ``max_candidates``: only each image's K most confident anchors enter NMS (all A when None), as torchvision's
    SSD does (``topk_candidates``). The detections are exactly those of all anchors that rank among the K, since
    a box can only be suppressed by a more confident one. NMS time grows steeply with K while a model is unsure:
    on an untrained TinySSD batch (32 x 5,444 anchors) NMS over all anchors took 871 ms against 23 ms for the top
    100 per image on 2 CPU cores (``benchmarks/bench_boxes.py``).
    """
    probs = F.softmax(cls_preds.float(), dim=-1)  # [B, A, C + 1]
    offsets = bbox_preds.float()
    batch, num_anchors, _ = probs.shape
    anchors = anchors.reshape(-1, 4)
    if max_candidates is not None and max_candidates < num_anchors:
        top = probs[..., 1:].max(dim=-1).values.topk(max_candidates, dim=1).indices  # [B, K]
        probs = probs.gather(1, top[..., None].expand(-1, -1, probs.shape[-1]))  # [B, K, C + 1]
        offsets = offsets.reshape(batch, num_anchors, 4).gather(1, top[..., None].expand(-1, -1, 4))  # [B, K, 4]
        anchors = anchors[top]  # [B, K, 4]: each image's own candidates
    return B.multibox_detection(probs.permute(0, 2, 1), offsets.reshape(batch, -1), anchors, nms_threshold,
                                pos_threshold)


def match_detections(detections: Tensor, labels: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """VOC's matching of the detections of a batch of images to their ground truth.

    Each detection (class >= 0) is compared with the ground-truth boxes of its class in its image; it is a true
    positive when its best IoU is >= ``iou_threshold`` and no higher-scoring detection (ties: earlier row) already
    took that box, else a false positive. Vectorised: a detection's best box does not depend on the order, so the
    true positive of each box is the best-ranked detection among those whose best box it is.

    Args:
        detections (Tensor[B, D, 6]): rows (class or -1, confidence, x1, y1, x2, y2).
        labels (Tensor[B, G, 5]): rows (class or -1 for padding, x1, y1, x2, y2).

    Returns:
        (true_positive, valid) (Tensor[B, D] bool each): valid marks real detections (class >= 0).
    """
    batch, num_det, _ = detections.shape
    num_gt = labels.shape[1]
    det_class, score = detections[..., 0], detections[..., 1]
    valid = det_class >= 0
    if num_gt == 0 or num_det == 0:
        return torch.zeros_like(valid), valid
    gt_class = labels[..., 0]
    same = (det_class[:, :, None] == gt_class[:, None, :]) & (gt_class[:, None, :] >= 0)  # [B, D, G]
    ious = torch.where(same, B.box_iou(detections[..., 2:], labels[..., 1:]), NO_MATCH)
    best_iou, best_gt = ious.max(dim=2)  # [B, D]
    hit = valid & (best_iou >= iou_threshold)

    order = torch.sort(score.masked_fill(~valid, -1.0), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_det, device=order.device).expand(batch, -1))  # [B, D]
    box_key = torch.arange(batch, device=order.device)[:, None] * num_gt + best_gt  # [B, D]: (image, box)
    first = torch.full((batch * num_gt,), num_det, dtype=rank.dtype, device=rank.device)
    first.scatter_reduce_(0, box_key[hit], rank[hit], reduce="amin")
    return hit & (rank == first[box_key]), valid


def ap_sums(detections: Tensor, labels: Tensor, num_classes: int, iou_threshold: float = 0.5,
            num_bins: int = DEFAULT_SCORE_BINS) -> dict[str, Tensor]:
    """Additive AP statistics of a batch: ``tp_hist`` and ``fp_hist`` [C, num_bins] (detections per class and
    confidence bin), ``gt_count`` [C] (ground-truth boxes per class). Arguments as :func:`match_detections`."""
    true_positive, valid = match_detections(detections, labels, iou_threshold)
    det_class = detections[..., 0].long().clamp(min=0)
    score_bin = (detections[..., 1] * num_bins).long().clamp(0, num_bins - 1)
    cell = (det_class * num_bins + score_bin)

    def histogram(mask: Tensor) -> Tensor:
        counts = torch.bincount(cell[mask], minlength=num_classes * num_bins)
        return counts.reshape(num_classes, num_bins).to(torch.float64)

    gt_class = labels[..., 0].long()
    return {
        "tp_hist": histogram(true_positive),
        "fp_hist": histogram(valid & ~true_positive),
        "gt_count": torch.bincount(gt_class[gt_class >= 0], minlength=num_classes).to(torch.float64),
    }


def average_precision(tp_hist: Tensor, fp_hist: Tensor, gt_count: Tensor) -> Tensor:
    """VOC all-point AP per class [C] from :func:`ap_sums` statistics; NaN for classes without ground truth.

    Walking the bins from the highest confidence down, recall and precision after each bin give the curve's
    points; AP = sum over points of (recall increase) x (the best precision at that recall or beyond).
    """
    tp = tp_hist.to(torch.float64).flip(-1).cumsum(-1)  # [C, bins], high confidence first
    fp = fp_hist.to(torch.float64).flip(-1).cumsum(-1)
    gt = gt_count.to(torch.float64)[:, None]
    recall = tp / gt.clamp(min=1.0)
    precision = tp / (tp + fp).clamp(min=1.0)
    envelope = precision.flip(-1).cummax(-1).values.flip(-1)  # best precision at this recall or beyond
    recall_step = torch.diff(recall, dim=-1, prepend=torch.zeros_like(recall[:, :1]))
    ap = (recall_step * envelope).sum(-1)
    return torch.where(gt_count > 0, ap, torch.full_like(ap, float("nan")))


def mean_ap(tp_hist: Tensor, fp_hist: Tensor, gt_count: Tensor) -> float:
    """Mean of :func:`average_precision` over classes with ground truth (0 when there is none)."""
    ap = average_precision(tp_hist, fp_hist, gt_count)
    present = ~torch.isnan(ap)
    return float(ap[present].mean()) if bool(present.any()) else 0.0
