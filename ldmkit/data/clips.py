"""Clip files: writing frames as an animated GIF, an MP4 (H.264 through PyAV, which bundles its own FFmpeg) or a
PNG frame strip, by the extension, each with the generation parameters embedded; and reading frames from clip files
(mp4, webm, gif, ...) at a chosen rate without decoding more of the file than the frames asked for.

PyAV is an optional dependency (`pip install ldmkit[video]`): GIF and PNG strips need only Pillow.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ..checkpoint import atomic_write
from ..errors import InputError
from .images import IMAGE_SUFFIXES, write_image

CLIP_FORMATS = (".gif", ".mp4", ".png")  # what `ldmkit video --out` writes; .png is a strip of the frames
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")  # clip files a training folder may hold


def clip_format(path: str | Path) -> str:
    """The extension of a clip file ldmkit writes (InputError naming the choices otherwise)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CLIP_FORMATS:
        named = f"its extension {suffix!r}" if suffix else "no extension"
        raise InputError(f"--out {path} has {named}; a clip is written as .gif, .mp4 or .png (a strip of its frames)")
    if suffix == ".mp4":
        _av()  # refused now, before any sampling, when PyAV is missing
    return suffix


def _av():
    try:
        import av
    except ImportError:
        raise InputError(
            "writing or reading video files needs PyAV: pip install 'ldmkit[video]' (or av); .gif and .png clips "
            "need nothing more"
        ) from None
    return av


def strip(frames: list[Image.Image]) -> Image.Image:
    """The frames side by side, left to right, as one image."""
    w, h = frames[0].size
    out = Image.new(frames[0].mode, (w * len(frames), h))
    for i, f in enumerate(frames):
        out.paste(f, (i * w, 0))
    return out


def write_clip(frames: list[Image.Image], path: str | Path, fps: float, parameters: dict | None = None, sign=None):
    """Write `frames` (PIL images of one size) atomically to `path` as its extension says, `fps` frames per second,
    with `parameters` as JSON: a PNG text chunk, the GIF's comment, the MP4's comment tag. sign: content credentials
    (PNG strips only). Returns the path."""
    suffix = clip_format(path)
    text = json.dumps(parameters) if parameters is not None else None
    if suffix == ".png":
        return write_image(strip(frames), path, {"ldmkit": text} if text else None, sign)
    if sign is not None:
        raise InputError(f"content credentials are written into PNG files only; write {Path(path).stem}.png")
    if suffix == ".gif":
        options = {"comment": text.encode()} if text else {}
        ms = max(int(round(1000 / fps)), 20)  # GIF delays are in hundredths of a second; browsers clamp below 20 ms

        def save(tmp):
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms, loop=0, **options)

        return atomic_write(path, save)
    return atomic_write(path, lambda tmp: _write_mp4(frames, tmp, fps, text))


def _write_mp4(frames: list[Image.Image], path: str, fps: float, comment: str | None) -> None:
    """H.264 in MP4 (yuv420p, the format every player reads): sides are padded with black to even numbers."""
    av = _av()
    w, h = frames[0].size
    W, H = w + w % 2, h + h % 2
    with av.open(path, "w", format="mp4") as out:
        if comment:
            out.metadata["comment"] = comment
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "preset": "medium"}
        for f in frames:
            canvas = Image.new("RGB", (W, H))
            canvas.paste(f.convert("RGB"), (0, 0))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def read_clip_parameters(path: str | Path) -> dict:
    """The parameters write_clip embedded in `path` ({} when there are none)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        with _av().open(str(path)) as f:
            text = f.metadata.get("comment")
    else:
        with Image.open(path) as im:
            im.load()
            text = im.info.get("comment") if suffix == ".gif" else getattr(im, "text", {}).get("ldmkit")
    if isinstance(text, bytes):
        text = text.decode()
    return json.loads(text) if text else {}


# --- reading ------------------------------------------------------------------------------------------------------


class ClipError(Exception):
    """A clip that cannot give the frames asked for (no video stream, nothing decodable, a truncated file)."""


def _sample(timed, frames: int, fps: float) -> list[Image.Image]:
    """`frames` frames at times k / fps (k = 0, 1, ...) from `timed`, an iterator of (time in s, PIL image) in
    display order: each time gets the last frame shown at or before it, the clip's last frame holding past its end.
    Stops drawing from `timed` once the last time is reached, so a long clip is never decoded whole."""
    out: list[Image.Image] = []
    prev = None
    for t, img in timed:
        while prev is not None and len(out) < frames and t > len(out) / fps + 1e-6:
            out.append(prev)
        if len(out) == frames:
            break
        prev = img
    if prev is None:
        raise ClipError("no frame could be decoded")
    out += [prev] * (frames - len(out))
    return out


def read_frames(path: str | Path, frames: int, fps: float) -> list[Image.Image]:
    """`frames` frames of the clip `path` sampled at `fps` from its start (see _sample): a video file through
    PyAV, a GIF through Pillow, or a folder of frame images (consecutive frames, in file-name order). ClipError for
    a clip that gives none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ClipError("the frame folder holds no images")
        images = [_rgb(f) for f in files[:frames]]
        return images + [images[-1]] * (frames - len(images))
    if path.suffix.lower() == ".gif":
        with Image.open(path) as im:
            return _sample(_gif_frames(im), frames, fps)
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("it has no video stream")
            stream = container.streams.video[0]
            timed = ((float(f.time or 0.0), f.to_image()) for f in container.decode(stream))
            return _sample(timed, frames, fps)
    except av.FFmpegError as e:
        raise ClipError(f"it cannot be decoded ({e})") from None


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _gif_frames(im: Image.Image):
    t = 0.0
    for frame in ImageSequence.Iterator(im):
        yield t, frame.convert("RGB")
        t += (frame.info.get("duration") or 100) / 1000
