"""What the built-in clip sets (moving-fashion, emoji-motion) share: the frames and motions a configuration asks for,
caption wording, and the clip item drawn from clip i's own seed.

A built-in clip set draws clip i of a split from a generator seeded by the split and i alone, so the set is the same
on every machine, whatever the number of loading processes, and any clip can be made on its own. `spec(i)` gives the
clip's tracks (what moves, how, and where it is in every frame); `render(tracks)` draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import DataConfig
from ..errors import InputError

DEFAULT_FRAMES = 8  # frames per clip when data.frames is 0 (clip folders too)


def clip_frames(cfg: DataConfig, name: str) -> int:
    """data.frames, or DEFAULT_FRAMES for 0; one frame shows no motion and is refused."""
    frames = cfg.frames or DEFAULT_FRAMES
    if frames < 2:
        raise InputError(
            f"data.frames={frames}: {with_article(name)} clip needs 2 frames or more to show a motion; set "
            f"data.frames to 2 or more (0: {DEFAULT_FRAMES})"
        )
    return frames


def chosen_motions(cfg: DataConfig, known: Sequence[str], name: str) -> tuple[str, ...]:
    """The motions clips are drawn from: data.motions, each checked against `known`, or all of `known` when unset."""
    wanted = [m.strip() for m in cfg.motions]
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise InputError(
            f"data.motions names {unknown[0]!r}, which {name} does not draw; use some of: {', '.join(known)} "
            f"(or leave it empty for all)"
        )
    return tuple(dict.fromkeys(wanted)) or tuple(known)


def with_article(noun: str) -> str:
    """'a' or 'an' before a noun, by its first letter: "a sneaker", "an ankle boot", "a unicorn"."""
    vowel = noun[:1].lower() in "aeiou" and not noun.lower().startswith(("uni", "use", "one", "eu"))
    return f"{'an' if vowel else 'a'} {noun}"


class MotionClips(torch.utils.data.Dataset):
    """Clip items {"image": (F, C, R, R) in [-1, 1], "label": the first track's label, "caption": the tracks' words
    joined by "and", "index"}. A subclass sets `name`, `n` (clips), `captions` and `_fingerprint`, and gives
    `spec(i)` (tracks, each with `label` and `words`) and `render(tracks)`."""

    name = ""
    n = 0
    _fingerprint = ""

    def configure(self, cfg: DataConfig, motions: Sequence[str], smallest: int) -> None:
        """Check and keep what every clip set reads of `cfg`: 1 or 3 channels, a canvas of at least `smallest`
        pixels, the frames (clip_frames) and the motions asked for among `motions` (chosen_motions)."""
        if cfg.channels not in (1, 3):
            raise InputError(f"data.channels={cfg.channels} is not supported; use 1 (grayscale) or 3 (RGB)")
        if cfg.resolution < smallest:
            raise InputError(f"data.resolution={cfg.resolution} is too small for {self.name}; use {smallest} or more")
        self.cfg = cfg
        self.frames = clip_frames(cfg, self.name)
        self.motions = chosen_motions(cfg, motions, self.name)

    def spec(self, i: int) -> list:
        raise NotImplementedError

    def render(self, tracks: list) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Content key for caches: the sources and the settings that change the clips."""
        return self._fingerprint

    def __len__(self) -> int:
        return self.n

    def caption(self, i: int) -> str:
        return " and ".join(t.words for t in self.spec(i))

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} {self.name} clips")
        i = i % len(self)
        tracks = self.spec(i)
        return {
            "image": self.render(tracks),
            "label": tracks[0].label,
            "caption": " and ".join(t.words for t in tracks),
            "index": i,
        }
