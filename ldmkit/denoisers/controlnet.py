"""ControlNet (Zhang et al. 2023): spatial control of a frozen U-Net by a trainable copy of its encoder.

The copy (the U-Net's input convolution, noise-level and class embeddings, encoder levels and middle block, with the
U-Net's own parameter names) also sees a condition image (edges, a mask, a colour layout, a depth map ...) through a
small hint encoder: strided convolutions from the image's resolution down to the latent's, whose last layer starts
at zero. Each skip connection and the middle block's output leave it through a 1x1 convolution that also starts at
zero, so an untrained ControlNet changes nothing. Its outputs are residuals the frozen U-Net adds to its skip
connections and its middle block (`Conditioning.control`, the U-Net's one hook for injected residuals).

`Controlled` wraps a backbone with one or more ControlNets, each with its condition image, a scale and the fraction
of the sampling steps it acts on (start, end); it is a backbone itself, so samplers and guidance see nothing new.
A control may steer some images of a batch only (`Control.rows`): a batch of requests with different controls
(pipelines/control.py: per_sample_controls) runs each ControlNet over the images that use it, and each image's
residuals are those it gets alone (see `Controlled`).
A ControlNet file is a safetensors checkpoint of kind "controlnet": the weights, the U-Net configuration it was made
for, the hint encoder's widths, the condition it was trained on and its base model's SHA-256.

A low-rank ControlNet (`ControlNet.make_low_rank`, a Control-LoRA) trains its copy as the frozen base weights plus a
LoRA on every linear layer and convolution of it, the hint encoder and the zero convolutions whole. Its file holds
those and the LoRA factors only (`PATH.lora.down`, `PATH.lora.up`; config `low_rank`: rank and alpha), a fraction of
a full one's size, and it loads with the model it steers: the copy is rebuilt from that model's U-Net with each
update merged in, so it samples exactly as fast as a full ControlNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import checkpoint
from ..conditioning.types import Conditioning, backbone_inputs
from ..config import UNetConfig, from_dict, to_dict
from ..errors import CheckpointError, InputError
from ..nn.invariant import subset_rows
from ..nn.lora import LoRASet, targetable
from .unet import UNet

KIND = "controlnet"  # the checkpoint kind of a ControlNet file
# the layers that are not in the U-Net: a low-rank ControlNet trains them whole
OWN = ("hint.", "zero_convs.", "mid_out.")


def hint_widths(factor: int, first: int = 16) -> tuple[int, ...]:
    """The hint encoder's widths for an autoencoder downsampling by `factor` (a power of two): one per resolution,
    doubling at each halving."""
    k = int(round(math.log2(factor)))
    if 2**k != factor:
        raise InputError(f"a ControlNet needs an autoencoder factor that is a power of two, not {factor}")
    return tuple(first * 2**i for i in range(k + 1))


class HintEncoder(nn.Module):
    """Condition image (B, C, H, W) in [0, 1] -> features (B, model_channels, H/f, W/f): a convolution, then per
    halving a convolution and a strided one (SiLU after each), then a zero-initialised output convolution."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(UNet):
    """The trainable copy of a U-Net's encoder and middle block, a hint encoder and the zero convolutions."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)):
        """cfg: the controlled U-Net's configuration; hint_channels: the condition image's channels; widths: the hint
        encoder's (len(widths) - 1 halvings: the autoencoder's factor is 2 ** (len(widths) - 1))."""
        super().__init__(cfg, encoder_only=True)
        self.hint_channels, self.widths = hint_channels, tuple(widths)
        self.factor = 2 ** (len(widths) - 1)
        self.hint = HintEncoder(hint_channels, self.widths, cfg.model_channels)
        self.zero_convs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.skip_channels)
        self.mid_out = nn.Conv2d(self.mid_channels, self.mid_channels, 1)
        for conv in [*self.zero_convs, self.mid_out]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_unet(cls, unet: UNet, factor: int, hint_channels: int = 3, first_width: int = 16) -> "ControlNet":
        """A ControlNet for `unet`, its encoder and middle block copied from it (the rest starts at zero)."""
        net = cls(unet.cfg, hint_channels, hint_widths(factor, first_width))
        own = net.state_dict()
        shared = {k: v for k, v in unet.state_dict().items() if k in own}
        net.load_state_dict(shared, strict=False)
        return net.to(next(unet.parameters()).device)

    low_rank: dict | None = None  # {"rank": r, "alpha": a} once make_low_rank has run; None: every weight trains

    def copy_layers(self) -> dict[str, nn.Module]:
        """The layers of the copy (the U-Net's own) a LoRA can adapt, by path: every linear layer and convolution
        outside the hint encoder and the zero convolutions."""
        return {p: m for p, m in targetable(self).items() if not f"{p}.".startswith(OWN)}

    def make_low_rank(self, rank: int, alpha: float | None = None) -> "ControlNet":
        """Freeze the copy and give each of its layers a LoRA of `rank` (B zero, so nothing changes yet; alpha
        default rank), held as the layer's child `lora` and added to its output by a forward hook, so a deep copy
        (EMA) carries its own. The hint encoder and the zero convolutions stay trainable."""
        if self.low_rank is not None:
            raise InputError("this ControlNet is low-rank already")
        layers = self.copy_layers()
        loras = LoRASet.for_modules(self, list(layers), rank, alpha)
        self.requires_grad_(False)
        for path, lora in loras.items():
            layer = layers[path]
            layer.lora = lora.to(layer.weight.device)
            layer.register_forward_hook(_low_rank_output)
        for own in (self.hint, self.zero_convs, self.mid_out):
            own.requires_grad_(True)
        self.low_rank = {"rank": int(rank), "alpha": float(alpha or rank)}
        return self

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tensors a ControlNet file holds: every weight, or for a low-rank one the hint encoder, the zero
        convolutions and the LoRA factors (`PATH.lora.down` / `.up`)."""
        state = self.state_dict()
        if self.low_rank is None:
            return state
        return {k: v for k, v in state.items() if k.startswith(OWN) or ".lora." in k}

    def hint_features(self, hint: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The hint encoder's features (B, model_channels, h, w) of condition images hint (B, hint_channels, H, W) in
        [0, 1] for latents of size (h, w): InputError unless H, W are h, w times the factor."""
        h, w = size
        if hint.shape[-2] != h * self.factor or hint.shape[-1] != w * self.factor:
            raise InputError(
                f"the control image is {hint.shape[-1]}x{hint.shape[-2]}, but a ControlNet for latents of "
                f"{w}x{h} takes {w * self.factor}x{h * self.factor}"
            )
        return self.hint(hint.to(dtype))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        cond: Conditioning,
        hint: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ):
        """Residuals (one per skip connection, then the middle block's) for the U-Net's inputs (x, c_noise, cond)
        and the condition image hint (B, hint_channels, H, W) in [0, 1], H = x's height times the factor, or its
        hint_features given as `features` (B, model_channels, h, w): the same numbers, the hint encoder not run."""
        x, c_noise, cond = backbone_inputs(x, c_noise, cond, self.cfg.in_channels, "ControlNet")
        if features is None:
            if hint is None:
                raise InputError("a ControlNet needs its condition image (hint) or that image's hint_features")
            features = self.hint_features(hint, x.shape[-2:], x.dtype)
        emb = self.embed(c_noise, cond.labels)
        ctx = cond.context.to(x.dtype) if cond.context is not None else None
        h, skips = self.encode(x, emb, ctx, cond.context_mask, added=features.to(x.dtype))
        return [conv(s) for conv, s in zip(self.zero_convs, skips)] + [self.mid_out(h)]


def _low_rank_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A low-rank ControlNet's layer: its frozen output plus its LoRA's update of its input."""
    return out + module.lora(args[0], module)


@dataclass
class Control:
    """One ControlNet acting on a sampling: its condition image (1 or B, C, H, W) in [0, 1] (None: taken from the
    conditioning's `hint`, as in training), the scale of its residuals, the fraction of the steps it acts on, and the
    images of the batch it steers (None: every image; else their indices, and the image is 1 or len(rows) high)."""

    net: ControlNet
    image: torch.Tensor | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    window: tuple[float, float] | None = None  # the c_noise range it acts on (step_window); None: every call
    rows: tuple[int, ...] | None = None
    _features: dict = field(default_factory=dict, repr=False, compare=False)  # (dtype, device, size) -> features

    def features(self, dtype: torch.dtype, device, size: tuple[int, int]) -> torch.Tensor | None:
        """The hint encoder's features of `image` for latents of `size` (1 or as many rows as the image), computed at
        the first step of a sampling and reused at every later one: the hint encoder depends on the image alone, not
        on the step (about a quarter of a small ControlNet's work). None while gradients are recorded (training),
        where the hint encoder runs at every call."""
        if self.image is None or torch.is_grad_enabled():
            return None
        key = (dtype, str(device), tuple(size))
        if key not in self._features:
            self._features[key] = self.net.hint_features(self.image.to(device), size, dtype)
        return self._features[key]


def check_control(scale: float, start: float, end: float, name: str = "--control") -> None:
    """InputError for a scale that is NaN or negative, or a start/end outside [0, 1] or a start after the end."""
    if not scale >= 0 or math.isinf(scale):
        raise InputError(f"{name}: the scale {scale} must be a finite number >= 0 (1 is the trained strength)")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise InputError(f"{name}: start {start} and end {end} are fractions of the steps, between 0 and 1")
    if start >= end:
        raise InputError(f"{name}: the start {start} is not before the end {end}; the control would never act")


def acting_steps(n: int, start: float, end: float) -> range:
    """The steps (of 0 .. n-1) a control with the window (start, end) acts on: step i when i / n >= start and
    (i + 1) / n <= end, the rule of diffusers' ControlNet pipelines."""
    return range(math.ceil(start * n - 1e-9), math.floor(end * n + 1e-9))


def step_window(denoiser, sigmas: torch.Tensor, start: float, end: float) -> tuple[float, float] | None:
    """The range of the backbone's noise level (c_noise) over which a control acts when sampling over `sigmas`
    (N + 1 values, the last 0), on the steps `acting_steps` gives. None: every step (start 0, end 1); (inf, -inf):
    none."""
    if start <= 0.0 and end >= 1.0:
        return None
    steps = acting_steps(len(sigmas) - 1, start, end)
    first, last = steps.start, steps.stop - 1
    if first > last:
        return (math.inf, -math.inf)
    c = denoiser.c_noise(sigmas[[last, first]].float()).tolist()  # c_noise grows with sigma
    lo, hi = min(c), max(c)
    pad = 1e-4 * max(abs(lo), abs(hi), 1.0)
    return (lo - pad, hi + pad)


class Controlled(nn.Module):
    """A backbone with ControlNets: called as the backbone is, it adds the scaled sum of their residuals to the
    backbone's skip connections and middle block (Conditioning.control). Each control's image comes from the
    conditioning's `hint` (one per control, training) or from the control itself (sampling), repeated to the
    batch (guidance doubles it).

    Per image, exactly (controls with `rows`, as per_sample_controls makes them): a control runs its ControlNet only
    on the batch rows it steers that are in its window at their step (a scale of 0 steers none), and each image's
    residual is the sum, in the order of `controls`, of the controls that steer it, starting from -0.0 (x + -0.0 is
    x bit for bit, where +0.0 would turn a -0.0 into +0.0). An image no control steers at a step gets -0.0
    residuals: the backbone's numbers are those without controls. With batch-invariant kernels (nn/invariant.py) an
    image's numbers thus do not depend on the other images' controls. Consecutive controls of the same ControlNet
    that steer different images run as one pass."""

    def __init__(self, backbone: nn.Module, controls: list[Control], images: int | None = None):
        """backbone: the U-Net; controls: in the order their residuals are summed; images: the images of a batch
        whose controls name `rows` (the backbone's batch is that many images, repeated once per guidance branch)."""
        super().__init__()
        if images is None and any(c.rows is not None for c in controls):
            raise InputError("controls that steer some images (rows) need the batch's number of images")
        self.backbone = backbone
        self.controls = controls
        self.images = images
        self.nets = nn.ModuleList(c.net for c in controls)  # so .to(), .parameters() and state reach them
        self.passes: list[list[int]] = []  # indices into controls, run as one pass of their ControlNet
        for k, c in enumerate(controls):
            last = self.passes[-1] if self.passes else None
            if last is not None and c.rows is not None and _joins(c, [controls[j] for j in last]):
                last.append(k)
            else:
                self.passes.append([k])

    @property
    def cfg(self):
        return self.backbone.cfg

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        cond = cond or Conditioning()
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        plain = replace(cond, hint=None, control=None)
        total = None
        for group in self.passes:
            steer = self._pass(group, x, c_noise, cond)
            if steer is None:
                continue
            rows, hint, w, branches, encoded = steer
            given = {"features" if encoded else "hint": hint}
            if rows is None:  # every row of the batch: as one control alone (training, a single request)
                res = [r * w.view(-1, 1, 1, 1) for r in self.controls[group[0]].net(x, c_noise, plain, **given)]
                total = res if total is None else [a + b for a, b in zip(total, res)]
                continue
            some = plain.map(lambda t, at=rows: t[at])
            with subset_rows(x.shape[0], branches, len(rows)):  # an image's branches one call, as when alone
                res = self.controls[group[0]].net(x[rows], c_noise[rows], some, **given)
            res = [r * w.view(-1, 1, 1, 1) for r in res]  # (R, C_i, h_i, w_i)
            if total is None:
                total = [r.new_full((x.shape[0], *r.shape[1:]), -0.0) for r in res]
            total = [t.index_put((rows,), t[rows] + r) for t, r in zip(total, res)]
        cond = replace(cond, hint=None, control=tuple(total) if total is not None else None)
        return self.backbone(x, c_noise, cond)

    def _pass(self, group: list[int], x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning):
        """(the batch rows (R,) the controls `group` of one ControlNet steer at this step, None for every row; their
        condition images (R or B, C, H, W); their weights (R or B,): the scale, 0 outside the window; how many
        guidance branches of each image the rows hold, one branch after the other, for nn.invariant.subset_rows, or 1
        where a branch is steered without the others; whether the images are their hint features already,
        Control.features); None when the pass steers no row at this step."""
        n = x.shape[0]
        if len(group) == 1 and self.controls[group[0]].rows is None:
            k = group[0]
            ctl = self.controls[k]
            active = _active(ctl.window, c_noise)  # (B,) 1 where the control acts on the item's step
            if ctl.scale == 0 or not bool(active.any()):
                return None
            hint = cond.hint[k] if cond.hint is not None else ctl.image
            if hint is None:
                raise InputError(f"control {k + 1} has no condition image")
            feats = ctl.features(x.dtype, x.device, x.shape[-2:]) if cond.hint is None else None
            encoded = feats is not None
            hint = feats if encoded else hint
            if hint.shape[0] != n:
                if n % hint.shape[0]:
                    raise InputError(f"{hint.shape[0]} control images for a batch of {n}")
                hint = hint.repeat(n // hint.shape[0], 1, 1, 1)
            return None, hint.to(x.device), (active * ctl.scale).to(x.dtype), 1, encoded
        if n % self.images:
            raise InputError(f"a batch of {n} rows does not repeat {self.images} images")
        copies = n // self.images  # each guidance branch holds every image once
        steered = []
        for k in group:
            ctl = self.controls[k]
            if ctl.scale == 0:
                continue
            feats = ctl.features(x.dtype, x.device, x.shape[-2:])  # None for every control alike, or for none
            encoded = feats is not None
            image = feats if encoded else ctl.image.to(x.device)
            image = image if image.shape[0] == len(ctl.rows) else image.expand(len(ctl.rows), -1, -1, -1)
            at = torch.tensor(ctl.rows, device=x.device)
            ons = [_active(ctl.window, c_noise[at + copy * self.images]).bool() for copy in range(copies)]
            steered.append((ctl, image, at, ons))
        rows, hints, weights = [], [], []
        for copy in range(copies):  # one branch after the other, as guidance stacks them
            for ctl, image, at, ons in steered:
                on = ons[copy]
                rows.append((at + copy * self.images)[on])
                hints.append(image[on])
                weights.append(torch.full((int(on.sum()),), ctl.scale, device=x.device))
        if not sum(len(r) for r in rows):
            return None
        same = all(torch.equal(ons[0], on) for *_, ons in steered for on in ons)  # every branch of an image steered
        return torch.cat(rows), torch.cat(hints), torch.cat(weights).to(x.dtype), copies if same else 1, encoded


def _joins(c: Control, group: list[Control]) -> bool:
    """Whether control `c` can run in one pass with `group`: the same ControlNet, rows of their own."""
    mine = set(c.rows)
    return all(g.net is c.net and g.rows is not None and not mine & set(g.rows) for g in group)


def _active(window: tuple[float, float] | None, c_noise: torch.Tensor) -> torch.Tensor:
    if window is None:
        return torch.ones_like(c_noise, dtype=torch.float32)
    lo, hi = window
    return ((c_noise >= lo) & (c_noise <= hi)).float()


# --- files ------------------------------------------------------------------------------------------------------


def save_controlnet(path: str | Path, net: ControlNet, state: dict | None = None, **extra) -> Path:
    """Write a ControlNet file: weights (`state`, default the module's), the U-Net configuration it was made for,
    the hint encoder's shape, and `extra` (condition, base_sha256, step ...) as metadata."""
    config = {"unet": to_dict(net.cfg), "hint_channels": net.hint_channels, "hint_widths": list(net.widths)}
    if net.low_rank is not None:
        config["low_rank"] = dict(net.low_rank)
    return checkpoint.save(path, state if state is not None else net.file_state(), KIND, config, **extra)


def is_low_rank(path: str | Path) -> bool:
    """Whether the ControlNet file at `path` is low-rank (it loads with its model's U-Net), from its header."""
    return bool((checkpoint.read_metadata(path).get("config") or {}).get("low_rank"))


def load_controlnet(path: str | Path, device="cpu", unet: nn.Module | None = None) -> tuple[ControlNet, dict]:
    """(the ControlNet in file `path`, in eval mode and frozen, the file's metadata). unet: the U-Net it steers,
    which a low-rank ControlNet's copy is rebuilt from (InputError when it is needed and missing or of another
    configuration); a full ControlNet ignores it."""
    tensors, meta = checkpoint.load(path, KIND)
    cfg = meta["config"]
    net = ControlNet(from_dict(UNetConfig, cfg["unet"]), cfg["hint_channels"], tuple(cfg["hint_widths"]))
    if cfg.get("low_rank"):
        tensors = _merged_copy(net, tensors, cfg["low_rank"], unet, path, meta.get("base"))
    checkpoint.load_state(net, tensors, path, "ControlNet")
    return net.to(device).eval().requires_grad_(False), meta


def _merged_copy(net: ControlNet, tensors: dict, low: dict, unet, path, base) -> dict[str, torch.Tensor]:
    """The full weights of a low-rank ControlNet file: `unet`'s encoder and middle block with each layer's update
    (alpha / rank) B A added, and the file's own layers."""
    if unet is None:
        raise InputError(
            f"{path} is a low-rank ControlNet (rank {low.get('rank')}): its copy is rebuilt from the U-Net of the "
            f"model it steers ({base or 'its base model'}), so load it with that model (ldmkit generate --model "
            f"MODEL --control {path}:IMAGE)"
        )
    _check_config(net, unet, path)
    factor = float(low["alpha"]) / float(low["rank"])
    own = net.state_dict()
    full = {k: v.detach().to("cpu", torch.float32) for k, v in unet.state_dict().items() if k in own}
    for key in [k for k in tensors if k.endswith(".lora.down")]:
        layer = key[: -len(".lora.down")]
        w, up, down = full.get(f"{layer}.weight"), tensors.get(f"{layer}.lora.up"), tensors[key]
        if w is None or up is None or up.shape != (w.shape[0], down.shape[0]) or down.shape[1] != w[0].numel():
            raise CheckpointError(
                f"{path}: the low-rank update of {layer} does not fit its layer (a damaged file, or one made for "
                f"another denoiser)"
            )
        full[f"{layer}.weight"] = w + (up.float() @ down.float() * factor).view_as(w)
    return full | {k: v for k, v in tensors.items() if ".lora." not in k}


def _check_config(net: ControlNet, unet, source) -> None:
    if not isinstance(unet, UNet):
        raise InputError(f"{source} is a ControlNet for a U-Net; this model's denoiser is not a U-Net")
    mine, theirs = to_dict(net.cfg), to_dict(unet.cfg)
    diff = [f"unet.{k}={mine[k]!r} (the model has {theirs.get(k)!r})" for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise InputError(f"{source} was made for another denoiser: {'; '.join(diff[:3])}")


def check_fits(net: ControlNet, unet, factor: int, source: str | Path) -> None:
    """InputError naming the first difference when the ControlNet in `source` was made for another denoiser."""
    _check_config(net, unet, source)
    if net.factor != factor:
        raise InputError(
            f"{source} takes condition images {net.factor}x the latent's size, but this model's autoencoder "
            f"downsamples by {factor}"
        )
