"""Drawing bounding boxes with captions on images, for MLflow pictures and ``raycv predict`` output."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]
TRUTH_COLOUR: Colour = (0, 200, 0)
PREDICTION_COLOUR: Colour = (230, 30, 30)
#: Distinct colours for drawing several boxes of one kind (e.g. the anchors of a cell).
PALETTE: tuple[Colour, ...] = ((30, 100, 255), (255, 140, 0), (200, 0, 200), (0, 190, 190), (230, 30, 30),
                               (0, 200, 0))
CAPTION_FONT_SIZE = 11
LINE_WIDTH = 2


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=CAPTION_FONT_SIZE)


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
            draw.text((x1 + 1, y), captions[i], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
