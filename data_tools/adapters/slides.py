"""Reading square regions of whole-slide images at full resolution (level 0).

OpenSlide reads the vendor formats and generic tiled TIFFs; plain TIFFs it refuses (e.g.
striped, or unusual layouts) are read with tifffile, tile by tile, so a 100,000-pixel
slide is never decoded whole. Regions that reach past the slide edge are padded white,
as blank glass looks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from data_tools.errors import UserError

WHITE = 255


class SlideError(UserError, ValueError):
    """A slide cannot be opened or read; the message names the file."""


class Slide(Protocol):
    path: Path
    dimensions: tuple[int, int]  # (width, height) at level 0

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        """uint8 RGB [size, size, 3] whose top-left corner is (x, y) at level 0."""

    def close(self) -> None: ...


class OpenSlideSlide:
    def __init__(self, path: Path):
        import openslide
        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideError(f"{path}: OpenSlide cannot open it ({e})") from None
        self.dimensions = tuple(self._slide.dimensions)

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((int(x), int(y)), 0, (size, size)), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0  # 0 outside the slide: composite onto white
        return np.round(rgba[..., :3] * alpha + WHITE * (1 - alpha)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffSlide:
    """Level 0 of a TIFF via tifffile: the largest page; tiled pages are decoded per tile."""

    def __init__(self, path: Path):
        import tifffile
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken file
            raise SlideError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
        self._page = max(self._tif.pages, key=lambda p: p.imagewidth * p.imagelength)
        page = self._page
        if page.samplesperpixel not in (3, 4) or page.dtype != np.uint8 or page.planarconfig != 1:
            self.close()
            raise SlideError(f"{path}: level 0 is not 8-bit interleaved RGB "
                             f"({page.samplesperpixel} samples, {page.dtype}, planar config {page.planarconfig})")
        self.dimensions = (page.imagewidth, page.imagelength)
        self._whole: np.ndarray | None = None

    def _tile(self, index: int) -> np.ndarray:
        page, fh = self._page, self._tif.filehandle
        args = {"_fullsize": True}
        if page.compression in (6, 7, 34892, 33007):  # JPEG flavours need the shared tables
            args.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        tile, _, _ = page.decode(data, index, **args)
        return tile.reshape(page.tilelength, page.tilewidth, -1)[..., :3]

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        out = np.full((size, size, 3), WHITE, np.uint8)
        w, h = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x0 >= x1 or y0 >= y1:
            return out
        page = self._page
        if not page.is_tiled:
            if self._whole is None:  # striped TIFF: decoded once per slide
                self._whole = page.asarray()[..., :3]
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._whole[y0:y1, x0:x1]
            return out
        tw, th = page.tilewidth, page.tilelength
        per_row = -(-w // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(ty * per_row + tx)
                ax0, ay0 = max(x0, tx * tw), max(y0, ty * th)
                ax1, ay1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[ay0 - ty * th:ay1 - ty * th, ax0 - tx * tw:ax1 - tx * tw]
        return out

    def close(self) -> None:
        self._tif.close()


READERS = ("auto", "openslide", "tifffile")


def open_slide(path: str | Path, reader: str = "auto") -> Slide:
    """Open a slide with OpenSlide, or with tifffile where OpenSlide refuses a TIFF ("auto")."""
    path = Path(path)
    if reader not in READERS:
        raise SlideError(f"reader must be one of {READERS}, got {reader!r}")
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    if reader == "tifffile":
        return TiffSlide(path)
    try:
        return OpenSlideSlide(path)
    except SlideError:
        if reader == "openslide" or path.suffix.lower() not in (".tif", ".tiff"):
            raise
        return TiffSlide(path)


def crop_centred(slide: Slide, cx: float, cy: float, size: int) -> tuple[np.ndarray, bool]:
    """The size x size crop centred on (cx, cy), and whether it lies wholly inside the slide."""
    x, y = int(round(cx)) - size // 2, int(round(cy)) - size // 2
    w, h = slide.dimensions
    return slide.read(x, y, size), (x >= 0 and y >= 0 and x + size <= w and y + size <= h)
