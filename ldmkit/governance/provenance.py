"""Where an image came from: the generation record ldmkit embeds in its files, the request id hidden in its
pixels by the invisible watermark (which survives the metadata being stripped, JPEG, resizing and cropping), and
the C2PA content credentials a server signs its outputs with (credentials.py), valid only while the file is intact.

`ldmkit provenance IMAGE` reads both with inspect_image and looks the request up in the audit trail: by the
watermark's tag (the first 12 hex digits of the request id) and by the file's SHA-256, which matches the audit row's
outputs when the file is exactly the one served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.images import read_parameters
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
    reading = watermark.read(pixels, key) if min(pixels.shape[:2]) >= watermark.MIN_SIDE else None
    tag = reading.tag.hex() if reading is not None and reading.tag is not None else None
    crop = tuple(reading.crop) if tag else None
    size = (pixels.shape[1], pixels.shape[0])
    credentials = read_credentials(data, image_format, trust)
    return Provenance(str(path), hashlib.sha256(data).hexdigest(), size, record, tag, crop, credentials)
