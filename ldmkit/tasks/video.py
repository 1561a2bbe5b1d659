"""Video: a U-Net with temporal layers (denoisers/temporal.py) denoises clips (B, F, c, h, w) of latents.

It grows from an image generation model through --init: the image model's weights are kept and temporal layers
that start as the identity are added after each block, so the first training step starts from the image model frame
by frame (Video LDM, Blattmann et al. 2023; AnimateDiff, Guo et al. 2024). With `train.trainable=temporal` only those
layers train and the image layers stay frozen. Training reads clips (data.frames frames each) from a clip data set
(moving-fashion, emoji-motion, a folder of clips), whose every frame the frozen autoencoder encodes once into the
latent cache. The checkpoint is an ordinary model file of task "video", used by `ldmkit video`.
"""

from __future__ import annotations

from dataclasses import replace

from ..denoisers.temporal import temporal_parameters
from ..errors import InputError
from .registry import Task, register


def temporal_heads(model_channels: int) -> int:
    """The temporal attention's heads for a U-Net of `model_channels` first-level channels: 8 heads as AnimateDiff,
    fewer where a head would have fewer than 4 channels (every level's channels are multiples of the first's)."""
    heads = 8
    while heads > 1 and (model_channels % heads or model_channels // heads < 4):
        heads //= 2
    return heads


class Video(Task):
    name = "video"
    summary = "a video model"
    needs = ": it makes clips"
    commands = ("video",)
    routes = ("/v1/videos",)
    extends = ("generate",)

    def resolve(self, run, net, text_dim, names):
        """The base's (text or labels), with temporal layers where the model has none yet (an image model): attention
        and (video.temporal_conv) a 1-D convolution across frames after every block, as [video] says."""
        net, names = super().resolve(run, net, text_dim, names)
        v = run.video
        if not net.temporal_heads:
            heads = v.temporal_heads or temporal_heads(net.model_channels)
            net = replace(
                net,
                temporal_heads=heads,
                temporal_depth=v.temporal_depth,
                temporal_conv=v.temporal_conv,
                max_frames=v.max_frames,
            )
        return net, names

    def check_run(self, run, ae_factor, backbone_factor, backbone):
        if backbone != "U-Net":
            raise InputError(f"--task video needs a U-Net model (temporal layers go into its blocks), not a {backbone}")
        frames, limit = run.data.frames, run.unet.max_frames if run.unet.temporal_heads else run.video.max_frames
        if frames == 1 or frames > limit:
            raise InputError(
                f"data.frames={frames}: a training clip needs 2 to {limit} frames (0: the data set's default, 8)"
            )

    def trained_modules(self, trainer):
        """The backbone, as for an image model; with train.trainable=temporal its image layers are frozen first, so
        only the temporal layers have gradients (the model file still holds the whole U-Net)."""
        if trainer.run.train.trainable == "temporal":
            unet = trainer.ldm.unet.requires_grad_(False)
            for p in temporal_parameters(unet):
                p.requires_grad_(True)
        return None

    def training_inputs(self, trainer, idx, gens, x):
        """(clean latent clips (B, F, c, h, w), conditioning per clip)."""
        z, cond = super().training_inputs(trainer, idx, gens, x)
        if z.ndim != 5:
            raise InputError(
                f"--task video trains on clips, but data.dataset={trainer.run.data.dataset!r} was read as images; "
                f"use moving-fashion or emoji-motion, or set data.frames (e.g. 8) to read a folder as clips"
            )
        return z, cond

    def check_from_noise(self, ldm, command: str) -> None:
        """A video model makes clips: only `ldmkit video` uses it."""
        if command not in self.commands:
            raise self.wrong_command(ldm.source or "this model", command)


VIDEO = register(Video())
