"""Self-attention maps carried from one pass of a backbone to the next: the layout of a source image kept in an edit.

A self-attention layer's map softmax(q k^T / sqrt(d)) says which pixels each pixel draws from, which is where the
image's layout lives (Tumanyan et al. 2023, "Plug-and-Play Diffusion Features", sec. 4; Hertz et al. 2023,
"Prompt-to-Prompt", sec. 3.2 for the cross-attention counterpart). `SelfAttentionReplay` records the queries and
keys of every self-attention layer while the backbone denoises the source, and hands the recorded ones to the same
layers in the next pass, which denoises the edit: the edit then attends with the source's map over its own values.

It works by forward hooks on the layers' q and k projections (no change to the layers), so any backbone built
from `Attention` (U-Net and DiT) takes it. Cross-attention calls (with a context) are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .attention import Attention


class SelfAttentionReplay:
    """Hooks on every self-attention layer of a module: `record()` before a pass saves each call's q and k,
    `replay()` before the next pass of the same shapes returns them in the same order, `off()` disables both.

    Use as a context manager: the hooks are removed on exit. One instance per request (it holds the recording)."""

    def __init__(self, module: nn.Module):
        """module: the backbone whose `Attention` layers are hooked."""
        self.layers = [m for m in module.modules() if isinstance(m, Attention)]
        self.mode: str | None = None
        self.saved: list[torch.Tensor] = []  # q, k of each self-attention call, in call order
        self.pos = 0
        self._self_call = False
        self._handles = []

    # --- modes ----------------------------------------------------------------------------------------------------
    def record(self) -> None:
        self.mode, self.saved, self.pos = "record", [], 0

    def replay(self) -> None:
        if not self.saved:
            raise InputError("no attention was recorded to replay; run the source pass under record() first")
        self.mode, self.pos = "replay", 0

    def off(self) -> None:
        self.mode = None

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _on_call(self, _layer, args, kwargs) -> None:
        context = args[1] if len(args) > 1 else kwargs.get("context")
        self._self_call = context is None

    def _on_projection(self, _proj, _args, out: torch.Tensor):
        if self.mode is None or not self._self_call:
            return None
        if self.mode == "record":
            self.saved.append(out.detach())
            return None
        if self.pos >= len(self.saved) or self.saved[self.pos].shape != out.shape:
            raise InputError(
                "the replayed pass does not match the recorded one (another batch or image size); record and "
                "replay the same shapes"
            )
        self.pos += 1
        return self.saved[self.pos - 1]  # replaces the projection's output: the source's q or k

    def __enter__(self) -> "SelfAttentionReplay":
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._on_call, with_kwargs=True))
            for proj in (layer.to_q, layer.to_k):
                self._handles.append(proj.register_forward_hook(self._on_projection))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.saved, self.mode = [], [], None
