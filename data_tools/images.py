"""Decoding and validating crops: every image that enters a store passes through here.

The rule: a crop is uint8 RGB of the expected size. RGBA is accepted only when its alpha
is fully opaque (some exporters add an alpha channel that carries nothing); greyscale,
palette, CMYK, 16-bit, transparent or wrongly sized images are errors that name the file,
because converting them silently would hide a broken export.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

CROP_SIZE = 128  # pixels; the MIDOG 2025 Track 2 crop size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageError(ValueError):
    """One image cannot enter a store; the message names the file (and page)."""

    def __init__(self, where: str, reason: str | None = None):
        super().__init__(where if reason is None else f"{where}: {reason}")
        self.where, self.reason = (None, where) if reason is None else (where, reason)


def as_rgb(array: np.ndarray, where: str, size: int | tuple[int, int] | None = CROP_SIZE) -> np.ndarray:
    """Validate a decoded image as uint8 RGB [H, W, 3] (dropping an opaque alpha channel)."""
    if array.dtype != np.uint8:
        raise ImageError(where, f"pixel type {array.dtype}, expected 8-bit RGB")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 2)):
        raise ImageError(where, "greyscale image, expected RGB")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ImageError(where, f"array of shape {array.shape}, expected RGB [H, W, 3]")
    if array.shape[-1] == 4:
        if array[..., 3].min() < 255:
            raise ImageError(where, "RGBA image with transparent pixels, expected RGB")
        array = array[..., :3]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if array.shape[:2] != (h, w):
            raise ImageError(where, f"size {array.shape[1]}x{array.shape[0]}, expected {w}x{h}")
    return np.ascontiguousarray(array)


def decode_image(source: str | Path | bytes, where: str | None = None,
                 size: int | tuple[int, int] | None = CROP_SIZE) -> np.ndarray:
    """The one decoder: an image file or encoded bytes (PNG, JPEG, TIFF, ...) -> uint8 RGB [H, W, 3].
    ImageError names `where` (default: the file) otherwise."""
    where = where or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise ImageError(where, f"image mode {im.mode}, expected RGB")
            array = np.asarray(im)
    except FileNotFoundError:
        raise ImageError(where, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(where, f"cannot decode image ({e})") from None
    return as_rgb(array, where, size)


def load_crop(path: str | Path, size: int | tuple[int, int] | None = CROP_SIZE) -> np.ndarray:
    """Decode one image file into uint8 RGB [H, W, 3]; ImageError names the file otherwise."""
    return decode_image(Path(path), str(path), size)


def decode_base64_image(text: str, where: str, size: int | None = None) -> np.ndarray:
    """A base64 string of an encoded image (the REST scoring input) as uint8 RGB."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ImageError(where, f"not base64 ({e})") from None
    return decode_image(data, where, size)


def encode_png_base64(image: np.ndarray) -> str:
    """The inverse, for clients: uint8 RGB [H, W, 3] -> base64 PNG string."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def load_crops(paths: Sequence[str | Path], size: int | tuple[int, int] = CROP_SIZE, workers: int | None = None,
               progress: bool = True) -> tuple[np.ndarray, list[str | None]]:
    """Decode many crops in a thread pool (Pillow releases the GIL while decoding).

    Returns the images [N, H, W, 3] (bad ones left black) and, per path, None or the reason
    it failed, so the caller decides whether to raise on the first problem or to skip.
    """
    h, w = (size, size) if isinstance(size, int) else size
    images = np.zeros((len(paths), h, w, 3), np.uint8)
    errors: list[str | None] = [None] * len(paths)

    def one(i: int) -> None:
        try:
            images[i] = load_crop(paths[i], (h, w))
        except ImageError as e:
            errors[i] = e.reason

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(one, range(len(paths)))
        if progress and len(paths) > 500:
            from tqdm import tqdm
            jobs = tqdm(jobs, total=len(paths), desc="decode crops", unit="img", mininterval=1.0)
        for _ in jobs:
            pass
    return images, errors
