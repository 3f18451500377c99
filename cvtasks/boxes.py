"""Bounding boxes and anchor boxes for single-shot detection (d2l 13.3-13.4), implemented from the math.

Conventions, as in torchvision.ops: a box is the last dimension (size 4) of a float tensor, either in corner format
(x1, y1, x2, y2) or in center format (cx, cy, w, h), with x divided by the image width and y by the image height
(coordinates in [0, 1]; anchors near the border may reach a little outside). Functions keep the device and dtype of
their inputs, and none of them loops in Python over anchors: multibox_target computes IoUs over chunks of images (to
stay in the CPU's cache) and loops over ground-truth boxes only in the rare images where two boxes share a best anchor;
multibox_detection's NMS is torchvision.ops.batched_nms, one call for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

# Box coding, as torchvision's BoxCoder(weights=(10., 10., 5., 5.)): offsets are normalised by the standard
# deviations sigma_xy = 0.1 and sigma_wh = 0.2 of d2l's transform (means 0), i.e. multiplied by their inverses.
OFFSET_XY_SCALE = 10.0  # center shift in units of a tenth of the anchor's width/height
OFFSET_WH_SCALE = 5.0  # log of the size ratio, times 1 / 0.2
OFFSET_LOG_EPS = 1e-6  # added inside the log of offset_boxes so that a zero-size box stays finite

BACKGROUND = 0  # multibox_target's class label for anchors without an object; object class k becomes k + 1
UNASSIGNED = -1  # anchors_bbox_map entry of an anchor that no ground-truth box was assigned to
NOT_DETECTED = -1  # multibox_detection's class id for a box removed by NMS or below pos_threshold
PIXEL_CENTER = 0.5  # anchors are centred on pixel centres: pixel i spans [i, i + 1)
DEFAULT_IOU_THRESHOLD = 0.5  # d2l's default for anchor assignment (IoU >= it) and NMS (IoU > it suppresses)
DEFAULT_POS_THRESHOLD = 0.009999999  # d2l's confidence below which a detection is reported as background

_DISCARDED_IOU = -1.0  # below every real IoU (>= 0): marks matched anchors, matched or padded ground truth


def box_corner_to_center(boxes: Tensor) -> Tensor:
    """Convert boxes (Tensor[..., 4]) from (x1, y1, x2, y2) to (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_center_to_corner(boxes: Tensor) -> Tensor:
    """Convert boxes (Tensor[..., 4]) from (cx, cy, w, h) to (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(dim=-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas (Tensor[...]) of boxes (Tensor[..., 4]) in (x1, y1, x2, y2) format."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union of boxes in (x1, y1, x2, y2) format.

    Args:
        boxes1 (Tensor[..., N, 4]), boxes2 (Tensor[..., M, 4]): leading dimensions broadcast, so a batch of
            ground-truth boxes [B, M, 4] against one set of anchors [N, 4] gives [B, N, M].

    Returns:
        Tensor[..., N, M]: IoU of every pair; 0 for disjoint boxes (NaN where both boxes have zero area).
    """
    area1 = box_area(boxes1)  # [..., N]
    area2 = box_area(boxes2)  # [..., M]
    # One coordinate at a time: [..., N, M] tensors are about twice as fast as [..., N, M, 2] ones.
    x1_a, y1_a, x2_a, y2_a = boxes1[..., :, None, :].unbind(dim=-1)  # each [..., N, 1]
    x1_b, y1_b, x2_b, y2_b = boxes2[..., None, :, :].unbind(dim=-1)  # each [..., 1, M]
    inter_w = (torch.minimum(x2_a, x2_b) - torch.maximum(x1_a, x1_b)).clamp(min=0)  # [..., N, M]
    inter_h = (torch.minimum(y2_a, y2_b) - torch.maximum(y1_a, y1_b)).clamp(min=0)
    inter = inter_w * inter_h
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def multibox_prior(data: Tensor, sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """Anchor boxes centred on every pixel of a feature map (d2l 13.4.1).

    Each pixel gets n + m - 1 anchors (n sizes s, m width/height ratios r): every size with ratios[0], then
    sizes[0] with each other ratio. An anchor is s * sqrt(r) * in_height / in_width wide and s / sqrt(r) high (the
    in_height / in_width factor makes ratio r mean r in pixels on a non-square map).

    Args:
        data (Tensor[..., H, W]): only its height, width and device are used.
        sizes: anchor scales s in (0, 1], fractions of the image height.
        ratios: width/height ratios r > 0.

    Returns:
        Tensor[1, H * W * (n + m - 1), 4]: float32 (x1, y1, x2, y2), pixel-major (row by row), then by anchor shape.
    """
    if not sizes or not ratios:
        raise ValueError(f"multibox_prior needs at least one size and one ratio, got sizes={sizes} ratios={ratios}")
    in_height, in_width = data.shape[-2:]
    device = data.device
    size_tensor = torch.tensor(sizes, dtype=torch.float32, device=device)
    ratio_tensor = torch.tensor(ratios, dtype=torch.float32, device=device)
    shape_sizes = torch.cat((size_tensor, size_tensor[:1].expand(len(ratios) - 1)))  # [K], K = n + m - 1
    shape_ratios = torch.cat((ratio_tensor[:1].expand(len(sizes)), ratio_tensor[1:]))  # [K]
    half_widths = shape_sizes * shape_ratios.sqrt() * in_height / in_width / 2
    half_heights = shape_sizes / shape_ratios.sqrt() / 2
    half_extent = torch.stack((half_widths, half_heights), dim=-1)  # [K, 2]

    center_y = (torch.arange(in_height, dtype=torch.float32, device=device) + PIXEL_CENTER) / in_height
    center_x = (torch.arange(in_width, dtype=torch.float32, device=device) + PIXEL_CENTER) / in_width
    grid_y, grid_x = torch.meshgrid(center_y, center_x, indexing="ij")  # [H, W]
    centers = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 1, 2)  # [H * W, 1, 2]
    anchors = torch.cat((centers - half_extent, centers + half_extent), dim=-1)  # [H * W, K, 4]
    return anchors.reshape(1, -1, 4)


#: IoUs per chunk of images in _match_pairs' pass: its three 2 MB buffers are reused chunk to chunk. Measured
#: (benchmarks/bench_boxes.py, 2 cores): 32 images x 8 boxes x 5,444 anchors in 3 chunks took 2.9 ms, in 11 chunks of
#: 1 << 17 (buffers in L2) 3.4 ms: each chunk costs about 15 operations' fixed overhead; other cases unchanged.
_CHUNK_ELEMENTS = 1 << 19
_ARGMAX_BLOCK = 64  # anchors per block of _match_pairs' first-argmax search


def _paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes1[..., i, :] with boxes2[..., i, :] (shapes broadcast), by box_iou's operations in box_iou's order,
    so each value is bit for bit box_iou's (IEEE min, max, +, -, *, / are exact or correctly rounded, vectorised or
    not; IoU is symmetric in floating point too)."""
    x1_a, y1_a, x2_a, y2_a = boxes1.unbind(dim=-1)
    x1_b, y1_b, x2_b, y2_b = boxes2.unbind(dim=-1)
    inter_w = (torch.minimum(x2_a, x2_b) - torch.maximum(x1_a, x1_b)).clamp(min=0)
    inter_h = (torch.minimum(y2_a, y2_b) - torch.maximum(y1_a, y1_b)).clamp(min=0)
    inter = inter_w * inter_h
    return inter / (box_area(boxes1) + box_area(boxes2) - inter)


class _IoUPass:
    """IoU of a chunk of images' ground-truth boxes with every anchor, Tensor[n, G, A], box_iou's values (as
    _paired_iou), computed in place in three buffers reused from chunk to chunk: on CPU a fresh [B, G, A] tensor
    per operation costs about as much as the operation (page faults).
    The anchors' coordinates are made contiguous first: broadcasting over a column of [A, 4] does not vectorise."""

    def __init__(self, gt_boxes: Tensor, anchors: Tensor, chunk: int, out: Tensor | None = None) -> None:
        self.gt_boxes = gt_boxes  # [B, G, 4]
        self.gt_area = box_area(gt_boxes)[..., None]  # [B, G, 1]
        self.anchor_coords = anchors.t().contiguous()  # [4, A]: contiguous rows vectorise, anchors' columns do not
        x1, y1, x2, y2 = self.anchor_coords
        self.anchor_area = (x2 - x1) * (y2 - y1)  # box_area(anchors)
        shape = (min(chunk, gt_boxes.shape[0]), gt_boxes.shape[1], anchors.shape[0])
        dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
        self.out = out  # Tensor[B, G, A] to write the IoUs into, or None: a chunk's buffer, reused
        self.work = torch.empty(shape, dtype=dtype, device=anchors.device)
        self.inter = torch.empty_like(self.work) if out is None else None
        self.spare = torch.empty_like(self.work)

    def __call__(self, start: int, stop: int) -> Tensor:
        count = stop - start
        gx1, gy1, gx2, gy2 = self.gt_boxes[start:stop, :, None].unbind(dim=-1)  # each [n, G, 1]
        ax1, ay1, ax2, ay2 = self.anchor_coords  # each [A]
        inter = self.out[start:stop] if self.inter is None else self.inter[:count]
        work, spare = self.work[:count], self.spare[:count]
        torch.minimum(gx2, ax2, out=inter).sub_(torch.maximum(gx1, ax1, out=work)).clamp_(min=0)  # width
        torch.minimum(gy2, ay2, out=work).sub_(torch.maximum(gy1, ay1, out=spare)).clamp_(min=0)  # height
        inter.mul_(work)
        union = torch.add(self.anchor_area, self.gt_area[start:stop], out=work).sub_(inter)
        return inter.div_(union)


