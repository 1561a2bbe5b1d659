"""Class labels -> Conditioning, with a null class for classifier-free guidance.

A class-conditional denoiser learns num_classes + 1 embeddings: one per class and a last one, index num_classes,
for "no label". Training drops labels to it (caption dropout) and guidance uses it as the unconditional branch
(Ho & Salimans 2022). Users say "no label" with None or -1; a class may also be named by its string name.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import InputError
from .types import Conditioning


class LabelConditioner:
    """Maps labels (ints, class names, None / -1 for none) to a Conditioning with labels (B,) int64."""

    def __init__(self, num_classes: int, class_names: Iterable[str] = ()):
        """num_classes: number of real classes (index num_classes is the null class); class_names: optional
        names, one per class in index order, accepted as labels and listed in error messages."""
        if num_classes < 1:
            raise InputError(f"num_classes={num_classes}; a label conditioner needs at least one class")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        if self.class_names and len(self.class_names) != self.num_classes:
            raise InputError(
                f"got {len(self.class_names)} class names for {num_classes} classes; give one name per class or none"
            )

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _valid(self) -> str:
        text = f"0..{self.num_classes - 1}, or -1 / None for no label"
        if self.class_names:
            text += "; classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
        return text

    def index(self, label) -> int:
        """One label -> its class index (num_classes for no label)."""
        if label is None:
            return self.num_classes
        if isinstance(label, str):
            if label in self.class_names:
                return self.class_names.index(label)
            raise InputError(f"unknown class name {label!r}; valid labels are {self._valid()}")
        if isinstance(label, torch.Tensor):
            label = label.item()
        try:
            whole = not isinstance(label, bool) and float(label).is_integer()
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise InputError(f"label {label!r} is not a class index; valid labels are {self._valid()}")
        label = int(label)
        if label == -1:
            return self.num_classes
        if not 0 <= label < self.num_classes:
            raise InputError(f"label {label} is out of range; valid labels are {self._valid()}")
        return label

    def __call__(self, labels, device=None) -> Conditioning:
        """labels: a list (ints, names, None), a 1-D integer tensor, or one label -> Conditioning(labels (B,))."""
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.dim() > 1:
                raise InputError(
                    f"labels tensor must be 1-D integers, got {labels.dtype} of shape "
                    f"{tuple(labels.shape)}; pass class indices, -1 for no label"
                )
            labels = labels.reshape(-1).tolist()
        elif labels is None or isinstance(labels, (int, str)):
            labels = [labels]
        out = torch.tensor([self.index(label) for label in labels], dtype=torch.long)  # (B,)
        return Conditioning(labels=out.to(device) if device is not None else out)

    def null(self, n: int, device=None) -> Conditioning:
        """n "no label" entries: the unconditional branch of classifier-free guidance."""
        return self([None] * n, device)
