"""ControlNet training (Zhang et al. 2023): a trainable copy of the frozen --init model's U-Net encoder learns to
steer it from a condition image (denoisers/controlnet.py).

Each step encodes the step's images with the frozen autoencoder and takes their conditions from the run's
`control.condition`: a built-in detector run on the images (canny, mask, colour; data/conditions.py) or the folder's
paired condition images (folder). The base model's U-Net and text encoder stay frozen; only the ControlNet trains, and
the run's checkpoint is a ControlNet file (controlnet.safetensors) naming its base model's SHA-256, used with the base
model through `ldmkit generate --control`. With control.rank > 0 the copy stays frozen and trains through LoRAs of
that rank (a low-rank ControlNet, whose file holds only what differs from the base model).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data.conditions import DetectedConditions, PairedConditions, detect
from ..denoisers.controlnet import Control, Controlled, ControlNet, save_controlnet
from ..denoisers.unet import UNet
from ..errors import InputError
from .registry import Task, register

FILE = "controlnet.safetensors"


class ControlTask(Task):
    name = "control"
    summary = "a ControlNet"
    needs = ": it steers its base model from a condition image, through `ldmkit generate --control`"
    commands = ()  # a ControlNet file is no model file: generate takes it with --control
    routes = ()
    trains_on_images = True
    from_noise = False
    base_model = True

    def check_run(self, run, ae_factor, backbone_factor, backbone):
        super().check_run(run, ae_factor, backbone_factor, backbone)
        if backbone != "U-Net":
            raise InputError(f"--task control needs a U-Net model; --init {run.init} has a {backbone}")

    def trained_modules(self, trainer):
        """The ControlNet, copied from the frozen U-Net, which the trainer's denoiser now calls through; the
        conditions' source (a detector or the folder's pairs) is kept on the trainer."""
        ldm, run = trainer.ldm, trainer.run
        unet = ldm.unet
        if not isinstance(unet, UNet):
            raise InputError("--task control needs a U-Net model")
        if unet.cfg.in_channels != ldm.latent_channels:
            raise InputError(
                f"--init {run.init} takes {unet.cfg.in_channels - ldm.latent_channels} channels beside the latent; "
                f"--task control needs a generation model"
            )
        unet.requires_grad_(False).eval()
        if ldm.text_encoder is not None:
            ldm.text_encoder.requires_grad_(False)
        net = ControlNet.from_unet(unet, ldm.factor, first_width=run.control.hint_width)
        if run.control.rank:
            net.make_low_rank(run.control.rank, run.control.alpha or None)
        ldm.denoiser.backbone = Controlled(unet, [Control(net)])
        cfg = run.control
        if cfg.condition == "folder":
            paired = PairedConditions(trainer.images)
            trainer.conditions = lambda idx, x: paired.batch(idx).to(x.device)
        elif run.data.crop == "center" and not run.data.flip:  # an item is the same image at every draw
            cache = DetectedConditions(cfg.condition, cfg)
            trainer.conditions = lambda idx, x: cache.batch(idx, x).to(x.device)
        else:
            trainer.conditions = lambda idx, x: detect(cfg.condition, x.cpu(), cfg).to(x.device)
        return {"controlnet": net}

    def training_inputs(self, trainer, idx, gens, x):
        z = trainer.encode_sample(x, gens)
        hint = trainer.conditions(idx, x)  # (B, 3, H, W) in [0, 1]
        return z, replace(trainer.condition(idx, gens), hint=(hint,))

    def preview_inputs(self, trainer, n, cond, uncond, size):
        """The first training images' conditions; the grid shows each sample beside nothing else."""
        idx = torch.arange(n) % len(trainer.images)
        x = torch.stack([trainer.images[int(i)]["image"] for i in idx]).to(trainer.device)
        hint = trainer.conditions(idx, x)
        return replace(cond, hint=(hint,)), replace(uncond, hint=(hint,)) if uncond is not None else None, None

    def preview_backbone(self, trainer, weights):
        return Controlled(trainer.ldm.unet, [Control(weights["controlnet"].eval())])

    def export(self, trainer, out_dir, weights, step):
        run = trainer.run
        return save_controlnet(
            Path(out_dir) / FILE,
            weights["controlnet"],
            condition=run.control.condition,
            control=vars(run.control),
            base=run.init,
            base_sha256=run.init_sha256,
            step=step,
        )


CONTROL = register(ControlTask())