def _greedy_match(remaining: Tensor, matches: Tensor) -> None:
    """d2l's greedy step as the book writes it, for the images of a batch whose column maxima collide.

    num_gt times, the globally largest remaining (anchor, box) pair of each image (ties: the first in anchor-major
    order, as torch.argmax over the book's [A, G] matrix) is assigned and its anchor row and box column discarded.

    Args:
        remaining (Tensor[B, A, G]): IoUs, _DISCARDED_IOU for padding columns; overwritten.
        matches (Tensor[B, A]): the threshold step's assignment, updated in place.
    """
    batch, _, num_gt = remaining.shape
    images = torch.arange(batch, device=remaining.device)
    for _ in range(num_gt):
        flat = remaining.reshape(batch, -1)  # [B, A * G], anchor-major
        best, pair = flat.max(dim=1)  # [B]
        found = best > _DISCARDED_IOU  # False once an image has no box (or no anchor) left
        anchor, gt = pair // num_gt, pair % num_gt
        matches[images, anchor] = torch.where(found, gt, matches[images, anchor])
        remaining[images, anchor, :] = _DISCARDED_IOU
        remaining[images, :, gt] = _DISCARDED_IOU


def _match_pairs(
    gt_boxes: Tensor, anchors: Tensor, gt_valid: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Assign ground-truth boxes to anchors in a batch of images (d2l 13.4.3.1), as index triples.

    Every anchor whose best IoU is >= iou_threshold takes that box (the first of equal bests); then, num_gt times,
    the globally largest remaining (anchor, box) pair is assigned and its anchor row and box column are discarded,
    so that every valid box gets at least one anchor. Ties go to the first pair in (anchor, box) order, as
    torch.argmax does on the book's [A, G] matrix.

    The greedy step needs no rounds where, in an image, the valid boxes' best anchors (the first argmax of each
    box's column) are all different: then each round picks some box's best anchor and discards no other box's best,
    so the rounds assign exactly the pairs (best anchor of box g, g), in any order. Only images where two boxes
    share a best anchor (or with more boxes than anchors) go through the book's rounds (_greedy_match).

    One pass over chunks of images computes the IoUs and keeps only their reductions: each anchor's best IoU and,
    per box, the maximum of each block of _ARGMAX_BLOCK anchors (amax vectorises, argmax does not). The few IoUs
    needed after it (an anchor's boxes where its best IoU reaches the threshold, the block holding a box's first
    maximum, the images with colliding best anchors) are computed again, to the same bits (_paired_iou).

    Args:
        gt_boxes (Tensor[B, G, 4]), anchors (Tensor[A, 4]): (x1, y1, x2, y2).
        gt_valid (Tensor[B, G]): False for padding rows, which are never assigned.

    Returns:
        (images, anchors, boxes): int64 Tensor[P] each, one triple per assigned anchor (each anchor at most once).
    """
    (batch, num_gt, _), num_anchors = gt_boxes.shape, anchors.shape[0]
    device = anchors.device
    if num_gt == 0 or num_anchors == 0 or batch == 0:
        nothing = torch.zeros(0, dtype=torch.long, device=device)
        return nothing, nothing, nothing
    padded = not bool(gt_valid.all())
    padding = ~gt_valid[..., None]  # [B, G, 1]

    def masked(ious: Tensor, image_padding: Tensor) -> Tensor:
        return ious.masked_fill_(image_padding, _DISCARDED_IOU) if padded else ious

    # The pass: best IoU of each anchor [B, A], maxima of each box's anchor blocks [B, G, blocks].
    whole_blocks, tail = divmod(num_anchors, _ARGMAX_BLOCK)
    chunk = max(1, _CHUNK_ELEMENTS // (num_gt * num_anchors)) if device.type == "cpu" else batch
    dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
    best_iou = torch.empty((batch, num_anchors), dtype=dtype, device=device)
    # With one box per image its IoUs are the best ones: the pass writes them there.
    iou_pass = _IoUPass(gt_boxes, anchors, chunk, out=best_iou[:, None] if num_gt == 1 else None)
    block_max = torch.empty((batch, num_gt, whole_blocks + (tail > 0)), dtype=dtype, device=device)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        ious = masked(iou_pass(start, stop), padding[start:stop])  # [n, G, A]
        if num_gt > 1:
            torch.amax(ious, dim=1, out=best_iou[start:stop])
        if whole_blocks:
            blocks = ious[..., : whole_blocks * _ARGMAX_BLOCK].unflatten(-1, (whole_blocks, _ARGMAX_BLOCK))
            torch.amax(blocks, dim=-1, out=block_max[start:stop, :, :whole_blocks])
        if tail:
            torch.amax(ious[..., whole_blocks * _ARGMAX_BLOCK :], dim=-1, out=block_max[start:stop, :, -1])

    # Threshold step: an anchor's best box, only where its best IoU reaches the threshold (few anchors).
    images, anchor_index = (best_iou >= iou_threshold).nonzero(as_tuple=True)
    if num_gt == 1:
        boxes = torch.zeros_like(images)
    else:
        hit_ious = _paired_iou(anchors[anchor_index, None], gt_boxes[images])  # [P, G]
        boxes = masked(hit_ious, padding[images, :, 0]).argmax(dim=1)  # the first of equal bests, as torch.max

    # Each box's first best anchor: the first block holding its maximum holds its first occurrence.
    block_start = block_max.argmax(dim=-1, keepdim=True) * _ARGMAX_BLOCK  # [B, G, 1]
    # A short last block is clamped to the last anchor, which then repeats after its own place: still the first.
    candidates = (block_start + torch.arange(_ARGMAX_BLOCK, device=device)).clamp_(max=num_anchors - 1)
    candidate_ious = _paired_iou(anchors[candidates], gt_boxes[:, :, None, :])  # [B, G, block]
    best_anchor = candidates.gather(-1, candidate_ious.argmax(dim=-1, keepdim=True)).squeeze(-1)  # [B, G]

    # Greedy step, without rounds in the images where the valid boxes' best anchors differ.
    colliding = None
    if num_gt > 1:
        shared = best_anchor[:, :, None] == best_anchor[:, None, :]  # [B, G, G]
        if padded:
            shared &= gt_valid[:, :, None] & gt_valid[:, None, :]
        shared.diagonal(dim1=1, dim2=2).fill_(False)
        collide = shared.flatten(1).any(dim=1)  # [B]: two valid boxes share a best anchor
        if bool(collide.any()):
            colliding = collide.nonzero().squeeze(1)
            gt_valid = gt_valid & ~collide[:, None]
    greedy_images, greedy_boxes = gt_valid.nonzero(as_tuple=True)
    greedy_anchors = best_anchor[greedy_images, greedy_boxes]
    if colliding is not None:
        remaining = masked(_paired_iou(anchors[:, None], gt_boxes[colliding, None]), padding[colliding].transpose(1, 2))
        sub_best, sub_gt = remaining.max(dim=2)  # remaining: [C, A, G], the book's layout
        sub_matches = torch.where(sub_best >= iou_threshold, sub_gt, UNASSIGNED)  # the threshold step again
        _greedy_match(remaining, sub_matches)
        local, sub_anchors = (sub_matches != UNASSIGNED).nonzero(as_tuple=True)
        greedy_images = torch.cat((greedy_images, colliding[local]))
        greedy_anchors = torch.cat((greedy_anchors, sub_anchors))
        greedy_boxes = torch.cat((greedy_boxes, sub_matches[local, sub_anchors]))
    # The greedy step's pairs replace the threshold step's for the same anchor.
    kept = ~torch.isin(images * num_anchors + anchor_index, greedy_images * num_anchors + greedy_anchors)
    return (torch.cat((images[kept], greedy_images)), torch.cat((anchor_index[kept], greedy_anchors)),
            torch.cat((boxes[kept], greedy_boxes)))  # fmt: skip


def _match_anchors(gt_boxes: Tensor, anchors: Tensor, gt_valid: Tensor, iou_threshold: float) -> Tensor:
    """_match_pairs as a map: Tensor[B, A] int64 index of each anchor's box, or UNASSIGNED."""
    batch, num_anchors = gt_boxes.shape[0], anchors.shape[0]
    matches = torch.full((batch, num_anchors), UNASSIGNED, dtype=torch.long, device=anchors.device)
    images, anchor_index, boxes = _match_pairs(gt_boxes, anchors, gt_valid, iou_threshold)
    matches[images, anchor_index] = boxes
    return matches


def assign_anchor_to_bbox(
    ground_truth: Tensor, anchors: Tensor, device: torch.device | str, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> Tensor:
    """Assign the closest ground-truth box to each anchor of one image (see _match_pairs for the rule).

    Args:
        ground_truth (Tensor[G, 4]), anchors (Tensor[A, 4]): boxes in (x1, y1, x2, y2) format.
        device: device of the returned map.

    Returns:
        Tensor[A] anchors_bbox_map: int64 index into ground_truth, or UNASSIGNED (-1).
    """
    gt_valid = torch.ones((1, ground_truth.shape[0]), dtype=torch.bool, device=ground_truth.device)
    return _match_anchors(ground_truth[None], anchors, gt_valid, iou_threshold)[0].to(device)


def offset_boxes(anchors: Tensor, assigned_bb: Tensor, eps: float = OFFSET_LOG_EPS) -> Tensor:
    """Encode boxes as offsets from anchors (d2l 13.4.3.2).

    offset = (OFFSET_XY_SCALE * (c_bb_xy - c_anc_xy) / anc_wh, OFFSET_WH_SCALE * log(eps + bb_wh / anc_wh)).

    Args:
        anchors (Tensor[..., 4]), assigned_bb (Tensor[..., 4]): (x1, y1, x2, y2); leading dimensions broadcast.

    Returns:
        Tensor[..., 4]: offsets (dx, dy, dw, dh).
    """
    center_anchors = box_corner_to_center(anchors)
    center_boxes = box_corner_to_center(assigned_bb)
    anchor_wh = center_anchors[..., 2:]
    offset_xy = OFFSET_XY_SCALE * (center_boxes[..., :2] - center_anchors[..., :2]) / anchor_wh
    offset_wh = OFFSET_WH_SCALE * torch.log(eps + center_boxes[..., 2:] / anchor_wh)
    return torch.cat((offset_xy, offset_wh), dim=-1)


def offset_inverse(anchors: Tensor, offset_preds: Tensor) -> Tensor:
    """Decode offsets (Tensor[..., 4]) relative to anchors (Tensor[..., 4], corners) into corner boxes: the inverse
    of offset_boxes (up to its eps), center = anc_center + off_xy * anc_wh / OFFSET_XY_SCALE,
    wh = exp(off_wh / OFFSET_WH_SCALE) * anc_wh.
    """
    center_anchors = box_corner_to_center(anchors)
    anchor_wh = center_anchors[..., 2:]
    center_xy = center_anchors[..., :2] + offset_preds[..., :2] * anchor_wh / OFFSET_XY_SCALE
    wh = torch.exp(offset_preds[..., 2:] / OFFSET_WH_SCALE) * anchor_wh
    return box_center_to_corner(torch.cat((center_xy, wh), dim=-1))


def multibox_target(
    anchors: Tensor, labels: Tensor, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> tuple[Tensor, Tensor, Tensor]:
    """Label anchors with classes and box offsets from the ground truth of a batch of images (d2l 13.4.3).

    The whole batch is labelled at once (see _match_pairs: one IoU pass over chunks of images; the greedy step
    loops over ground-truth rows only in images where two boxes share a best anchor), and offsets are computed for
    the assigned anchors only. The targets carry no gradient (computed under torch.no_grad); bbox_offset and
    bbox_mask are the two halves of one allocation.

    Args:
        anchors (Tensor[1, A, 4] or Tensor[A, 4]): (x1, y1, x2, y2), shared by all images.
        labels (Tensor[B, G, 5]): rows (class, x1, y1, x2, y2), class >= 0; rows with a negative class (d2l pads
            with -1) are padding and ignored.
        iou_threshold: IoU at or above which an anchor takes its best ground-truth box.

    Returns:
        bbox_offset (Tensor[B, A * 4]): offset_boxes of each anchor to its box, 0 for background anchors.
        bbox_mask (Tensor[B, A * 4]): 1 for the four offsets of anchors with a box, else 0.
        class_labels (Tensor[B, A]): int64, BACKGROUND (0) or the box's class + 1.
    """
    if labels.dim() != 3 or labels.shape[-1] != 5:
        raise ValueError(f"labels must be [batch, objects, 5] rows (class, x1, y1, x2, y2), got {tuple(labels.shape)}")
    with torch.no_grad():
        anchors = anchors.reshape(-1, 4)  # [A, 4]
        (batch, num_gt, _), num_anchors = labels.shape, anchors.shape[0]
        gt_classes, gt_boxes = labels[..., 0], labels[..., 1:]  # [B, G], [B, G, 4]
        images, anchor_index, boxes = _match_pairs(gt_boxes, anchors, gt_classes >= 0, iou_threshold)

        dtype = torch.promote_types(anchors.dtype, labels.dtype)
        class_labels = torch.full((batch * num_anchors,), BACKGROUND, dtype=torch.long, device=anchors.device)
        # Offsets and mask share one allocation: writing the zeros of fresh outputs is much of the call's time, and
        # glibc served one [2, B * A, 4] block from memory it kept (about 40 page faults a call in a loop on 32 x
        # 5,444 anchors) where two [B * A, 4] ones came fresh from the kernel (about 1,600).
        offsets, bbox_mask = torch.zeros((2, batch * num_anchors, 4), dtype=dtype, device=anchors.device)
        assigned = images * num_anchors + anchor_index  # [P] into the batch's B * A anchors
        gt_index = images * num_gt + boxes  # [P] into its B * G boxes
        offsets[assigned] = offset_boxes(anchors[anchor_index], gt_boxes.reshape(-1, 4)[gt_index]).to(dtype)
        bbox_mask[assigned] = 1.0
        class_labels[assigned] = gt_classes.reshape(-1)[gt_index].long() + 1
    return offsets.reshape(batch, -1), bbox_mask.reshape(batch, -1), class_labels.reshape(batch, num_anchors)


def multibox_detection(
    cls_probs: Tensor,
    offset_preds: Tensor,
    anchors: Tensor,
    nms_threshold: float = DEFAULT_IOU_THRESHOLD,
    pos_threshold: float = DEFAULT_POS_THRESHOLD,
) -> Tensor:
    """Predicted boxes after class-agnostic NMS, per image (d2l 13.4.4).

    Each anchor's box is offset_inverse(anchor, offset) with the best non-background class and its probability as
    confidence. Rows are ordered as d2l: boxes kept by NMS (descending confidence), then the others by anchor index
    with class NOT_DETECTED. Rows with confidence < pos_threshold also get NOT_DETECTED and confidence 1 - conf.

    NMS runs once for the whole batch (``torchvision.ops.batched_nms``) keyed by image only: d2l's NMS is
    class-agnostic within an image (a box may suppress a box of another class), so image is the whole key.

    Args:
        cls_probs (Tensor[B, C + 1, A]): class probabilities, background first.
        offset_preds (Tensor[B, A * 4]): predicted offsets (dx, dy, dw, dh) per anchor.
        anchors (Tensor[1, A, 4], Tensor[A, 4] or Tensor[B, A, 4]): (x1, y1, x2, y2), shared or per image.

    Returns:
        Tensor[B, A, 6]: rows (class_id or NOT_DETECTED, confidence, x1, y1, x2, y2), class_id counted from 0.
    """
    batch, _, num_anchors = cls_probs.shape
    anchors = anchors.reshape(-1, num_anchors, 4)  # [1 or B, A, 4]
    boxes = offset_inverse(anchors, offset_preds.reshape(batch, num_anchors, 4))  # [B, A, 4]
    conf, class_id = cls_probs[:, 1:, :].max(dim=1)  # [B, A]

    device = cls_probs.device
    flat_conf = conf.reshape(-1)
    image_of = torch.arange(batch, device=device).repeat_interleave(num_anchors)  # [B * A]
    keep = batched_nms(boxes.reshape(-1, 4), flat_conf, image_of, nms_threshold).sort().values
    # Kept boxes grouped by image, each group by descending confidence, ties by anchor index (stable sorts).
    keep = keep[torch.sort(flat_conf[keep], descending=True, stable=True).indices]
    keep = keep[torch.sort(image_of[keep], stable=True).indices]
    kept_per_image = torch.bincount(image_of[keep], minlength=batch)  # [B]
    group_start = torch.cumsum(kept_per_image, dim=0) - kept_per_image  # [B]
    rank = torch.arange(keep.numel(), device=device) - group_start.repeat_interleave(kept_per_image)

    # Sort key of each row: a kept box's rank in its image, after them every other anchor in index order.
    row_key = (num_anchors + torch.arange(num_anchors, device=device)).repeat(batch)  # [B * A]
    row_key[keep] = rank
    row_key = row_key.reshape(batch, num_anchors)
    kept = row_key < num_anchors
    class_id = torch.where(kept, class_id, NOT_DETECTED)

    row_order = row_key.argsort(dim=1)  # [B, A]
    class_id, conf = class_id.gather(1, row_order), conf.gather(1, row_order)
    boxes = boxes.gather(1, row_order[..., None].expand(-1, -1, 4))
    below = conf < pos_threshold
    class_id = torch.where(below, NOT_DETECTED, class_id)
    conf = torch.where(below, 1 - conf, conf)
    return torch.cat((class_id.to(conf.dtype)[..., None], conf[..., None], boxes), dim=-1)
