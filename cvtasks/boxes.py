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

_DISCARDED_IOU = -1.0  # below every real IoU (>= 0): the IoUs of padding rows


def box_corner_to_center(boxes: Tensor) -> Tensor:
    """Convert boxes (Tensor[..., 4]) from (x1, y1, x2, y2) to (cx, cy, w, h)."""
    return torch.cat(_centers_and_sizes(boxes), dim=-1)


def _centers_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Centres (cx, cy) and sizes (w, h) of (x1, y1, x2, y2) boxes, each Tensor[..., 2]: a pair of coordinates at a
    time, the same values as one at a time in fewer operations (10 against 15 us on 100 boxes)."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return (low + high) / 2, high - low


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


#: IoUs per chunk of images in _match_anchors' pass: its three 2 MB buffers are reused chunk to chunk. Measured
#: (benchmarks/bench_boxes.py, 2 cores): 32 images x 8 boxes x 5,444 anchors in 3 chunks took 2.9 ms, in 11 chunks of
#: 1 << 17 (buffers in L2) 3.4 ms: each chunk costs about 15 operations' fixed overhead; other cases unchanged.
_CHUNK_ELEMENTS = 1 << 19
_ARGMAX_BLOCK = 64  # values per block of _first_argmax's search


class _IoUPass:
    """IoU of a chunk of images' ground-truth boxes with every anchor, Tensor[n, G, A], by box_iou's operations in
    box_iou's order (so box_iou's values), computed in place in three buffers reused from chunk to chunk: on CPU a
    fresh [B, G, A] tensor per operation costs about as much as the operation (page faults).
    The anchors' coordinates are made contiguous first: broadcasting over a column of [A, 4] does not vectorise."""

    def __init__(self, gt_boxes: Tensor, anchors: Tensor, chunk: int) -> None:
        self.gt_boxes = gt_boxes  # [B, G, 4]
        self.gt_area = box_area(gt_boxes)[..., None]  # [B, G, 1]
        self.anchor_coords = anchors.t().contiguous()  # [4, A]: contiguous rows vectorise, anchors' columns do not
        x1, y1, x2, y2 = self.anchor_coords
        self.anchor_area = (x2 - x1) * (y2 - y1)  # box_area(anchors)
        shape = (min(chunk, gt_boxes.shape[0]), gt_boxes.shape[1], anchors.shape[0])
        dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
        self.inter, self.work, self.spare = torch.empty((3, *shape), dtype=dtype, device=anchors.device)

    def __call__(self, start: int, stop: int) -> Tensor:
        count = stop - start
        gx1, gy1, gx2, gy2 = self.gt_boxes[start:stop, :, None].unbind(dim=-1)  # each [n, G, 1]
        ax1, ay1, ax2, ay2 = self.anchor_coords  # each [A]
        inter, work, spare = self.inter[:count], self.work[:count], self.spare[:count]
        torch.minimum(gx2, ax2, out=inter).sub_(torch.maximum(gx1, ax1, out=work)).clamp_(min=0)  # width
        torch.minimum(gy2, ay2, out=work).sub_(torch.maximum(gy1, ay1, out=spare)).clamp_(min=0)  # height
        inter.mul_(work)
        union = torch.add(self.anchor_area, self.gt_area[start:stop], out=work).sub_(inter)
        return inter.div_(union)


def _block_maxima(values: Tensor) -> Tensor:
    """Maximum of each block of _ARGMAX_BLOCK values along the last dimension (the last block may be short):
    Tensor[..., ceil(size / _ARGMAX_BLOCK)]. On CPU amax vectorises where argmax, ge and nonzero read one value at
    a time, so the searches below look at the blocks' maxima first and only then inside the blocks they pick."""
    size = values.shape[-1]
    whole_blocks, tail = divmod(size, _ARGMAX_BLOCK)
    block_max = values.new_empty((*values.shape[:-1], whole_blocks + (tail > 0)))
    if whole_blocks:
        blocks = values[..., : whole_blocks * _ARGMAX_BLOCK].unflatten(-1, (whole_blocks, _ARGMAX_BLOCK))
        torch.amax(blocks, dim=-1, out=block_max[..., :whole_blocks])
    if tail:
        torch.amax(values[..., whole_blocks * _ARGMAX_BLOCK :], dim=-1, out=block_max[..., -1])
    return block_max


