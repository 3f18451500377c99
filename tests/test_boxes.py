"""cvtasks.boxes against d2l's worked examples (13.4), torchvision.ops and slow per-anchor / per-image oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from cvtasks import boxes
from cvtasks.boxes import (
    assign_anchor_to_bbox,
    box_center_to_corner,
    box_corner_to_center,
    box_iou,
    multibox_detection,
    multibox_prior,
    multibox_target,
    offset_boxes,
    offset_inverse,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# d2l 13.4.3: dog (class 0) and cat (class 1) in the catdog image, and five hand-placed anchors.
GROUND_TRUTH = [[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]]
ANCHORS = [[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98], [0.66, 0.45, 0.8, 0.8],
           [0.57, 0.3, 0.92, 0.9]]  # fmt: skip
BOOK_CLASS_LABELS = [[0, 1, 2, 0, 2]]
BOOK_MASK = [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]]
BOOK_OFFSETS = [[0, 0, 0, 0, 1.40e00, 1.00e01, 2.59e00, 7.18e00, -1.20e00, 2.69e-01, 1.68e00, -1.57e00,
                 0, 0, 0, 0, -5.71e-01, -1.00e00, 4.17e-06, 6.26e-01]]  # fmt: skip


def random_boxes(num: int, generator: torch.Generator, max_size: float = 0.4) -> torch.Tensor:
    """Corner boxes with centres in [0, 1] and sides in [0.02, 0.02 + max_size]."""
    centers = torch.rand(num, 2, generator=generator)
    sizes = 0.02 + max_size * torch.rand(num, 2, generator=generator)
    return torch.cat((centers - sizes / 2, centers + sizes / 2), dim=1)


# ---- the slow, obvious oracle: plain Python, one image and one anchor at a time ----


def _python_iou(a: list[float], b: list[float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _python_offsets(anchor: list[float], box: list[float]) -> list[float]:
    anchor_w, anchor_h = anchor[2] - anchor[0], anchor[3] - anchor[1]
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    return [
        10 * ((box[0] + box[2]) / 2 - (anchor[0] + anchor[2]) / 2) / anchor_w,
        10 * ((box[1] + box[3]) / 2 - (anchor[1] + anchor[3]) / 2) / anchor_h,
        5 * math.log(1e-6 + box_w / anchor_w),
        5 * math.log(1e-6 + box_h / anchor_h),
    ]


def reference_multibox_target(anchors: torch.Tensor, labels: torch.Tensor, iou_threshold: float = 0.5):
    """d2l's anchor labelling written per image and per anchor, skipping padding rows (class < 0)."""
    anchor_rows = anchors.reshape(-1, 4).tolist()
    all_offsets, all_masks, all_classes = [], [], []
    for image_labels in labels.tolist():
        objects = [row for row in image_labels if row[0] >= 0]
        ious = [[_python_iou(anchor, obj[1:]) for obj in objects] for anchor in anchor_rows]
        matches = [-1] * len(anchor_rows)
        for a, row in enumerate(ious):
            if row:
                best = max(range(len(row)), key=row.__getitem__)  # the first maximum, as torch
                if row[best] >= iou_threshold:
                    matches[a] = best
        taken_anchors, taken_objects = set(), set()
        for _ in objects:
            best_pair = None
            for a, row in enumerate(ious):
                for j, iou in enumerate(row):
                    if a not in taken_anchors and j not in taken_objects and (best_pair is None or iou > best_pair[0]):
                        best_pair = (iou, a, j)
            if best_pair is None:
                break
            _, a, j = best_pair
            matches[a] = j
            taken_anchors.add(a)
            taken_objects.add(j)
        offsets, masks, classes = [], [], []
        for anchor, match in zip(anchor_rows, matches):
            if match < 0:
                offsets += [0.0] * 4
                masks += [0.0] * 4
                classes.append(0)
            else:
                offsets += _python_offsets(anchor, objects[match][1:])
                masks += [1.0] * 4
                classes.append(int(objects[match][0]) + 1)
        all_offsets.append(offsets)
        all_masks.append(masks)
        all_classes.append(classes)
    return torch.tensor(all_offsets), torch.tensor(all_masks), torch.tensor(all_classes)


