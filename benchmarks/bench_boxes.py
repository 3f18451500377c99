"""Benchmark cvtasks.boxes against its references, side by side in one run:

- multibox_target on a TinySSD batch (32 images x 5,444 anchors at 256 px and 1,364 at 128 px, banana's size;
  1 and 8 objects per image) vs the book's own multibox_target: a loop over images calling d2l's
  assign_anchor_to_bbox (its own loop over ground-truth boxes), with the book's box_iou and offset_boxes, all
  re-implemented below from the book with its errata fixed (the iou_threshold argument, integer division); outputs
  checked equal;
- multibox_detection (one torchvision.ops.batched_nms call for the batch) vs a loop over images calling
  torchvision.ops.nms, on an untrained TinySSD's dense output (every anchor a candidate), and with the 100
  candidates per image that raycv's detection config used to keep (outputs checked equal).

Usage: python benchmarks/bench_boxes.py [--device cpu|cuda] [--repeats 7] [--threads N] [--only target|detection]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision

from cvtasks.boxes import (
    BACKGROUND,
    NOT_DETECTED,
    UNASSIGNED,
    multibox_detection,
    multibox_prior,
    multibox_target,
    offset_inverse,
)
from cvtasks.detection import detect

log = logging.getLogger("bench_boxes")

# TinySSD (d2l 13.7): five feature maps, 4 anchors per pixel -> 5,444 anchors at 256 x 256, 1,364 at 128 x 128.
TINYSSD_FEATURE_MAPS = {256: (32, 16, 8, 4, 1), 128: (16, 8, 4, 2, 1)}  # feature-map side per stage, by input size
TINYSSD_SIZES = ([0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961])  # anchor scales per stage
TINYSSD_RATIOS = [1, 2, 0.5]  # width/height ratios, shared by all stages
BATCH_SIZE = 32  # d2l's TinySSD training batch
OBJECTS_PER_IMAGE = (1, 8)  # banana detection has 1; 8 shows how the greedy loop over objects scales
NMS_IOU_THRESHOLD = 0.5  # d2l's nms_threshold
OLD_CANDIDATE_CAP = 100  # detect.max_candidates before batched NMS
UNTRAINED_LOGIT_STD = 0.1  # an untrained head's class logits: nearly uniform, so every anchor is a candidate
UNTRAINED_OFFSET_STD = 0.5  # and its offsets: boxes scattered around their anchors
SEED = 0
SAMPLE_SECONDS = 0.02  # each timed sample runs a case's calls for at least this long


def tinyssd_anchors(device: torch.device, image_size: int = 256) -> torch.Tensor:
    """TinySSD's anchors on an image_size input, [A, 4] corners (5,444 at 256 px, 1,364 at 128 px)."""
    stages = [
        multibox_prior(torch.zeros(1, 1, side, side, device=device), sizes, TINYSSD_RATIOS)
        for side, sizes in zip(TINYSSD_FEATURE_MAPS[image_size], TINYSSD_SIZES)
    ]
    return torch.cat(stages, dim=1)[0]


def random_boxes(num: int, generator: torch.Generator) -> torch.Tensor:
    """[num, 4] corner boxes with centres in [0, 1] and sides in [0.02, 0.32]."""
    centers = torch.rand(num, 2, generator=generator)
    sizes = 0.02 + 0.3 * torch.rand(num, 2, generator=generator)
    return torch.cat((centers - sizes / 2, centers + sizes / 2), dim=1)


def random_labels(num_objects: int, generator: torch.Generator) -> torch.Tensor:
    """[BATCH_SIZE, num_objects, 5] rows (class, x1, y1, x2, y2), no padding."""
    classes = torch.randint(0, 3, (BATCH_SIZE, num_objects, 1), generator=generator).float()
    boxes = random_boxes(BATCH_SIZE * num_objects, generator).clamp(0, 1).reshape(BATCH_SIZE, num_objects, 4)
    return torch.cat((classes, boxes), dim=-1)


def book_box_corner_to_center(boxes: torch.Tensor) -> torch.Tensor:
    """d2l's box_corner_to_center (13.3)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    return torch.stack((cx, cy, w, h), axis=-1)


def book_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """d2l's box_iou (13.4.2)."""
    def box_area(boxes: torch.Tensor) -> torch.Tensor:
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    areas1, areas2 = box_area(boxes1), box_area(boxes2)
    inter_upperlefts = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    inter_lowerrights = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    inters = (inter_lowerrights - inter_upperlefts).clamp(min=0)
    inter_areas = inters[:, :, 0] * inters[:, :, 1]
    union_areas = areas1[:, None] + areas2 - inter_areas
    return inter_areas / union_areas