def _block_members(blocks: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Indices of the values in blocks (Tensor[K, 1] int64) of _block_maxima, Tensor[K, _ARGMAX_BLOCK], and which of
    them exist (a short last block's indices past size - 1 are clamped to it, and marked False)."""
    members = blocks * _ARGMAX_BLOCK + torch.arange(_ARGMAX_BLOCK, device=blocks.device)
    exists = members < size
    return members.clamp_(max=size - 1), exists


def _first_argmax(values: Tensor, block_max: Tensor) -> Tensor:
    """torch.argmax(values, dim=-1) (the first of equal maxima), Tensor[...] int64, from _block_maxima(values): the
    first block holding the maximum holds its first occurrence. (A clamped index repeats the last value after its
    own place, so it is never the first.)"""
    candidates, _ = _block_members(block_max.argmax(dim=-1, keepdim=True), values.shape[-1])
    return candidates.gather(-1, values.gather(-1, candidates).argmax(dim=-1, keepdim=True)).squeeze(-1)


def _greedy_rounds(ious: Tensor, valid: Tensor) -> list[tuple[int, int, int]]:
    """d2l's greedy step as the book runs it, for images where two valid boxes share a best anchor.

    Once per box, the image's largest remaining (anchor, box) IoU is assigned and its anchor and box are discarded;
    ties go to the first pair in anchor-major order, as torch.argmax over the book's [A, G] matrix. Before a box is
    assigned at most G - 1 anchors are discarded, so its largest remaining IoU is among its G largest: the rounds run
    in Python over those candidates only (with every anchor that ties the G-th largest, so that ties still go to the
    first anchor).

    Args:
        ious (Tensor[C, G, A]): IoUs of the C images' boxes with every anchor.
        valid (Tensor[C, G]): False for padding boxes, which are never assigned.

    Returns:
        (image, anchor, box) per assigned pair, image counted in C.
    """
    num_gt, num_anchors = ious.shape[1:]
    kth_largest = ious.topk(min(num_gt, num_anchors), dim=-1).values[..., -1:]  # [C, G, 1]
    image, box, anchor = (ious >= kth_largest).nonzero(as_tuple=True)
    candidates: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for i, g, a, iou in zip(image.tolist(), box.tolist(), anchor.tolist(), ious[image, box, anchor].tolist()):
        candidates.setdefault((i, g), []).append((-iou, a))  # sorted below: largest IoU, then first anchor
    pairs = []
    for i, image_valid in enumerate(valid.tolist()):
        queues = {g: sorted(candidates[i, g]) for g, is_valid in enumerate(image_valid) if is_valid}
        taken: set[int] = set()
        while queues:
            best = None  # (-iou, anchor, box): the smallest is the book's argmax
            for g, queue in queues.items():
                while queue and queue[0][1] in taken:
                    queue.pop(0)
                if queue and (best is None or (*queue[0], g) < best):
                    best = (*queue[0], g)
            if best is None:  # fewer anchors than boxes: every anchor is taken
                break
            _, a, g = best
            pairs.append((i, a, g))
            taken.add(a)
            del queues[g]
    return pairs


def _greedy_step(ious: Tensor, valid: Tensor, best_anchor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The greedy step's (image, anchor, box) pairs in a chunk of images (see _match_anchors), from their IoUs
    (Tensor[n, G, A]), valid (Tensor[n, G]) and each box's first best anchor (Tensor[n, G])."""
    shared = (best_anchor[:, :, None] == best_anchor[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    shared.diagonal(dim1=1, dim2=2).fill_(False)
    collide = shared.flatten(1).any(dim=1)  # [n]
    images, boxes = (valid & ~collide[:, None]).nonzero(as_tuple=True)
    anchors = best_anchor[images, boxes]
    if bool(collide.any()):  # the book's rounds, in the images where two boxes share a best anchor
        colliding = collide.nonzero().squeeze(1)
        rounds = torch.tensor(_greedy_rounds(ious[colliding], valid[colliding]), dtype=torch.long, device=ious.device)
        local, round_anchors, round_boxes = rounds.reshape(-1, 3).t()
        images = torch.cat((images, colliding[local]))
        anchors = torch.cat((anchors, round_anchors))
        boxes = torch.cat((boxes, round_boxes))
    return images, anchors, boxes


def _match_chunk(ious: Tensor, valid: Tensor, iou_threshold: float, matches: Tensor) -> tuple[Tensor, Tensor]:
    """_match_anchors on a chunk of images, from their IoUs (Tensor[n, G, A], overwritten) and valid (Tensor[n, G]),
    into matches (Tensor[n, A], UNASSIGNED on entry). Returns the assigned (image, anchor) pairs."""
    if not bool(valid.all()):
        ious.masked_fill_(~valid[..., None], _DISCARDED_IOU)
    num_anchors = ious.shape[-1]
    block_max = _block_maxima(ious)  # [n, G, blocks]

    # Threshold step: each anchor's best box (the first of equal bests), where its IoU reaches the threshold. Only
    # the blocks of anchors whose maximum reaches it are searched.
    best_iou = ious.amax(dim=1)  # [n, A]
    hit_images, hit_blocks = (block_max.amax(dim=1) >= iou_threshold).nonzero(as_tuple=True)  # [K] each
    members, exists = _block_members(hit_blocks[:, None], num_anchors)  # [K, block]
    block, place = ((best_iou[hit_images[:, None], members] >= iou_threshold) & exists).nonzero(as_tuple=True)
    images, anchor_index = hit_images[block], members[block, place]  # [P] each
    boxes = ious[images, :, anchor_index].argmax(dim=1)  # [P, G] -> [P]
    matches[images, anchor_index] = boxes

    # Greedy step, replacing the threshold step's box of the anchors it assigns.
    greedy_images, greedy_anchors, greedy_boxes = _greedy_step(ious, valid, _first_argmax(ious, block_max))
    matches[greedy_images, greedy_anchors] = greedy_boxes
    new = best_iou[greedy_images, greedy_anchors] < iou_threshold  # anchors that the threshold step left unassigned
    return torch.cat((images, greedy_images[new])), torch.cat((anchor_index, greedy_anchors[new]))


def _match_one_box(ious: Tensor, valid: Tensor, iou_threshold: float, matches: Tensor) -> tuple[Tensor, Tensor]:
    """_match_chunk where the images have one ground-truth row each (banana detection's case, Tensor[n, 1, A] IoUs):
    every anchor assigned takes box 0, the threshold step is one comparison and the greedy step the box's first best
    anchor (nothing is discarded before it), a few operations instead of the block search's forty."""
    ious = ious[:, 0]  # [n, A]
    assigned = ious >= iou_threshold
    assigned[torch.arange(ious.shape[0], device=ious.device), ious.argmax(dim=1)] = True
    assigned &= valid  # [n, 1]: a padding row assigns nothing
    images, anchor_index = assigned.nonzero(as_tuple=True)
    matches[images, anchor_index] = 0
    return images, anchor_index


def _match_anchors(
    gt_boxes: Tensor, anchors: Tensor, gt_valid: Tensor, iou_threshold: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Assign ground-truth boxes to anchors in a batch of images (d2l 13.4.3.1).

    Every anchor whose best IoU is >= iou_threshold takes that box (the first of equal bests); then, once per box,
    the image's largest remaining (anchor, box) pair is assigned and its anchor and box are discarded, so that every
    valid box gets at least one anchor. Ties go to the first pair in (anchor, box) order, as torch.argmax does on
    the book's [A, G] matrix.

    The greedy step needs no rounds where, in an image, the valid boxes' best anchors (the first argmax of each
    box's IoUs) are all different: then each round picks some box's best anchor and discards no other box's best,
    so the rounds assign exactly the pairs (best anchor of box g, g), in any order. Only images where two boxes
    share a best anchor (or with more boxes than anchors) go through the book's rounds (_greedy_rounds). With one
    box per image, no rounds are needed at all (_match_one_box).

    The IoUs are computed for a chunk of images at a time, and each chunk is matched from them before the next
    (_match_chunk), so that they stay in the CPU's cache.

    Args:
        gt_boxes (Tensor[B, G, 4]), anchors (Tensor[A, 4]): (x1, y1, x2, y2).
        gt_valid (Tensor[B, G]): False for padding rows, which are never assigned.

    Returns:
        matches (Tensor[B, A]): int64 index of each anchor's box, or UNASSIGNED.
        (images, anchors): int64 Tensor[P] each, the assigned anchors' places in matches (in no particular order).
    """
    (batch, num_gt, _), num_anchors = gt_boxes.shape, anchors.shape[0]
    device = anchors.device
    matches = torch.full((batch, num_anchors), UNASSIGNED, dtype=torch.long, device=device)
    if num_gt == 0 or num_anchors == 0 or batch == 0:
        nothing = torch.zeros(0, dtype=torch.long, device=device)
        return matches, (nothing, nothing)
    chunk = max(1, _CHUNK_ELEMENTS // (num_gt * num_anchors)) if device.type == "cpu" else batch
    iou_pass = _IoUPass(gt_boxes, anchors, chunk)
    match = _match_chunk if num_gt > 1 else _match_one_box
    images, anchor_index = [], []
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        chunk_images, chunk_anchors = match(iou_pass(start, stop), gt_valid[start:stop], iou_threshold,
                                            matches[start:stop])
        images.append(chunk_images + start)
        anchor_index.append(chunk_anchors)
    return matches, (torch.cat(images), torch.cat(anchor_index))


def assign_anchor_to_bbox(
    ground_truth: Tensor, anchors: Tensor, device: torch.device | str, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> Tensor:
    """Assign the closest ground-truth box to each anchor of one image (see _match_anchors for the rule).

    Args:
        ground_truth (Tensor[G, 4]), anchors (Tensor[A, 4]): boxes in (x1, y1, x2, y2) format.
        device: device of the returned map.

    Returns:
        Tensor[A] anchors_bbox_map: int64 index into ground_truth, or UNASSIGNED (-1).
    """
    gt_valid = torch.ones((1, ground_truth.shape[0]), dtype=torch.bool, device=ground_truth.device)
    matches, _ = _match_anchors(ground_truth[None], anchors, gt_valid, iou_threshold)
    return matches[0].to(device)


def offset_boxes(anchors: Tensor, assigned_bb: Tensor, eps: float = OFFSET_LOG_EPS) -> Tensor:
    """Encode boxes as offsets from anchors (d2l 13.4.3.2).

    offset = (OFFSET_XY_SCALE * (c_bb_xy - c_anc_xy) / anc_wh, OFFSET_WH_SCALE * log(eps + bb_wh / anc_wh)).

    Args:
        anchors (Tensor[..., 4]), assigned_bb (Tensor[..., 4]): (x1, y1, x2, y2); leading dimensions broadcast.

    Returns:
        Tensor[..., 4]: offsets (dx, dy, dw, dh).

    The book's operations in the book's order (so its values, to the bit), on a pair of coordinates at a time, in
    place where they can be: half the time of the book's column-by-column form (30 against 60 us on banana's ~100
    assigned anchors a batch, a sixth of ``multibox_target``'s time there).
    """
    anchor_xy, anchor_wh = _centers_and_sizes(anchors)
    box_xy, box_wh = _centers_and_sizes(assigned_bb)
    offset_xy = (box_xy - anchor_xy).mul_(OFFSET_XY_SCALE).div_(anchor_wh)
    offset_wh = (box_wh / anchor_wh).add_(eps).log_().mul_(OFFSET_WH_SCALE)
    return torch.cat((offset_xy, offset_wh), dim=-1)


def offset_inverse(anchors: Tensor, offset_preds: Tensor) -> Tensor:
    """Decode offsets (Tensor[..., 4]) relative to anchors (Tensor[..., 4], corners) into corner boxes: the inverse
    of offset_boxes (up to its eps), center = anc_center + off_xy * anc_wh / OFFSET_XY_SCALE,
    wh = exp(off_wh / OFFSET_WH_SCALE) * anc_wh.
    """
    anchor_xy, anchor_wh = _centers_and_sizes(anchors)
    center_xy = anchor_xy + offset_preds[..., :2] * anchor_wh / OFFSET_XY_SCALE
    wh = torch.exp(offset_preds[..., 2:] / OFFSET_WH_SCALE) * anchor_wh
    return box_center_to_corner(torch.cat((center_xy, wh), dim=-1))


def multibox_target(
    anchors: Tensor, labels: Tensor, iou_threshold: float = DEFAULT_IOU_THRESHOLD
) -> tuple[Tensor, Tensor, Tensor]:
    """Label anchors with classes and box offsets from the ground truth of a batch of images (d2l 13.4.3).

    The whole batch is labelled at once (see _match_anchors: one IoU pass over chunks of images; the greedy step
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
        matches, (images, anchor_index) = _match_anchors(gt_boxes, anchors, gt_classes >= 0, iou_threshold)

        dtype = torch.promote_types(anchors.dtype, labels.dtype)
        class_labels = torch.full((batch * num_anchors,), BACKGROUND, dtype=torch.long, device=anchors.device)
        # Offsets and mask share one allocation: writing the zeros of fresh outputs is much of the call's time, and
        # glibc served one [2, B * A, 4] block from memory it kept (about 40 page faults a call in a loop on 32 x
        # 5,444 anchors) where two [B * A, 4] ones came fresh from the kernel (about 1,600).
        offsets, bbox_mask = torch.zeros((2, batch * num_anchors, 4), dtype=dtype, device=anchors.device)
        assigned = images * num_anchors + anchor_index  # [P] into the batch's B * A anchors
        gt_index = images * num_gt + matches[images, anchor_index]  # [P] into its B * G boxes
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
