"""Benchmark cvtasks.boxes against its references, side by side in one run:

- multibox_target on a TinySSD batch (32 images x 5,444 anchors) vs d2l's loop over images calling
  assign_anchor_to_bbox per image (written below, outputs checked equal);
- nms vs torchvision.ops.nms on a few thousand boxes (outputs checked equal).

Usage: python benchmarks/bench_boxes.py [--device cpu|cuda] [--repeats 7]
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

from cvtasks.boxes import BACKGROUND, assign_anchor_to_bbox, multibox_prior, multibox_target, nms, offset_boxes

log = logging.getLogger("bench_boxes")

# TinySSD (d2l 13.7) on a 256 x 256 input: five feature maps, 4 anchors per pixel -> 5,444 anchors.
TINYSSD_FEATURE_MAPS = (32, 16, 8, 4, 1)  # feature-map side per stage
TINYSSD_SIZES = ([0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961])  # anchor scales per stage
TINYSSD_RATIOS = [1, 2, 0.5]  # width/height ratios, shared by all stages
BATCH_SIZE = 32  # d2l's TinySSD training batch
OBJECTS_PER_IMAGE = (1, 4)  # banana detection has 1; 4 shows how the greedy loop over objects scales
NMS_BOX_COUNTS = (2000, 5000)  # "a few thousand" random boxes
NMS_IOU_THRESHOLD = 0.5  # d2l's nms_threshold
DECODE_NOISE = 0.01  # std of the jitter added to anchors to mimic decoded SSD predictions
SEED = 0


def tinyssd_anchors(device: torch.device) -> torch.Tensor:
    """The 5,444 TinySSD anchors, [5444, 4] corners."""
    stages = [
        multibox_prior(torch.zeros(1, 1, side, side, device=device), sizes, TINYSSD_RATIOS)
        for side, sizes in zip(TINYSSD_FEATURE_MAPS, TINYSSD_SIZES)
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


def per_image_multibox_target(anchors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d2l's multibox_target: a Python loop over images, assign_anchor_to_bbox and scatter per image."""
    anchors = anchors.reshape(-1, 4)
    device, num_anchors = anchors.device, anchors.shape[0]
    batch_offset, batch_mask, batch_class_labels = [], [], []
    for label in labels:
        label = label[label[:, 0] >= 0]
        anchors_bbox_map = assign_anchor_to_bbox(label[:, 1:], anchors, device)
        bbox_mask = (anchors_bbox_map >= 0).float().unsqueeze(-1).repeat(1, 4)
        class_labels = torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=device)
        assigned_bb = torch.zeros((num_anchors, 4), dtype=torch.float32, device=device)
        indices_true = torch.nonzero(anchors_bbox_map >= 0).squeeze(1)
        bb_idx = anchors_bbox_map[indices_true]
        class_labels[indices_true] = label[bb_idx, 0].long() + 1
        assigned_bb[indices_true] = label[bb_idx, 1:]
        batch_offset.append((offset_boxes(anchors, assigned_bb) * bbox_mask).reshape(-1))
        batch_mask.append(bbox_mask.reshape(-1))
        batch_class_labels.append(class_labels)
    return torch.stack(batch_offset), torch.stack(batch_mask), torch.stack(batch_class_labels)


def median_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of run() in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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


def bench_cases(device: torch.device, repeats: int) -> list[tuple[str, float, str, float]]:
    """Rows (case, our ms, reference name, reference ms)."""
    generator = torch.Generator().manual_seed(SEED)
    anchors = tinyssd_anchors(device)
    rows = []
    for num_objects in OBJECTS_PER_IMAGE:
        labels = random_labels(num_objects, generator).to(device)
        case = f"multibox_target {BATCH_SIZE}x{anchors.shape[0]} anchors, {num_objects} obj/img"
        check_same(case, multibox_target(anchors, labels), per_image_multibox_target(anchors, labels))
        ours = median_ms(lambda labels=labels: multibox_target(anchors, labels), repeats, device)
        reference = median_ms(lambda labels=labels: per_image_multibox_target(anchors, labels), repeats, device)
        rows.append((case, ours, "d2l per-image loop", reference))

    decoded = anchors + DECODE_NOISE * torch.randn(anchors.shape, generator=generator).to(device)
    nms_inputs = [(f"nms {n} random boxes", random_boxes(n, generator).to(device)) for n in NMS_BOX_COUNTS]
    nms_inputs.append((f"nms {anchors.shape[0]} decoded SSD boxes", decoded))
    for case, candidates in nms_inputs:
        scores = torch.rand(candidates.shape[0], generator=generator).to(device)
        check_same(case, (nms(candidates, scores, NMS_IOU_THRESHOLD),),
                   (torchvision.ops.nms(candidates, scores, NMS_IOU_THRESHOLD),))  # fmt: skip
        ours = median_ms(lambda c=candidates, s=scores: nms(c, s, NMS_IOU_THRESHOLD), repeats, device)
        reference = median_ms(
            lambda c=candidates, s=scores: torchvision.ops.nms(c, s, NMS_IOU_THRESHOLD), repeats, device
        )
        rows.append((case, ours, "torchvision.ops.nms", reference))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (the median is reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device(args.device)

    rows = bench_cases(device, args.repeats)
    log.info("device=%s torch=%s threads=%d, median of %d runs", device, torch.__version__,
             torch.get_num_threads(), args.repeats)  # fmt: skip
    header = f"{'case':<58} {'cvtasks ms':>11} {'reference':>20} {'ref ms':>9} {'ref/ours':>9}"
    log.info(header)
    log.info("-" * len(header))
    for case, ours, reference_name, reference in rows:
        log.info(f"{case:<58} {ours:>11.2f} {reference_name:>20} {reference:>9.2f} {reference / ours:>9.2f}")


if __name__ == "__main__":
    main()
