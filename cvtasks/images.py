"""Image decoding and encoding helpers shared by every format reader."""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvtasks.errors import DataFormatError

#: What Pillow raises on bytes it cannot decode: not an image, truncated or corrupt data, and images whose header
#: claims more than twice ``Image.MAX_IMAGE_PIXELS`` (``DecompressionBombError`` is no OSError or ValueError).
DECODE_ERRORS: tuple[type[Exception], ...] = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
    Image.DecompressionBombError,
)
#: Pillow's modes of 16-bit grayscale (PNG/TIFF); converting them straight to RGB clips everything above 255.
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")
SIXTEEN_TO_EIGHT_BIT = 257  # 65535 / 255
MAX_8BIT = 255
#: Modes whose conversion to RGB keeps the picture (after :func:`to_8bit`); others (float "F" TIFFs, ...) have no
#: colour meaning Pillow's conversion could keep, so they are refused rather than clipped.
RGB_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def decode_image(data: bytes, path: object) -> Image.Image:
    """The image in ``data`` (read from ``path``), fully decoded.

    Anything Pillow cannot decode (see :data:`DECODE_ERRORS`: an empty file, not an image, truncated data, a
    decompression bomb) raises :class:`DataFormatError` naming ``path``, so ``data.skip_bad`` can skip it.
    """
    if not data:
        raise DataFormatError(path, "not a readable image (the file is empty)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:
        raise DataFormatError(path, "not a readable image (no image format recognised in its bytes)") from exc
    except DECODE_ERRORS as exc:
        raise DataFormatError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8-bit ("L"); any other image as it is."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    scaled = np.asarray(img, dtype=np.float64) / SIXTEEN_TO_EIGHT_BIT
    return Image.fromarray(np.clip(np.round(scaled), 0, MAX_8BIT).astype(np.uint8), mode="L")


def check_rgb_convertible(img: Image.Image, path: object) -> None:
    """Raise :class:`DataFormatError` naming ``path`` when ``img``'s mode has no faithful RGB conversion."""
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise DataFormatError(path, f"unsupported image mode {img.mode!r}: expected 8-bit or 16-bit grayscale, "
                                    "palette, RGB(A) or CMYK")


def decode_rgb(data: bytes, path: object) -> np.ndarray:
    """Decode image bytes to an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale (16-bit scaled to 8-bit), palette and RGBA images are converted to RGB. A truncated or corrupt file,
    a decompression bomb or an image mode without an RGB meaning raises :class:`DataFormatError` naming ``path``
    instead of yielding a partly grey or clipped image.
    """
    img = to_8bit(decode_image(data, path))
    check_rgb_convertible(img, path)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DECODE_ERRORS as exc:
        raise DataFormatError(path, f"cannot convert a {img.mode} image to RGB ({exc})") from exc


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG bytes.

    zlib level 1: the demo writers encode thousands of images; it encodes them about 2.7x faster than PIL's
    default level 6 for files about 1.6x larger, and they decode as fast.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def object_array(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding ``arrays`` (np.array would stack equal shapes into one array)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out