def book_offset_boxes(anchors: torch.Tensor, assigned_bb: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d2l's offset_boxes (13.4.3.2)."""
    c_anc = book_box_corner_to_center(anchors)
    c_assigned_bb = book_box_corner_to_center(assigned_bb)
    offset_xy = 10 * (c_assigned_bb[:, :2] - c_anc[:, :2]) / c_anc[:, 2:]
    offset_wh = 5 * torch.log(eps + c_assigned_bb[:, 2:] / c_anc[:, 2:])
    return torch.cat([offset_xy, offset_wh], axis=1)


def book_assign_anchor_to_bbox(ground_truth: torch.Tensor, anchors: torch.Tensor, device: torch.device,
                               iou_threshold: float = 0.5) -> torch.Tensor:
    """d2l's assign_anchor_to_bbox (13.4.3.1), one image, its loop over ground-truth boxes as the book writes it."""
    num_anchors, num_gt_boxes = anchors.shape[0], ground_truth.shape[0]
    jaccard = book_box_iou(anchors, ground_truth)
    anchors_bbox_map = torch.full((num_anchors,), UNASSIGNED, dtype=torch.long, device=device)
    max_ious, indices = torch.max(jaccard, dim=1)
    anc_i = torch.nonzero(max_ious >= iou_threshold).reshape(-1)
    box_j = indices[max_ious >= iou_threshold]
    anchors_bbox_map[anc_i] = box_j
    col_discard = torch.full((num_anchors,), -1.0, device=device)
    row_discard = torch.full((num_gt_boxes,), -1.0, device=device)
    for _ in range(num_gt_boxes):
        max_idx = torch.argmax(jaccard)
        box_idx = (max_idx % num_gt_boxes).long()
        anc_idx = (max_idx // num_gt_boxes).long()
        anchors_bbox_map[anc_idx] = box_idx
        jaccard[:, box_idx] = col_discard
        jaccard[anc_idx, :] = row_discard
    return anchors_bbox_map


def book_multibox_target(anchors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d2l's multibox_target (13.4.3): a Python loop over images, book_assign_anchor_to_bbox per image."""
    anchors = anchors.reshape(-1, 4)
    device, num_anchors = anchors.device, anchors.shape[0]
    batch_offset, batch_mask, batch_class_labels = [], [], []
    for label in labels:
        anchors_bbox_map = book_assign_anchor_to_bbox(label[:, 1:], anchors, device)
        bbox_mask = (anchors_bbox_map >= 0).float().unsqueeze(-1).repeat(1, 4)
        class_labels = torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=device)
        assigned_bb = torch.zeros((num_anchors, 4), dtype=torch.float32, device=device)
        indices_true = torch.nonzero(anchors_bbox_map >= 0).squeeze(1)
        bb_idx = anchors_bbox_map[indices_true]
        class_labels[indices_true] = label[bb_idx, 0].long() + 1
        assigned_bb[indices_true] = label[bb_idx, 1:]
        batch_offset.append((book_offset_boxes(anchors, assigned_bb) * bbox_mask).reshape(-1))
        batch_mask.append(bbox_mask.reshape(-1))
        batch_class_labels.append(class_labels)
    return torch.stack(batch_offset), torch.stack(batch_mask), torch.stack(batch_class_labels)


def per_image_detection(cls_probs: torch.Tensor, offset_preds: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """multibox_detection's semantics with one torchvision.ops.nms call per image (the loop batched NMS replaces)."""
    batch, _, num_anchors = cls_probs.shape
    rows = []
    for image in range(batch):
        boxes = offset_inverse(anchors, offset_preds[image].reshape(num_anchors, 4))
        conf, class_id = cls_probs[image, 1:].max(dim=0)
        keep = torchvision.ops.nms(boxes, conf, NMS_IOU_THRESHOLD).sort().values
        keep = keep[conf[keep].sort(descending=True, stable=True).indices]  # ties by anchor index, as ours
        others = torch.ones(num_anchors, dtype=torch.bool, device=boxes.device)
        others[keep] = False
        order = torch.cat((keep, torch.nonzero(others).squeeze(1)))
        class_id = torch.where(others, NOT_DETECTED, class_id)[order]
        rows.append(torch.cat((class_id.to(conf.dtype)[:, None], conf[order, None], boxes[order]), dim=1))
    return torch.stack(rows)


def untrained_outputs(num_anchors: int, generator: torch.Generator, device: torch.device,
                      num_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits [B, A, C + 1], offsets [B, A * 4]) as an untrained TinySSD head emits them."""
    logits = UNTRAINED_LOGIT_STD * torch.randn(BATCH_SIZE, num_anchors, num_classes + 1, generator=generator)
    offsets = UNTRAINED_OFFSET_STD * torch.randn(BATCH_SIZE, num_anchors * 4, generator=generator)
    return logits.to(device), offsets.to(device)


def _per_call_seconds(run: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def paired_median_ms(ours: Callable[[], object], reference: Callable[[], object], repeats: int,
                     device: torch.device) -> tuple[float, float]:
    """Median milliseconds per call of ours() and reference(), timed in alternating rounds so that a machine whose
    speed drifts (a shared VM) slows both alike. Each round times at least SAMPLE_SECONDS of calls of each."""
    ours(), reference()  # warm-up
    calls = [max(1, round(SAMPLE_SECONDS / _per_call_seconds(run, 1, device))) for run in (ours, reference)]
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, count, samples in zip((ours, reference), calls, times):
            samples.append(_per_call_seconds(run, count, device))
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def check_same(case: str, ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> None:
    """Log an error (and time the case anyway) when our outputs differ from the reference's."""
    for got, expected in zip(ours, reference):
        same_shape = got.shape == expected.shape
        if got.is_floating_point():
            same = same_shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        else:
            same = same_shape and torch.equal(got, expected)
        if not same:
            log.error("%s: outputs differ from the reference", case)


def target_cases(device: torch.device, repeats: int) -> list[tuple[str, float, str, float]]:
    """multibox_target's rows (case, our ms, reference name, reference ms)."""
    generator = torch.Generator().manual_seed(SEED)
    rows = []
    for image_size in TINYSSD_FEATURE_MAPS:
        anchors = tinyssd_anchors(device, image_size)
        for num_objects in OBJECTS_PER_IMAGE:
            labels = random_labels(num_objects, generator).to(device)
            case = f"multibox_target {BATCH_SIZE}x{anchors.shape[0]} anchors, {num_objects} obj/img"
            check_same(case, multibox_target(anchors, labels), book_multibox_target(anchors, labels))
            ours, reference = paired_median_ms(
                lambda anchors=anchors, labels=labels: multibox_target(anchors, labels),
                lambda anchors=anchors, labels=labels: book_multibox_target(anchors, labels), repeats, device
            )
            rows.append((case, ours, "d2l multibox_target", reference))
    return rows


def detection_cases(device: torch.device, repeats: int) -> list[tuple[str, float, str, float]]:
    """multibox_detection's rows, on TinySSD's 5,444 anchors."""
    generator = torch.Generator().manual_seed(SEED)
    anchors = tinyssd_anchors(device)
    rows = []
    logits, offsets = untrained_outputs(anchors.shape[0], generator, device)
    probs = torch.softmax(logits, dim=-1).permute(0, 2, 1)  # [B, C + 1, A]
    case = f"multibox_detection {BATCH_SIZE}x{anchors.shape[0]} untrained boxes"
    check_same(case, (multibox_detection(probs, offsets, anchors, NMS_IOU_THRESHOLD, 0.0),),
               (per_image_detection(probs, offsets, anchors),))  # fmt: skip
    def ours() -> torch.Tensor:
        return multibox_detection(probs, offsets, anchors, NMS_IOU_THRESHOLD)

    ours_ms, reference = paired_median_ms(ours, lambda: per_image_detection(probs, offsets, anchors), repeats, device)
    rows.append((case, ours_ms, "per-image ops.nms", reference))
    ours_ms, capped = paired_median_ms(
        ours, lambda: detect(anchors, logits, offsets, max_candidates=OLD_CANDIDATE_CAP), repeats, device
    )
    rows.append((f"detect, all {anchors.shape[0]} anchors vs top {OLD_CANDIDATE_CAP}", ours_ms,
                 f"top-{OLD_CANDIDATE_CAP} per image", capped))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed rounds per case, ours and the reference alternating (medians reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--only", choices=("target", "detection"), default=None, help="run one group of cases")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    if args.only in (None, "target"):
        rows += target_cases(device, args.repeats)
    if args.only in (None, "detection"):
        rows += detection_cases(device, args.repeats)
    log.info("device=%s torch=%s threads=%d, median of %d alternating rounds", device, torch.__version__,
             torch.get_num_threads(), args.repeats)  # fmt: skip
    header = f"{'case':<58} {'cvtasks ms':>11} {'reference':>20} {'ref ms':>9} {'ref/ours':>9}"
    log.info(header)
    log.info("-" * len(header))
    for case, ours, reference_name, reference in rows:
        log.info(f"{case:<58} {ours:>11.2f} {reference_name:>20} {reference:>9.2f} {reference / ours:>9.2f}")


if __name__ == "__main__":
    main()
