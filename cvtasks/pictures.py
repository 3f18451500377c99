"""Turning tensors and arrays into pictures: for MLflow, ``raycv predict`` output and the style contact sheet.

Formats: model inputs are float (N, 3, H, W) numpy arrays or tensors; pictures are uint8 (H, W, 3) arrays until
:func:`grid` lays them out as one PIL image. Colours are RGB tuples. Boxes are corner boxes (x1, y1, x2, y2) in
pixels (:func:`to_pixels` converts fractions of the image); class masks are (H, W) integer maps coloured through a
(256, 3) uint8 palette.

Drawing stays in PIL where torchvision's helpers would change today's pictures: ``draw_bounding_boxes`` truncates
box corners to whole pixels and writes labels inside the box, and ``draw_segmentation_masks`` truncates blended
colours instead of rounding them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from cvtasks.transforms import IMAGENET_MEAN, IMAGENET_STD, UINT8_MAX

Colour = tuple[int, int, int]
TEXT_COLOUR: Colour = (0, 0, 0)
TRUTH_COLOUR: Colour = (0, 200, 0)
PREDICTION_COLOUR: Colour = (230, 30, 30)
#: Distinct colours for drawing several boxes of one kind (e.g. the anchors of a cell).
PALETTE: tuple[Colour, ...] = ((30, 100, 255), (255, 140, 0), (200, 0, 200), (0, 190, 190), (230, 30, 30),
                               (0, 200, 0))
WHITE = (255, 255, 255)
CAPTION_FONT_SIZE = 11
CAPTION_LINE = 14  # pixels per caption line under a tile
TILE_MIN_SIDE = 96  # small inputs (CIFAR's 32 px) are enlarged to this, nearest-neighbour, to be readable
LINE_WIDTH = 2  # of box outlines
GAP = 2  # white pixels around and between the tiles of a grid


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


def denormalize(images: np.ndarray | torch.Tensor, mean: Sequence[float] | None = IMAGENET_MEAN,
                std: Sequence[float] | None = IMAGENET_STD) -> np.ndarray:
    """Model input float (N, C, H, W) (array or tensor, any device) -> displayable uint8 (N, H, W, C), undoing
    ``(x - mean) / std``; ``mean=None`` for input that was only scaled to [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    pixels = np.asarray(images, dtype=np.float32).transpose(0, 2, 3, 1)
    if mean is not None:
        pixels = pixels * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(pixels * UINT8_MAX), 0, UINT8_MAX).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], columns: int, gap: int = GAP) -> Image.Image:
    """uint8 (H, W, 3) tiles, ``columns`` per row, on a white canvas with ``gap`` pixels around every cell; each cell
    is the size of the largest tile, a smaller tile sits in its top-left corner."""
    cell_h = max(tile.shape[0] for tile in tiles)
    cell_w = max(tile.shape[1] for tile in tiles)
    cells = torch.stack([
        F.pad(torch.from_numpy(np.array(tile)).permute(2, 0, 1),
              (0, cell_w - tile.shape[1], 0, cell_h - tile.shape[0]), value=UINT8_MAX)
        for tile in tiles
    ])
    if len(cells) == 1:  # make_grid returns a lone tile as it is, without the gap around it
        canvas = F.pad(cells[0], (gap, gap, gap, gap), value=UINT8_MAX)
    else:
        canvas = make_grid(cells, nrow=columns, padding=gap, pad_value=UINT8_MAX)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def captioned_tile(image: np.ndarray, lines: Sequence[tuple[str, Colour]]) -> np.ndarray:
    """uint8 (H, W, 3), enlarged to at least ``TILE_MIN_SIDE`` wide, over a white strip with coloured text lines."""
    tile = Image.fromarray(np.ascontiguousarray(image))
    scale = max(1, -(-TILE_MIN_SIDE // tile.width))
    tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (tile.width, tile.height + CAPTION_LINE * len(lines)), "white")
    canvas.paste(tile, (0, 0))
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, (text, colour) in enumerate(lines):
        draw.text((2, tile.height + i * CAPTION_LINE), text, fill=colour, font=font)
    return np.asarray(canvas)


def to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Corner boxes (K, 4) as fractions of the image -> pixels."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([width, height, width, height])


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colours: Colour | Sequence[Colour],
               captions: Sequence[str] | None = None, below: bool = False) -> np.ndarray:
    """A copy of uint8 ``image`` (H, W, 3) with pixel boxes (K, 4) (x1, y1, x2, y2) outlined, captions above them
    (``below``: under them, so that truth and predictions drawn on one image keep their captions apart).

    ``colours`` is one colour for every box or one per box.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    per_box = colours if colours and isinstance(colours[0], (tuple, list)) else [colours] * len(boxes)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        colour = tuple(per_box[i])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=LINE_WIDTH)
        if captions:
            left, top, right, bottom = draw.textbbox((x1, y1), captions[i], font=font)
            text_h = bottom - top + 2
            y = min(y2, canvas.height - text_h) if below else max(0.0, y1 - text_h)
            draw.rectangle((x1, y, x1 + right - left + 2, y + text_h), fill=colour)
            draw.text((x1 + 1, y), captions[i], fill=WHITE, font=font)
    return np.asarray(canvas)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class mask (H, W) -> uint8 (H, W, 3) through a (256, 3) palette."""
    return palette[np.asarray(mask, dtype=np.int64).clip(0, len(palette) - 1)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image (H, W, 3) uint8; background (class 0) pixels keep the image unchanged."""
    colours = colorize(mask, palette).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    out = np.where((np.asarray(mask) != 0)[..., None], blended, image.astype(np.float32))
    return np.clip(np.rint(out), 0, UINT8_MAX).astype(np.uint8)