# ---- formats and IoU ----


def test_corner_center_conversions_match_torchvision_both_ways():
    corners = random_boxes(50, torch.Generator().manual_seed(0))
    centers = torchvision.ops.box_convert(corners, "xyxy", "cxcywh")
    torch.testing.assert_close(box_corner_to_center(corners), centers)
    torch.testing.assert_close(box_center_to_corner(centers), torchvision.ops.box_convert(centers, "cxcywh", "xyxy"))
    torch.testing.assert_close(box_center_to_corner(box_corner_to_center(corners)), corners)


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_matches_torchvision(device):
    generator = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_boxes(40, generator).to(device), random_boxes(30, generator).to(device)
    ious = box_iou(boxes1, boxes2)
    assert ious.device == boxes1.device and ious.shape == (40, 30)
    torch.testing.assert_close(ious, torchvision.ops.box_iou(boxes1, boxes2))
    assert box_iou(boxes1[:1], boxes1[:1]).item() == pytest.approx(1.0)


def test_box_iou_broadcasts_a_batch_of_boxes_against_shared_anchors():
    generator = torch.Generator().manual_seed(2)
    anchors, batch = random_boxes(20, generator), random_boxes(12, generator).reshape(3, 4, 4)
    ious = box_iou(anchors, batch)
    assert ious.shape == (3, 20, 4)
    for image in range(3):
        torch.testing.assert_close(ious[image], torchvision.ops.box_iou(anchors, batch[image]))


# ---- anchor generation ----


@pytest.mark.parametrize("device", DEVICES)
def test_multibox_prior_reproduces_the_catdog_example(device):
    height, width = 561, 728
    anchors = multibox_prior(torch.zeros(1, 3, height, width, device=device), [0.75, 0.5, 0.25], [1, 2, 0.5])
    assert anchors.shape == (1, 2042040, 4) and anchors.device.type == device
    at_250_250 = anchors.reshape(height, width, 5, 4)[250, 250].cpu()
    torch.testing.assert_close(at_250_250[0], torch.tensor([0.06, 0.07, 0.63, 0.82]), atol=6e-3, rtol=0)


def test_multibox_prior_shapes_have_the_requested_size_and_pixel_ratio():
    height, width, sizes, ratios = 6, 10, [0.6, 0.3], [1.0, 4.0, 0.25]
    anchors = multibox_prior(torch.zeros(1, 1, height, width), sizes, ratios).reshape(height, width, 4, 4)
    # (size, ratio) of the n + m - 1 shapes: each size with ratios[0], then sizes[0] with the other ratios
    expected = [(0.6, 1.0), (0.3, 1.0), (0.6, 4.0), (0.6, 0.25)]
    center = box_corner_to_center(anchors[2, 3])
    torch.testing.assert_close(center[:, 0], torch.full((4,), 3.5 / width))
    torch.testing.assert_close(center[:, 1], torch.full((4,), 2.5 / height))
    for (size, ratio), (_, _, w, h) in zip(expected, center.tolist()):
        assert h == pytest.approx(size / math.sqrt(ratio))
        assert (w * width) / (h * height) == pytest.approx(ratio)  # the ratio holds in pixels


# ---- box coding ----


