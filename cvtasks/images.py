"""Image decoding and encoding helpers shared by every format reader."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvtasks.errors import DataFormatError


def decode_rgb(data: bytes, path: object) -> np.ndarray:
    """Decode image bytes to an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale, palette and RGBA images are converted to RGB. A truncated or corrupt file raises
    :class:`DataFormatError` naming ``path`` instead of yielding a partly grey image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(path, f"not a readable image ({exc})") from exc


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()
