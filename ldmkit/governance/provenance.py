"""Where an image came from: the generation record ldmkit embeds in its files, the request id hidden in its
pixels by the invisible watermark (which survives the metadata being stripped, JPEG, resizing and cropping), and
the C2PA content credentials a server signs its outputs with (credentials.py), valid only while the file is intact.

`ldmkit provenance IMAGE` reads both with inspect_image and looks the request up in the audit trail: by the
watermark's tag (the first 12 hex digits of the request id) and by the file's SHA-256, which matches the audit row's
outputs when the file is exactly the one served.

A grid (`ldmkit generate` of several images) carries no mark of its own: each tile carries its image's. The record
of a grid says where each tile lies ("tiles": index, seed and box), and the reader reads each tile there; without the
record (stripped metadata) it finds the tiles from the grid's white gutters (data.images.grid_layouts).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.images import BOX_KEYS, grid_layouts, read_parameters
from ..errors import InputError, MissingFileError
from . import watermark
from .credentials import read_credentials


@dataclass(frozen=True)
class Provenance:
    path: str
    sha256: str  # of the file's bytes
    size: tuple[int, int]  # (width, height)
    record: dict | None  # the embedded generation record ("ldmkit" metadata), None when the file has none
    tag: str | None  # the watermark's tag in hex (the first 12 hex digits of a request id), None when not found
    crop: tuple[int, int, int, int] | None  # pixels the watermark was found cut from the left, top, right, bottom
    credentials: dict | None = None  # the C2PA manifest's state, signer and record (read_credentials), None: none
    tiles: list[dict] | None = None  # a grid's tiles: index, seed (None when unknown), box, watermark (hex or None)

    @property
    def request_id(self) -> str | None:
        """The request id of the embedded record, if any."""
        rid = (self.record or {}).get("request_id")
        return rid if isinstance(rid, str) else None

    @property
    def consistent(self) -> bool | None:
        """Whether the record's request id and the watermark agree (None when one of them is missing)."""
        if self.request_id is None or self.tag is None:
            return None
        return self.request_id.lower().startswith(self.tag)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": list(self.size),
            "record": self.record,
            "watermark": self.tag,
            "watermark_crop": list(self.crop) if self.crop else None,
            "consistent": self.consistent,
            "credentials": self.credentials,
            "tiles": self.tiles,
        }


def inspect_image(path: str | Path, key: str = "ldmkit", trust: str | Path | None = None) -> Provenance:
    """The embedded record, the watermark and the content credentials of the image file `path` (PNG, JPEG, WebP,
    ... any PIL reads); `trust`: a PEM file of the root certificates whose credentials count as trusted."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image {path} does not exist")
    data = path.read_bytes()
    try:
        with Image.open(path) as im:
            im.load()
            image_format = im.format or ""
            pixels = np.asarray(im.convert("L") if im.mode in ("L", "LA", "I", "I;16") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path} is not an image ldmkit can read ({e}); give a PNG, JPEG or WebP file") from None
    try:
        raw = read_parameters(path).get("ldmkit")
        record = json.loads(raw) if isinstance(raw, str) else raw if isinstance(raw, dict) else None
    except (ValueError, OSError):
        record = None  # a damaged or foreign metadata block: the pixels may still say more
    tiles = _record_tiles(record, pixels.shape[:2])  # a grid: read each tile where its record says it lies
    if tiles is not None:
        _read_tiles(pixels, tiles, key)
    reading = None
    if _common_tag(tiles) is None and min(pixels.shape[:2]) >= watermark.MIN_SIDE:
        reading = watermark.read(pixels, key)
        if reading.tag is None:  # perhaps a grid whose record is gone
            reading, tiles = None, _found_tiles(pixels, key) or tiles
    tag = reading.tag.hex() if reading is not None and reading.tag is not None else _common_tag(tiles)
    crop = tuple(reading.crop) if reading is not None and tag else None
    size = (pixels.shape[1], pixels.shape[0])
    credentials = read_credentials(data, image_format, trust)
    return Provenance(str(path), hashlib.sha256(data).hexdigest(), size, record, tag, crop, credentials, tiles)


def _record_tiles(record: dict | None, shape: tuple[int, int]) -> list[dict] | None:
    """The tiles a grid's record names (index, seed, box inside an image of `shape` (H, W)), None when it names
    none or names them wrongly (a damaged or forged record: the tiles are then searched for)."""
    listed = (record or {}).get("tiles")
    if not isinstance(listed, list) or not listed:
        return None
    tiles = []
    for t in listed:
        box = t.get("box") if isinstance(t, dict) else None
        if isinstance(box, dict):  # {"left", "top", "right", "bottom"}: a list of small numbers would reach a
            box = [box.get(k) for k in BOX_KEYS]  # C2PA manifest as a byte string
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            return None
        left, top, right, bottom = box
        if not (0 <= left < right <= shape[1] and 0 <= top < bottom <= shape[0]):
            return None
        seed = t.get("seed")
        index = t.get("index")
        tiles.append({"index": index if isinstance(index, int) else len(tiles), "seed": seed, "box": box})
    return tiles


def _found_tiles(pixels: np.ndarray, key: str) -> list[dict] | None:
    """The tiles of the first grid layout whose gutters are white and one of whose tiles carries a mark, each with
    its box and no seed (a grid whose record is gone); None when no layout fits or no tile reads."""
    h, w = pixels.shape[:2]
    for layout in grid_layouts(w, h, least_side=watermark.MIN_SIDE):
        if not layout.gutters_blank(pixels):
            continue
        tiles = [{"index": i, "seed": None, "box": list(layout.box(i))} for i in range(layout.n)]
        tiles = [t for t in tiles if _crop(pixels, t["box"]).min() < 235]  # a blank cell ends the last row
        _read_tiles(pixels, tiles, key)
        if any(t["watermark"] for t in tiles):
            return tiles
    return None


def _crop(pixels: np.ndarray, box: list[int]) -> np.ndarray:
    left, top, right, bottom = box
    return pixels[top:bottom, left:right]


def _read_tiles(pixels: np.ndarray, tiles: list[dict], key: str) -> None:
    """Each tile's watermark (hex, or None when it has none or is too small to carry one), in t["watermark"]."""
    for t in tiles:
        tile = np.ascontiguousarray(_crop(pixels, t["box"]))
        found = watermark.read(tile, key).tag if min(tile.shape[:2]) >= watermark.MIN_SIDE else None
        t["watermark"] = found.hex() if found is not None else None


def _common_tag(tiles: list[dict] | None) -> str | None:
    """The tag every marked tile carries (a grid is one run's), None when none does or they differ."""
    tags = {t["watermark"] for t in tiles or () if t["watermark"]}
    return tags.pop() if len(tags) == 1 else None