@pytest.mark.parametrize("device", DEVICES)
def test_offset_inverse_undoes_offset_boxes(device):
    generator = torch.Generator().manual_seed(3)
    anchors, targets = random_boxes(100, generator).to(device), random_boxes(100, generator).to(device)
    offsets = offset_boxes(anchors, targets)
    torch.testing.assert_close(offset_inverse(anchors, offsets), targets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(offset_inverse(anchors, torch.zeros_like(offsets)), anchors)


def test_offset_boxes_uses_centre_shift_over_anchor_size():
    anchor, box = torch.tensor([[0.15, 0.2, 0.4, 0.4]]), torch.tensor([[0.1, 0.08, 0.52, 0.92]])
    expected = [10 * 0.035 / 0.25, 10 * 0.2 / 0.2, 5 * math.log(0.42 / 0.25), 5 * math.log(0.84 / 0.2)]
    torch.testing.assert_close(offset_boxes(anchor, box)[0], torch.tensor(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_offset_boxes_equals_the_books_formula_to_the_bit(device):
    """d2l's offset_boxes, through box_corner_to_center, on broadcasting shapes (one anchor set, a batch of boxes)."""
    generator = torch.Generator().manual_seed(5)
    anchors, boxes = random_boxes(60, generator).to(device), random_boxes(180, generator).to(device).reshape(3, 60, 4)
    c_anc, c_assigned_bb = box_corner_to_center(anchors), box_corner_to_center(boxes)
    offset_xy = 10 * (c_assigned_bb[..., :2] - c_anc[..., :2]) / c_anc[..., 2:]
    offset_wh = 5 * torch.log(1e-6 + c_assigned_bb[..., 2:] / c_anc[..., 2:])
    assert torch.equal(offset_boxes(anchors, boxes), torch.cat([offset_xy, offset_wh], dim=-1))


# ---- anchor labelling ----


@pytest.mark.parametrize("device", DEVICES)
def test_multibox_target_reproduces_the_dog_cat_example(device):
    anchors, ground_truth = torch.tensor(ANCHORS, device=device), torch.tensor(GROUND_TRUTH, device=device)
    bbox_offset, bbox_mask, class_labels = multibox_target(anchors.unsqueeze(0), ground_truth.unsqueeze(0))
    assert class_labels.dtype == torch.int64 and bbox_offset.device.type == device
    assert class_labels.tolist() == BOOK_CLASS_LABELS
    assert bbox_mask.tolist() == BOOK_MASK
    torch.testing.assert_close(bbox_offset.cpu(), torch.tensor(BOOK_OFFSETS), atol=2e-3, rtol=5e-3)


def test_padding_rows_are_ignored():
    anchors = torch.tensor(ANCHORS).unsqueeze(0)
    padding = [[-1.0] * 5] * 2
    unpadded = [multibox_target(anchors, torch.tensor([labels])) for labels in (GROUND_TRUTH, GROUND_TRUTH[1:])]
    padded_batch = torch.tensor([GROUND_TRUTH + padding, GROUND_TRUTH[1:] + padding + [[-1.0] * 5]])
    padded = multibox_target(anchors, padded_batch)
    for part, padded_part in enumerate(padded):
        torch.testing.assert_close(padded_part, torch.cat([result[part] for result in unpadded]))


def test_images_without_objects_are_all_background():
    anchors = torch.tensor(ANCHORS).unsqueeze(0)
    for labels in (torch.full((2, 3, 5), -1.0), torch.zeros((2, 0, 5))):
        bbox_offset, bbox_mask, class_labels = multibox_target(anchors, labels)
        assert bbox_offset.shape == bbox_mask.shape == (2, 20) and class_labels.shape == (2, 5)
        assert not bbox_offset.any() and not bbox_mask.any() and not class_labels.any()


def test_assign_uses_its_iou_threshold():
    anchors, ground_truth = torch.tensor(ANCHORS), torch.tensor(GROUND_TRUTH)[:, 1:]
    # Anchor 3 lies inside the cat with IoU 0.206; anchor 2 has 0.566 with it; anchors 1 and 4 win the greedy step.
    assert assign_anchor_to_bbox(ground_truth, anchors, "cpu").tolist() == [-1, 0, 1, -1, 1]
    assert assign_anchor_to_bbox(ground_truth, anchors, "cpu", iou_threshold=0.2).tolist() == [-1, 0, 1, 1, 1]
    assert assign_anchor_to_bbox(ground_truth, anchors, "cpu", iou_threshold=0.9).tolist() == [-1, 0, -1, -1, 1]
    _, _, class_labels = multibox_target(anchors, torch.tensor([GROUND_TRUTH]), iou_threshold=0.2)
    assert class_labels.tolist() == [[0, 1, 2, 2, 2]]


def test_greedy_step_gives_every_object_an_anchor_even_below_threshold():
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    ground_truth = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.6, 0.6, 0.7, 0.7], [0.0, 0.0, 0.2, 0.2]])
    # Best pair first: anchor 0 takes object 2 (IoU 0.16), anchor 1 object 1 (0.04); object 0 finds no free anchor.
    assert assign_anchor_to_bbox(ground_truth, anchors, "cpu").tolist() == [2, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_multibox_target_matches_the_per_anchor_oracle_on_random_batches(device):
    generator = torch.Generator().manual_seed(4)
    anchors = multibox_prior(torch.zeros(1, 1, 6, 5), [0.35, 0.15], [1, 2, 0.5])  # 120 anchors
    for trial in range(3):
        batch, max_objects = 5, 4
        labels = torch.full((batch, max_objects, 5), -1.0)
        for image in range(batch):
            count = (image + trial) % (max_objects + 1)  # 0..4 objects, the rest padding
            labels[image, :count, 0] = torch.randint(0, 3, (count,), generator=generator).float()
            labels[image, :count, 1:] = random_boxes(count, generator, max_size=0.5).clamp(0, 1)
        expected = reference_multibox_target(anchors, labels)
        got = [part.cpu() for part in multibox_target(anchors.to(device), labels.to(device))]
        assert torch.equal(got[2], expected[2]) and torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)


