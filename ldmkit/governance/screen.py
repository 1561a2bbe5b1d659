"""What happens to every generated image before anyone sees it: the safety filter, the training-data similarity
screen and the invisible watermark, as one policy decides them for `ldmkit serve` and the batch commands alike.

For each image, in order:
1. the safety filter scores it (policy [safety]); at or above the threshold it is withheld or blurred;
2. the similarity screen finds its nearest training image (policy [similarity], the model's index); at or above the
   threshold the image is flagged (shown and recorded), withheld or blurred;
3. the image that is shown carries the request's tag in its pixels (policy [provenance], on by default in serve).
The strictest action wins (withhold > blur > flag), and every reason is kept for the audit trail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from . import watermark
from .policy import Policy, SimilaritySettings
from .safety import SafetyFilter, placeholder
from .similarity import DEFAULT_THRESHOLD, SimilarityIndex, load_index

SEVERITY = {None: 0, "flag": 1, "blur": 2, "withhold": 3}


@dataclass
class Screened:
    """One image after the screen."""

    image: Image.Image | None  # what may be shown: the (watermarked) image, a blurred stand-in, or None (withheld)
    marked: Image.Image  # the image as generated, with the watermark when there is one (what the audit hashes)
    action: str | None = None  # None, "flag", "blur" or "withhold": the strictest decision taken
    reasons: list[str] = field(default_factory=list)  # why, one entry per control that fired
    safety: float | None = None  # the safety filter's score
    nearest: str | None = None  # the nearest training image's name
    similarity: float | None = None  # and its similarity
    watermark: str | None = None  # the tag hidden in the pixels, as hex

    def record(self) -> dict:
        """The JSON-ready facts for an audit row or PNG metadata (only what was measured)."""
        facts = {
            "action": self.action,
            "reasons": self.reasons or None,
            "safety": None if self.safety is None else round(self.safety, 4),
            "nearest": self.nearest,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "watermark": self.watermark,
        }
        return {k: v for k, v in facts.items() if v is not None}

    def _decide(self, action: str, reason: str) -> None:
        self.reasons.append(reason)
        if SEVERITY[action] > SEVERITY[self.action]:
            self.action = action


class OutputScreen:
    """The screen of one model's outputs. Build it when the server or command starts: a missing classifier or index
    file is an error then, not at the first image. Thread-safe."""

    def __init__(
        self,
        safety: SafetyFilter | None = None,
        index: SimilarityIndex | None = None,
        similarity: SimilaritySettings | None = None,
        mark: bool = False,
    ):
        self.safety = safety  # scores images; None: no safety filter
        self.index = index  # the model's training-data index; None: no similarity screen
        self.similarity = similarity or SimilaritySettings()
        self.threshold = self.similarity.threshold or DEFAULT_THRESHOLD
        self.mark = mark  # hide the request's tag in the shown images

    @property
    def active(self) -> bool:
        return bool(self.safety or self.index or self.mark)

    def __call__(self, images: list[Image.Image], tag: bytes | None = None, keep=None) -> list[Screened]:
        """Screen a batch; tag: the 6-byte watermark payload (watermark.tag_of(request id)); None: no watermark.
        keep: (H, W) bool, the pixels an edit promised to keep (inpaint, outpaint): the mark changes only the others,
        and an image whose edited region cannot carry it is left unmarked (its `watermark` stays None)."""
        out = [Screened(img, img) for img in images]
        if self.safety is not None:
            settings = self.safety.settings
            for s, verdict in zip(out, self.safety.screen(images), strict=True):
                s.safety = verdict.score
                if verdict.flagged:
                    s._decide(settings.action, verdict.reason(settings))
        if self.index is not None and images:
            for s, match in zip(out, self.index.query(np.stack([_rgb(img) for img in images])), strict=True):
                s.nearest, s.similarity = match.name, float(match.similarity)
                if match.similarity >= self.threshold:
                    why = f"similarity {match.similarity:.3f} >= {self.threshold:g} to training image {match.name}"
                    s._decide(self.similarity.action, f"{why} ({self.similarity.action})")
        for s in out:
            if self.mark and tag is not None and min(s.marked.size) >= watermark.MIN_SIDE:
                marked = _marked(s.marked, tag, keep)
                if marked is not None:
                    s.marked, s.watermark = marked, tag.hex()
            s.image = {"withhold": None, "blur": placeholder(s.marked)}.get(s.action, s.marked)
        return out


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _marked(img: Image.Image, tag: bytes, keep=None) -> Image.Image | None:
    """img with `tag` in its pixels, in its own mode (grayscale stays grayscale); keep: pixels left bit for bit
    (None when the rest cannot carry the mark)."""
    pixels = np.asarray(img.convert("L") if img.mode == "L" else img.convert("RGB"))
    if keep is None:
        return Image.fromarray(watermark.embed(pixels, tag))
    marked = watermark.embed_within(pixels, tag, ~np.asarray(keep, dtype=bool))
    return None if marked is None else Image.fromarray(marked)


def build_screen(
    policy: Policy | None, model_path: Path, mark: bool, safety: SafetyFilter | None = None
) -> OutputScreen:
    """The screen a policy asks for, for the model in `model_path`. mark: the watermark default of the caller
    (serve: on; commands: --watermark); a policy's [provenance] table overrides it. safety: a filter to share
    between models (built from the policy when None)."""
    if policy is not None and policy.provenance is not None:
        mark = policy.provenance.watermark
    if policy is None:
        return OutputScreen(mark=mark)
    if policy.safety is not None and safety is None:
        safety = SafetyFilter(policy.safety)
    index = load_index(model_path) if policy.similarity is not None else None
    return OutputScreen(safety if policy.safety else None, index, policy.similarity, mark)


def finisher(screen: OutputScreen, run_id: str, report: Callable[[str], None]):
    """The screen as the writing commands take it (pipelines.generate.Finish): finish(images, first index, keep=None)
    -> for each image what to write (None: withheld) and the facts embedded with it (run id, time, the screen's
    record); keep: the pixels an edit keeps, which the watermark leaves alone (see OutputScreen).
    report(message) hears of every image the screen withheld, blurred or flagged. run_id: this command's id, hidden
    in the pixels when the screen watermarks (uuid4 hex, like a server's request ids)."""
    tag = watermark.tag_of(run_id) if screen.mark else None
    made = {"request_id": run_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def finish(images: list[Image.Image], first: int, keep=None) -> list[tuple[Image.Image | None, dict]]:
        out = []
        for i, s in enumerate(screen(images, tag, keep)):
            if s.action is not None:
                report(f"image {first + i}: {'; '.join(s.reasons)}")
            if (
                tag is not None
                and keep is not None
                and s.watermark is None
                and min(s.marked.size) >= watermark.MIN_SIDE
            ):
                report(
                    f"image {first + i}: not watermarked: the edited region is too small to carry the mark without "
                    f"changing the pixels the edit keeps; regenerate a larger region to mark it"
                )
            out.append((s.image, made | s.record()))
        return out

    return finish
