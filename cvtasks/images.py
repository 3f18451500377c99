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
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG bytes.

    zlib level 1: the demo writers encode thousands of images; it encodes them about 2.7x faster than PIL's
    default level 6 for files about 1.6x larger, and they decode as fast.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