def _book_multibox_target(anchors: torch.Tensor, labels: torch.Tensor, iou_threshold: float = 0.5):
    """d2l's multibox_target as the book writes it: per image, assign_anchor_to_bbox's loop over ground-truth boxes
    on the [A, G] IoU matrix (no padding rows)."""
    anchors = anchors.reshape(-1, 4)
    offsets, masks, classes = [], [], []
    for label in labels:
        jaccard = box_iou(anchors, label[:, 1:])
        num_gt = jaccard.shape[1]
        matches = torch.full((anchors.shape[0],), -1, dtype=torch.long)
        max_ious, indices = torch.max(jaccard, dim=1)
        matches[max_ious >= iou_threshold] = indices[max_ious >= iou_threshold]
        for _ in range(num_gt):
            max_idx = int(torch.argmax(jaccard))
            matches[max_idx // num_gt] = max_idx % num_gt
            jaccard[:, max_idx % num_gt] = -1
            jaccard[max_idx // num_gt, :] = -1
        positive = matches >= 0
        assigned = torch.zeros_like(anchors)
        assigned[positive] = label[matches[positive], 1:]
        offsets.append((offset_boxes(anchors, assigned) * positive[:, None]).reshape(-1))
        masks.append(positive[:, None].float().expand(-1, 4).reshape(-1))
        classes.append(torch.where(positive, label[matches.clamp(min=0), 0].long() + 1, 0))
    return torch.stack(offsets), torch.stack(masks), torch.stack(classes)


def _assert_same_targets(got, expected):
    assert torch.equal(got[2], expected[2]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)


def _tinyssd_anchors_128px() -> torch.Tensor:
    """TinySSD's 1,364 anchors at 128 px, [A, 4]."""
    stages = [(16, [0.2, 0.272]), (8, [0.37, 0.447]), (4, [0.54, 0.619]), (2, [0.71, 0.79]), (1, [0.88, 0.961])]
    anchors = torch.cat([multibox_prior(torch.zeros(1, 1, side, side), sizes, [1, 2, 0.5]) for side, sizes in stages],
                        dim=1)[0]  # fmt: skip
    assert anchors.shape[0] == 1364
    return anchors


def test_one_object_per_image_matches_the_books_loop():
    """Banana detection's case, one ground-truth row per image (its own path: no greedy rounds). Every anchor is
    there twice, so each IoU ties with its copy's (the first copy wins, as torch.argmax in the book); the last
    object is too small for any anchor to reach the threshold, so it gets its best anchor from the greedy step
    alone; an image whose one row is padding gets nothing."""
    generator = torch.Generator().manual_seed(11)
    anchors = _tinyssd_anchors_128px().repeat(2, 1)
    classes = torch.randint(0, 3, (10, 1, 1), generator=generator).float()
    labels = torch.cat((classes, random_boxes(10, generator, max_size=0.4).clamp(0, 1).reshape(10, 1, 4)), dim=-1)
    labels[-1, 0, 1:] = torch.tensor([0.5, 0.5, 0.51, 0.51])
    book = _book_multibox_target(anchors, labels)
    assert int(book[1][-1].sum()) == 4  # the tiny object: one anchor, from the greedy step

    _assert_same_targets(multibox_target(anchors, labels), book)
    padded = torch.cat((labels, torch.full((1, 1, 5), -1.0)))
    offsets, mask, classes_out = multibox_target(anchors, padded)
    _assert_same_targets((offsets[:-1], mask[:-1], classes_out[:-1]), book)
    assert not offsets[-1].any() and not mask[-1].any() and not classes_out[-1].any()


@pytest.mark.parametrize("chunk_images", [None, 5])
def test_multibox_target_matches_the_books_loop_on_tinyssd_anchors_with_many_objects(chunk_images, monkeypatch):
    """1,364 anchors (TinySSD at 128 px: more than one block of the first-argmax search, with a short last block),
    8 objects per image, some of them in pairs that share a best anchor (the greedy rounds' images) beside images
    whose objects' best anchors all differ. The 12 images fit one chunk of the IoU pass, or (chunk_images=5) take
    three, the last one short."""
    if chunk_images:
        monkeypatch.setattr(boxes, "_CHUNK_ELEMENTS", chunk_images * 8 * 1364)
    generator = torch.Generator().manual_seed(8)
    anchors = _tinyssd_anchors_128px()
    assert anchors.shape[0] % boxes._ARGMAX_BLOCK
    classes = torch.randint(0, 3, (12, 8, 1), generator=generator).float()
    labels = torch.cat((classes, random_boxes(12 * 8, generator, max_size=0.3).clamp(0, 1).reshape(12, 8, 4)), dim=-1)
    labels[::3, 1, 1:] = labels[::3, 0, 1:] + 0.004  # near twins: the same best anchor
    best = box_iou(labels[..., 1:], anchors).argmax(dim=-1)  # [B, G]
    collides = [len(set(row)) < len(row) for row in best.tolist()]
    assert any(collides) and not all(collides)
    _assert_same_targets(multibox_target(anchors, labels), _book_multibox_target(anchors, labels))
    _assert_same_targets(multibox_target(anchors, labels[1:2]), _book_multibox_target(anchors, labels[1:2]))


def test_ties_go_to_the_first_anchor_and_the_first_box():
    """Equal IoUs: duplicated anchors (in one block of the first-argmax search, in different blocks, in the short
    last block) and duplicated objects resolve to the first anchor and the first box, as torch.argmax in the book."""
    generator = torch.Generator().manual_seed(9)
    anchors = random_boxes(150, generator, max_size=0.5)
    anchors[140] = anchors[70] = anchors[3]  # blocks 0, 1 and the last (short) one
    anchors[149] = anchors[100]
    anchors[10] = anchors[5]
    grown = torch.tensor([1.0, 1.0, 1.02, 1.02])  # a box a little larger than its anchor: IoU about 0.92
    ious = box_iou(anchors, (anchors[3] * grown)[None])[:, 0]
    assert ious[3] == ious[70] == ious[140] == ious.max()
    image0 = torch.cat((torch.ones(3, 1), (anchors[3] * grown).expand(3, 4)), dim=1)  # three twins
    image1 = torch.cat((torch.tensor([[0.0], [2.0], [1.0]]), anchors[[100, 60, 5]] * grown), dim=1)  # no collision
    labels = torch.stack((image0, image1))
    for iou_threshold in (0.5, 0.95):  # 0.95: above these IoUs, the greedy step alone assigns the anchors
        got = multibox_target(anchors, labels, iou_threshold)
        _assert_same_targets(got, _book_multibox_target(anchors, labels, iou_threshold))
        _assert_same_targets(got, reference_multibox_target(anchors, labels, iou_threshold))
    assert got[2][1, [100, 149, 5, 10]].tolist() == [1, 0, 2, 0]  # the first of tied anchors
    assert assign_anchor_to_bbox(image0[:, 1:], anchors, "cpu", 0.95)[[3, 70, 140]].tolist() == [0, 1, 2]


def test_padding_with_colliding_and_distinct_best_anchors_matches_the_oracle():
    generator = torch.Generator().manual_seed(10)
    anchors = multibox_prior(torch.zeros(1, 1, 8, 8), [0.3, 0.15], [1, 2, 0.5])[0]  # 256 anchors
    labels = torch.full((4, 5, 5), -1.0)
    for image, count in enumerate((5, 3, 1, 0)):
        labels[image, :count, 0] = torch.randint(0, 3, (count,), generator=generator).float()
        labels[image, :count, 1:] = random_boxes(count, generator, max_size=0.4).clamp(0, 1)
    labels[1, 2, 1:] = labels[1, 0, 1:]  # image 1: twins (a collision) before its padding
    labels[0, 2, 0] = -1.0  # image 0: a padding row between objects
    _assert_same_targets(multibox_target(anchors, labels), reference_multibox_target(anchors, labels))
    for iou_threshold in (0.0, 0.3, 0.8):
        _assert_same_targets(multibox_target(anchors, labels, iou_threshold),
                             reference_multibox_target(anchors, labels, iou_threshold))  # fmt: skip


def test_greedy_rounds_with_crowded_boxes_match_the_oracle():
    """Many boxes on few anchors, most images colliding: the rounds take second and later choices (a box's best
    anchor taken by an earlier box), fewer anchors than boxes in one trial, quantised coordinates for exact ties."""
    generator = torch.Generator().manual_seed(11)
    for trial, num_anchors in enumerate((24, 24, 5)):
        corner = torch.randint(0, 6, (num_anchors, 2), generator=generator) / 8
        anchors = torch.cat((corner, corner + torch.randint(1, 4, (num_anchors, 2), generator=generator) / 8), dim=1)
        labels = torch.full((6, 7, 5), -1.0)
        for image in range(6):
            count = 7 - (image + trial) % 3  # 5..7 objects, then padding
            labels[image, :count, 0] = torch.randint(0, 3, (count,), generator=generator).float()
            centre = torch.rand(2, generator=generator) * 0.5 + 0.25
            boxes_here = (random_boxes(count, generator, max_size=0.3) - 0.5) * 0.4 + centre.repeat(2)
            labels[image, :count, 1:] = (boxes_here.clamp(0, 1) * 16).round() / 16  # may be empty: IoU 0
        best = box_iou(labels[..., 1:], anchors).argmax(dim=-1).tolist()
        assert sum(len(set(row[: 7 - (i + trial) % 3])) < 7 - (i + trial) % 3 for i, row in enumerate(best)) >= 3
        for iou_threshold in (0.3, 0.5):
            _assert_same_targets(multibox_target(anchors, labels, iou_threshold),
                                 reference_multibox_target(anchors, labels, iou_threshold))  # fmt: skip


# ---- non-maximum suppression and detection ----


def per_image_detection(cls_probs, offset_preds, anchors, iou_threshold):
    """Oracle: multibox_detection's rows built image by image with torchvision.ops.nms (kept boxes by descending
    confidence, ties by anchor index, then the others by anchor index as NOT_DETECTED)."""
    rows = []
    for probs, offsets in zip(cls_probs, offset_preds):
        decoded = offset_inverse(anchors, offsets.reshape(-1, 4))
        conf, class_id = probs[1:].max(dim=0)
        keep = torchvision.ops.nms(decoded, conf, iou_threshold).sort().values
        keep = keep[conf[keep].sort(descending=True, stable=True).indices]
        dropped = torch.ones_like(conf, dtype=torch.bool)
        dropped[keep] = False
        order = torch.cat((keep, dropped.nonzero().squeeze(1)))
        class_id = torch.where(dropped, boxes.NOT_DETECTED, class_id)[order]
        rows.append(torch.cat((class_id.to(conf.dtype)[:, None], conf[order, None], decoded[order]), dim=1))
    return torch.stack(rows)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_batched_detection_matches_per_image_torchvision_nms(device, iou_threshold):
    """One batched NMS call for 6 images of 700 dense, overlapping boxes (3 classes, class-agnostic as d2l), with
    tied confidences, equals NMS image by image."""
    generator = torch.Generator().manual_seed(5)
    anchors = random_boxes(700, generator)
    offset_preds = 0.3 * torch.randn(6, 700 * 4, generator=generator)
    cls_probs = torch.softmax(torch.randn(6, 4, 700, generator=generator), dim=1)
    cls_probs[:, :, 100:110] = cls_probs[:, :, 90:91]  # equal confidences: ties are broken by anchor index
    output = multibox_detection(cls_probs.to(device), offset_preds.to(device), anchors.to(device), iou_threshold,
                                pos_threshold=0.0)
    expected = per_image_detection(cls_probs, offset_preds, anchors, iou_threshold)
    assert output.device.type == device
    torch.testing.assert_close(output.cpu(), expected)
    assert 0 < int((output[..., 0] >= 0).sum()) < output.shape[0] * output.shape[1]  # NMS dropped some, kept some


def test_batched_detection_with_per_image_anchors_and_identical_boxes():
    identical = torch.tensor([[0.1, 0.1, 0.5, 0.5]] * 3)
    cls_probs = torch.tensor([[[0.8, 0.1, 0.5], [0.2, 0.9, 0.5]], [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]])
    per_image = torch.stack((identical, identical + 0.2))  # [B, A, 4]
    output = multibox_detection(cls_probs, torch.zeros(2, 12), per_image, pos_threshold=0.0)
    assert output[0, :, 0].tolist() == [0, -1, -1] and output[0, 0, 1].item() == pytest.approx(0.9)
    assert output[1, :, 0].tolist() == [0, -1, -1]  # three equal confidences: the first anchor is kept
    torch.testing.assert_close(output[1, 0, 2:], per_image[1, 0])


BOOK_NMS_ANCHORS = [[0.1, 0.08, 0.52, 0.92], [0.08, 0.2, 0.56, 0.95], [0.15, 0.3, 0.62, 0.91], [0.55, 0.2, 0.9, 0.88]]
BOOK_NMS_PROBS = [[0.0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]]
BOOK_DETECTIONS = [[0, 0.9, 0.10, 0.08, 0.52, 0.92], [1, 0.9, 0.55, 0.20, 0.90, 0.88],
                   [-1, 0.8, 0.08, 0.20, 0.56, 0.95], [-1, 0.7, 0.15, 0.30, 0.62, 0.91]]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_multibox_detection_reproduces_the_four_anchor_example(device):
    anchors, cls_probs = torch.tensor(BOOK_NMS_ANCHORS, device=device), torch.tensor(BOOK_NMS_PROBS, device=device)
    offset_preds = torch.zeros(anchors.numel(), device=device)
    output = multibox_detection(cls_probs.unsqueeze(0), offset_preds.unsqueeze(0), anchors.unsqueeze(0), 0.5)
    assert output.shape == (1, 4, 6) and output.device.type == device
    torch.testing.assert_close(output[0].cpu(), torch.tensor(BOOK_DETECTIONS))


def test_multibox_detection_batches_decodes_offsets_and_flags_low_confidence():
    anchors = torch.tensor(BOOK_NMS_ANCHORS)
    generator = torch.Generator().manual_seed(7)
    offset_preds = 0.5 * torch.randn(2, 16, generator=generator)
    cls_probs = torch.stack((torch.tensor(BOOK_NMS_PROBS), torch.tensor(BOOK_NMS_PROBS)[[0, 2, 1]]))
    cls_probs[1, 1:, 2] = 0.004  # anchor 2 of image 1: confidence below pos_threshold
    output = multibox_detection(cls_probs, offset_preds, anchors)
    for image in range(2):
        alone = multibox_detection(cls_probs[image : image + 1], offset_preds[image : image + 1], anchors)
        torch.testing.assert_close(output[image], alone[0])
        decoded = offset_inverse(anchors, offset_preds[image].reshape(4, 4))
        rows_by_box = {tuple(row[2:].tolist()) for row in output[image]}
        assert rows_by_box == {tuple(box) for box in decoded.tolist()}
    low = [row for row in output[1].tolist() if abs(row[1] - (1 - 0.004)) < 1e-6]
    assert len(low) == 1 and low[0][0] == -1
