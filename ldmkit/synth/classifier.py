"""A small fixed CNN image classifier: the quality gate of `ldmkit synth` and the yardstick of synthetic data.

One architecture, one optimiser and one schedule for every use, so accuracies trained on different data sets are
comparable (the Classification Accuracy Score of Ravuri & Vinyals 2019 compares exactly that). Inputs are
(N, C, H, W) in [-1, 1] at any size: an adaptive pool makes the head independent of the resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..errors import InputError

KIND = "classifier"
EPOCHS = 4  # passes over the training images (the default of `ldmkit synth --min-confidence`)
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 5e-4
CROP_PAD = 2  # classic augmentation: a random crop of the image padded by this many pixels, and a mirror flip


class SmallCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, 4x4 adaptive pool, two linear layers.

    About 50 k parameters; 1,300 training images/s on two CPU cores at 32x32.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]

        self.features = nn.Sequential(*block(channels, 16), *block(16, 32), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, K) logits


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crops (the batch padded by CROP_PAD with the background, -1, and cut back at a random offset per
    image) and random mirror flips of images (N, C, H, W)."""
    n, _, h, w = x.shape
    p = CROP_PAD
    padded = nn.functional.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@dataclass
class Classifier:
    """A trained SmallCNN with the names of its classes; probabilities() and accuracy() run it in eval mode."""

    net: SmallCNN
    class_names: list[str]
    trained_on: str = ""

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """(N, K) class probabilities of images (N, C, H, W) in [-1, 1]."""
        self.net.eval()
        if x.shape[1] != self.net.channels:
            raise InputError(
                f"the classifier takes {self.net.channels}-channel images, these have {x.shape[1]}; "
                f"train it on images like the model's"
            )
        return torch.cat([self.net(x[i : i + batch].float()).softmax(1) for i in range(0, len(x), batch)])

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.probabilities(x).argmax(1) == y).float().mean())

    def save(self, path: str | Path) -> Path:
        return checkpoint.save(
            path,
            self.net.state_dict(),
            KIND,
            {"channels": self.net.channels, "num_classes": self.net.num_classes},
            class_names=self.class_names,
            trained_on=self.trained_on,
        )

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        tensors, meta = checkpoint.load(path, KIND)
        cfg = meta["config"]
        try:
            net = SmallCNN(int(cfg["channels"]), int(cfg["num_classes"]))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is a damaged classifier file (config {cfg!r}); train it again") from None
        checkpoint.load_state(net, tensors, path, "classifier")
        return cls(net, list(meta.get("class_names") or []), str(meta.get("trained_on") or ""))


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    class_names: list[str],
    *,
    epochs: int = EPOCHS,
    seed: int = 0,
    augmented: bool = False,
    progress: bool = False,
    trained_on: str = "",
) -> Classifier:
    """A SmallCNN trained on images x (N, C, H, W) in [-1, 1] with labels y (N,) in [0, K): AdamW with a cosine
    schedule, BATCH images a step, `epochs` passes in an order drawn from `seed`. augmented: classic augmentation
    (augment) on every batch."""
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"{len(x)} images and {len(y)} labels: give one label per image, and at least one image")
    k = len(class_names)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise InputError(f"labels run from {int(y.min())} to {int(y.max())}, outside the {k} classes")
    torch.manual_seed(seed)  # the initial weights and dropout
    g = torch.Generator().manual_seed(seed)
    net = SmallCNN(x.shape[1], k)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.15)
    net.train()
    with tqdm(total=steps, desc="classifier", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), BATCH):
                idx = order[s : s + BATCH]
                xb = x[idx].float()
                if augmented:
                    xb = augment(xb, g)
                loss = nn.functional.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    net.eval()
    return Classifier(net, list(class_names), trained_on)
