"""emoji-motion: clips of one emoji panning, zooming or rotating on a white canvas, with captions that say what moves
how ("a red apple panning left", "a rocket zooming in", "a pizza rotating clockwise").

The emoji are drawn offline with Debian's Noto Color Emoji font (data/emoji.py, the `emoji` data set's renderer and
names): every single-codepoint emoji the font shows as one glyph, about 1,400. Clip i of a split is drawn from a
generator seeded by the split and i alone (data/motion.py): which emoji, which motion, and the emoji's centre, side
and angle in every frame (`spec(i)`). Each frame is one affine resampling of the glyph (premultiplied alpha, so no
dark fringe) onto a transparent canvas (`layers`), composited on white like the emoji data set's images. The whole
motion spans the clip, however many frames it has: a pan crosses 60 to 100% of the room the emoji has, a zoom
changes the side 2 to 3.4 times (at a steady rate), a rotation turns 90 to 180 degrees (at most 45 a frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .common import digest
from .emoji import NotoRenderer, candidates, name_of, sources, squared
from .images import to_mode, uint8_to_tensor
from .motion import MotionClips, with_article

# motion -> unit direction of the centre (x right, y down) per frame
PANS = {"panning left": (-1, 0), "panning right": (1, 0), "panning up": (0, -1), "panning down": (0, 1)}
ZOOMS = {"zooming in": 1, "zooming out": -1}  # the side grows (in) or shrinks (out)
TURNS = {"rotating clockwise": 1, "rotating anticlockwise": -1}  # as seen on the screen
MOTIONS = (*PANS, *ZOOMS, *TURNS)
CLIPS = {"train": 20_000, "test": 2_000}  # clips per split (data.limit takes fewer)
MAX_TURN = 45.0  # degrees a frame at most, so the way a rotation turns is never in doubt
VERSION = 1  # bump when the drawing changes, to leave cached latents unused
_SEED = {"train": 0xE307, "test": 0x7E58}


@dataclass(frozen=True)
class EmojiTrack:
    """The emoji of a clip, its motion, and per frame its centre (x, y) and side in canvas pixels and its angle in
    degrees (clockwise on the screen)."""

    emoji: str
    name: str
    motion: str
    centres: tuple[tuple[float, float], ...]
    sides: tuple[float, ...]
    angles: tuple[float, ...]

    label = -1  # emoji have names, not classes

    @property
    def words(self) -> str:
        return f"{with_article(self.name)} {self.motion}"


def _track(g: np.random.Generator, emoji: str, name: str, motion: str, frames: int, res: int) -> EmojiTrack:
    """Where the emoji is in each frame; the glyph's square (its circumscribed circle while rotating) stays inside
    the canvas in every frame."""
    t = np.arange(frames) / (frames - 1)  # 0 .. 1 over the clip
    angles = np.zeros(frames)
    if motion in PANS:
        dx, dy = PANS[motion]
        side = g.uniform(0.35, 0.5) * res
        lo, hi = side / 2, res - side / 2
        span = g.uniform(0.6, 1.0) * (hi - lo)
        start = [g.uniform(lo, hi - span) if d > 0 else g.uniform(lo + span, hi) if d < 0 else g.uniform(lo, hi)
                 for d in (dx, dy)]  # fmt: skip
        xs, ys = start[0] + dx * span * t, start[1] + dy * span * t
        sides = np.full(frames, side)
    elif motion in ZOOMS:
        small, big = g.uniform(0.25, 0.35) * res, g.uniform(0.7, 0.85) * res
        sides = small * (big / small) ** t  # a steady zoom: the same ratio every frame
        sides = sides if ZOOMS[motion] > 0 else sides[::-1]
        xs, ys = (np.full(frames, g.uniform(big / 2, res - big / 2)) for _ in range(2))
    else:
        side = g.uniform(0.5, 0.6) * res
        radius = side / math.sqrt(2)
        xs, ys = (np.full(frames, g.uniform(radius, res - radius)) for _ in range(2))
        sides = np.full(frames, side)
        turn = min(g.uniform(90.0, 180.0), MAX_TURN * (frames - 1))
        angles = TURNS[motion] * turn * t
    centres = tuple((float(x), float(y)) for x, y in zip(xs, ys))
    return EmojiTrack(emoji, name, motion, centres, tuple(map(float, sides)), tuple(map(float, angles)))


def place(sprite: Image.Image, centre: tuple[float, float], side: float, angle: float, res: int) -> Image.Image:
    """The square glyph `sprite` (mode RGBa, premultiplied) drawn on a transparent res x res canvas with its centre at
    `centre`, its side `side` pixels and turned `angle` degrees clockwise: an RGBA image."""
    k = max(math.ceil(side), 1)
    small = sprite.resize((k, k), Image.Resampling.LANCZOS)  # antialiased down to about the drawn size
    # inverse map, canvas -> glyph: p_in = k/2 + (k / side) R(-angle) (p_out - centre), y pointing down
    m, a = k / side, math.radians(angle)
    cos, sin = m * math.cos(a), m * math.sin(a)
    cx, cy = centre
    coeffs = (cos, sin, k / 2 - cos * cx - sin * cy, -sin, cos, k / 2 + sin * cx - cos * cy)
    return small.transform((res, res), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC).convert("RGBA")


class EmojiMotion(MotionClips):
    """Clip items {"image": (F, C, R, R) in [-1, 1], "label": -1, "caption", "index"}."""

    name = "emoji-motion"

    def __init__(self, cfg: DataConfig):
        """cfg: resolution (the canvas side, 64 for the shipped emoji model), channels (1: luma), split, limit
        (clips), frames (0: 8), motions (those drawn; empty: all of MOTIONS)."""
        self.configure(cfg, MOTIONS, smallest=16)
        self.renderer = NotoRenderer()
        # single codepoints (U+FE0F aside): one glyph each, no skin-tone or flag sequences
        self.pool = [e for e in candidates() if len(e.replace("\ufe0f", "")) == 1 and self.renderer.draws(e)]
        self.names = [name_of(e) for e in self.pool]
        n = CLIPS[cfg.split]
        self.n = min(cfg.limit, n) if cfg.limit > 0 else n
        self.class_names: list[str] = []
        self.captions = [self.caption(i) for i in range(self.n)]
        c = cfg
        self._fingerprint = digest(
            ["emoji-motion", VERSION, c.split, c.resolution, c.channels, self.frames, self.n, list(self.motions)]
            + [len(self.pool), sources(("noto",))]
        )

    def spec(self, i: int) -> list[EmojiTrack]:
        """The emoji of clip i and where it is in every frame (drawn from clip i's own generator)."""
        g = np.random.default_rng([_SEED[self.cfg.split], i])
        j = int(g.integers(len(self.pool)))
        motion = self.motions[int(g.integers(len(self.motions)))]
        return [_track(g, self.pool[j], self.names[j], motion, self.frames, self.cfg.resolution)]

    def layers(self, tracks: list[EmojiTrack]) -> list[Image.Image]:
        """The clip's frames as RGBA images on a transparent canvas (the alpha is where the emoji is)."""
        (t,) = tracks
        sprite = squared(self.renderer(t.emoji)).convert("RGBa")
        res = self.cfg.resolution
        return [place(sprite, c, s, a, res) for c, s, a in zip(t.centres, t.sides, t.angles)]

    def render(self, tracks: list[EmojiTrack]) -> torch.Tensor:
        """The clip (F, C, R, R) in [-1, 1]: the layers composited on white."""
        c = self.cfg.channels
        return torch.stack([uint8_to_tensor(np.array(to_mode(f, c))) for f in self.layers(tracks)])
