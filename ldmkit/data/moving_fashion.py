"""moving-fashion: clips of one or two Fashion-MNIST items moving, bouncing, growing or shrinking on a black canvas,
with captions that say what moves how ("a sneaker moving left and a bag growing").

Built offline from Debian's dataset-fashion-mnist files (data/fashion_mnist.py). Clip i of a split is drawn from a
generator seeded by the split and i alone (data/motion.py), so the set is the same on every machine and any clip can
be made on its own, in any order, without the others. Each clip's layout (`spec(i)`: items, motions, centres and
sizes per frame) is what a motion benchmark checks a generated clip against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .common import digest, file_stamp
from .fashion_mnist import CLASS_NAMES, ROOT, load_arrays, split_files
from .motion import MotionClips, with_article

# how the caption names each class
NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# motion -> unit direction of the centre (x right, y down) per frame, for the moving ones
DIRECTIONS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
MOTIONS = (*DIRECTIONS, "bouncing", "growing", "shrinking")
CLIPS = {"train": 20_000, "test": 2_000}  # clips per split (data.limit takes fewer)
_SEED = {"train": 0x5EED, "test": 0x7E57}


@dataclass(frozen=True)
class Track:
    """One item of a clip: its Fashion-MNIST index and class, its motion, and per frame its centre (x, y) and side
    in canvas pixels."""

    index: int
    label: int
    motion: str
    centres: tuple[tuple[float, float], ...]
    sides: tuple[float, ...]

    @property
    def words(self) -> str:
        return f"{with_article(NOUNS[self.label])} {self.motion}"


def _track(g: np.random.Generator, index: int, label: int, motion: str, frames: int, res: int) -> Track:
    """Where the item is in each frame: a straight path across a good part of the canvas, a bounce off its walls,
    or a change of size about a fixed centre; every frame keeps the item inside the canvas."""
    side = 0.45 * res
    lo, hi = side / 2, res - side / 2  # where the centre may be with the whole item inside
    steps = max(frames - 1, 1)
    t = np.arange(frames)
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        span = g.uniform(0.6, 1.0) * (hi - lo)
        start = [g.uniform(lo, hi - span) if d > 0 else g.uniform(lo + span, hi) if d < 0 else g.uniform(lo, hi)
                 for d in (dx, dy)]  # fmt: skip
        xs, ys = start[0] + dx * span * t / steps, start[1] + dy * span * t / steps
        sides = np.full(frames, side)
    elif motion == "bouncing":
        angle = g.uniform(0, 2 * np.pi)
        speed = g.uniform(1.5, 2.5) * (hi - lo) / steps
        xs, ys = (_bounce(g.uniform(lo, hi), speed * f(angle), frames, lo, hi) for f in (np.cos, np.sin))
        sides = np.full(frames, side)
    else:  # growing or shrinking between half and the full side
        sides = side * (0.5 + 0.5 * t / steps)
        sides = sides if motion == "growing" else sides[::-1]
        xs, ys = np.full(frames, g.uniform(lo, hi)), np.full(frames, g.uniform(lo, hi))
    centres = tuple((float(x), float(y)) for x, y in zip(xs, ys))
    return Track(index, label, motion, centres, tuple(float(s) for s in sides))


def _bounce(start: float, step: float, frames: int, lo: float, hi: float) -> np.ndarray:
    """Positions of a point moving `step` per frame from `start`, reflected at lo and hi."""
    width = hi - lo
    raw = start - lo + step * np.arange(frames)
    folded = np.mod(raw, 2 * width)
    return lo + np.where(folded > width, 2 * width - folded, folded)


class MovingFashion(MotionClips):
    """Clip items {"image": (F, C, R, R) in [-1, 1], "label": the first item's class, "caption", "index"}."""

    name = "moving-fashion"

    def __init__(self, cfg: DataConfig, root=ROOT):
        """cfg: resolution (the canvas side), channels (3 replicates grey), split, limit (clips), frames (0: 8),
        motions (those drawn; empty: all of MOTIONS)."""
        self.configure(cfg, MOTIONS, smallest=8)
        self.images, self.labels = load_arrays(cfg.split, str(root))
        n = CLIPS[cfg.split]
        self.n = min(cfg.limit, n) if cfg.limit > 0 else n
        self.class_names = list(CLASS_NAMES)
        self.captions = [self.caption(i) for i in range(self.n)]
        c = cfg
        self._fingerprint = digest(
            ["moving-fashion", 1, c.split, c.resolution, c.channels, self.frames, self.n, list(self.motions)]
            + [[str(f.resolve()), file_stamp(f)] for f in split_files(c.split, root)]
        )

    def spec(self, i: int) -> list[Track]:
        """The items of clip i and where each is in every frame (drawn from clip i's own generator)."""
        g = np.random.default_rng([_SEED[self.cfg.split], i])
        count = 1 if g.uniform() < 0.7 else 2
        tracks = []
        for _ in range(count):
            index = int(g.integers(len(self.images)))
            motion = self.motions[int(g.integers(len(self.motions)))]
            tracks.append(_track(g, index, int(self.labels[index]), motion, self.frames, self.cfg.resolution))
        return tracks

    def render(self, tracks: list[Track]) -> torch.Tensor:
        """The clip (F, C, R, R) in [-1, 1]: each item resized to its side and placed at its centre, the brighter
        pixel kept where two overlap."""
        res = self.cfg.resolution
        clip = np.zeros((self.frames, res, res), dtype=np.uint8)
        for t in tracks:
            item = Image.fromarray(self.images[t.index], "L")
            for f, ((cx, cy), side) in enumerate(zip(t.centres, t.sides)):
                s = max(int(round(side)), 1)
                sprite = np.asarray(item.resize((s, s), Image.BILINEAR))
                x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
                x0, y0 = min(max(x0, 0), res - s), min(max(y0, 0), res - s)
                region = clip[f, y0 : y0 + s, x0 : x0 + s]
                np.maximum(region, sprite, out=region)
        x = torch.from_numpy(clip).float().div(127.5).sub(1.0)[:, None]  # (F, 1, R, R)
        return x.expand(-1, 3, -1, -1).contiguous() if self.cfg.channels == 3 else x
