"""Decoding and validating crops: every image that enters a store passes through here.

The rule, the same for ingest and predict: a crop is 8-bit RGB of the expected size. RGBA
is accepted only when its alpha is fully opaque (some exporters add an alpha channel that
carries nothing); greyscale, palette, CMYK, 16-bit, transparent or wrongly sized images are
errors that name the file (and page), because converting them silently would hide a broken
export. Planar (RGBRGB... per plane) and interleaved TIFFs are the same image.

TIFFs (single crops and the platform's multi-page stacks) are read with tifffile and checked
complete: the chain of pages must end where the file says it does and every page's pixel
data must lie inside the file, so a truncated stack is an error, not fewer pages. Other
formats are read with Pillow, whose silent 16-to-8-bit reduction is refused here.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from data_tools.errors import UserError

CROP_SIZE = 128  # pixels; the MIDOG 2025 Track 2 crop size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
SIXTEEN_BIT = "16-bit image, expected 8-bit RGB (convert the export to 8 bits per channel)"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_TIFF_COLOUR = {tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR}  # YCbCr (JPEG) decodes to RGB


class ImageError(UserError, ValueError):
    """One image cannot enter a store; the message names the file (and page)."""

    def __init__(self, where: str, reason: str | None = None):
        super().__init__(where if reason is None else f"{where}: {reason}")
        self.where, self.reason = (None, where) if reason is None else (where, reason)


def as_rgb(array: np.ndarray, where: str, size: int | tuple[int, int] | None = CROP_SIZE) -> np.ndarray:
    """Validate a decoded image as uint8 RGB [H, W, 3] (dropping an opaque alpha channel)."""
    if array.dtype != np.uint8:
        raise ImageError(where, SIXTEEN_BIT if array.dtype == np.uint16 else f"pixel type {array.dtype}, expected 8-bit RGB")
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
    if _is_tiff(source):
        pages = read_tiff(source, where, size)
        if len(pages) != 1:
            raise ImageError(where, f"TIFF of {len(pages)} pages, expected one crop per file")
        return pages[0]
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise ImageError(where, f"image mode {im.mode}, expected RGB")
            if any(";16" in str(tile.args) for tile in im.tile):  # Pillow would keep the high bytes only
                raise ImageError(where, SIXTEEN_BIT)
            array = np.asarray(im)
    except FileNotFoundError:
        raise ImageError(where, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(where, f"cannot decode image ({e})") from None
    return as_rgb(array, where, size)


def _is_tiff(source: str | Path | bytes) -> bool:
    if isinstance(source, bytes):
        return source[:4] in _TIFF_MAGIC
    return Path(source).suffix.lower() in TIFF_SUFFIXES


def read_tiff(source: str | Path | bytes, where: str | None = None,
              size: int | tuple[int, int] | None = CROP_SIZE) -> list[np.ndarray]:
    """Every page of a TIFF (file or bytes) as uint8 RGB [H, W, 3], in page order, checked complete.

    ImageError names the file and the page: a truncated or corrupt file, a page that does
    not decode, a page that is not 8-bit RGB of `size`.
    """
    where = where or str(source)
    try:
        with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as tif:
            _check_complete(tif, where)
            return [_tiff_page(page, f"{where} page {i}", size) for i, page in enumerate(tif.pages)]
    except FileNotFoundError:
        raise ImageError(where, "file not found") from None
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken file
        raise ImageError(where, f"not a readable TIFF ({type(e).__name__}: {e})") from None


def _check_complete(tif: tifffile.TiffFile, where: str) -> None:
    """The page chain ends with a zero pointer, pages promised by the metadata are all there,
    and each page's pixel data lies inside the file (a cut file fails one of these)."""
    fh, end = tif.filehandle, tif.filehandle.size
    n = len(tif.pages)
    if n == 0:
        raise ImageError(where, "not a readable TIFF (no page: an empty or broken file)")
    fh.seek(tif.pages.next_page_offset)
    raw = fh.read(tif.tiff.offsetsize)
    following = struct.unpack(tif.tiff.offsetformat, raw)[0] if len(raw) == tif.tiff.offsetsize else None
    if following != 0:
        at = "past the end of the file" if following is None or following >= end else f"at byte {following}"
        raise ImageError(where, f"truncated or corrupt TIFF: page {n} is announced {at} (file size {end} bytes); "
                                f"only pages 0-{n - 1} are readable")
    promised = _promised_pages(tif)
    if promised is not None and promised != n:
        raise ImageError(where, f"truncated TIFF: its metadata promises {promised} pages, the file holds {n}")
    for i, page in enumerate(tif.pages):
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
        if not ends or max(ends) > end or 0 in page.databytecounts:
            raise ImageError(f"{where} page {i}", f"pixel data missing or past the end of the file ({end} bytes): "
                                                 "truncated or corrupt TIFF")


def _promised_pages(tif: tifffile.TiffFile) -> int | None:
    """How many pages the file's own metadata announces (tifffile's shape or ImageJ's images)."""
    if tif.is_shaped and tif.shaped_metadata and tif.shaped_metadata[0].get("shape"):
        return int(np.prod(tif.shaped_metadata[0]["shape"])) // max(int(np.prod(tif.pages[0].shape)), 1)
    if tif.is_imagej and tif.imagej_metadata and "images" in tif.imagej_metadata:
        return int(tif.imagej_metadata["images"])
    return None


def _tiff_page(page, where: str, size: int | tuple[int, int] | None) -> np.ndarray:
    """One page as uint8 RGB: planar pages become interleaved; colour model and depth checked."""
    if page.photometric not in _TIFF_COLOUR:
        name = getattr(page.photometric, "name", page.photometric)
        raise ImageError(where, "greyscale image, expected RGB" if name in ("MINISBLACK", "MINISWHITE")
                         else f"TIFF colour model {name}, expected RGB")
    try:
        array = page.asarray()
    except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable page
        raise ImageError(where, f"cannot be decoded ({type(e).__name__}: {e})") from None
    if page.axes.startswith("S") and array.ndim == 3:  # planar configuration: [S, H, W]
        array = np.moveaxis(array, 0, -1)
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
