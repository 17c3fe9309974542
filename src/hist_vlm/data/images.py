"""An image file read as the RGB picture a user expects, or one line saying why not.

`Image.open(path).convert("RGB")` (what ALBEF and SelfEQ do) is wrong for some modes the formats
allow: a 16-bit grey PNG (mode "I;16") is clipped to 255, an all-white picture; 32-bit integer
("I") and float ("F") grey fare the same. `open_rgb` scales those to 8 bits instead: 16-bit
values / 257 (0..65535 -> 0..255 exactly), "I" the same when its values fit 16 bits, "F" x 255
when its values lie in [0, 1]; anything else it refuses. Palette, 1-bit, grey + alpha, RGBA,
CMYK and the other 8-bit modes go through Pillow's `convert("RGB")` (alpha is dropped, as the
reference code drops it). A file that is not an image, is truncated or empty, or has more
pixels than `max_pixels` (a decompression bomb: `HIST_VLM_MAX_IMAGE_PIXELS`, default Pillow's
89,478,485, about 9,459 x 9,459) is an `ImageError` naming the file.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS_ENV = "HIST_VLM_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485          # Pillow's Image.MAX_IMAGE_PIXELS
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image file that cannot be read as a picture; the message is one line naming it."""


def max_pixels() -> int:
    """The largest image (width x height) `open_rgb` decodes: $HIST_VLM_MAX_IMAGE_PIXELS or Pillow's."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(f"{MAX_PIXELS_ENV}={text!r}: give a positive whole number of pixels")
    return value


def open_rgb(path: str | Path, limit: int | None = None) -> Image.Image:
    """The picture at `path` as an 8-bit RGB image (module doc); `limit` overrides `max_pixels()`."""
    limit = max_pixels() if limit is None else limit
    Image.MAX_IMAGE_PIXELS = limit   # Pillow refuses above twice this at open; we refuse above it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit below
            with Image.open(path) as im:
                width, height = im.size
                if width * height > limit:
                    raise ImageError(f"{path}: {width} x {height} pixels is over the limit of {limit:,} "
                                     f"(a decompression bomb?); raise {MAX_PIXELS_ENV} to read it")
                im.load()
                return _to_rgb(im, path)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: more than twice the limit of {limit:,} pixels (a decompression bomb?); "
                         f"raise {MAX_PIXELS_ENV} to read it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:   # SyntaxError: Pillow's for bad headers
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"{path}: not a readable image ({reason})") from None


def _to_rgb(im: Image.Image, path) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"{path}: {im.mode} image with values outside 0..65535; convert it to 8 or 16 bits")
        return _grey(np.rint(values / 257.0))
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ImageError(f"{path}: floating-point image with values outside [0, 1]; convert it to 8 bits")
        return _grey(np.rint(values * 255.0))
    return im.convert("RGB")


def _grey(values: np.ndarray) -> Image.Image:
    """[H, W] values in 0..255 -> an RGB picture of that grey."""
    return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")
