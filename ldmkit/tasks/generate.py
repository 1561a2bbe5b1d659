"""The plain task: a denoiser that generates from noise and a prompt, a label or nothing."""

from __future__ import annotations

from ..errors import InputError
from .registry import TASKS, Task, register


class Generate(Task):
    name = "generate"
    summary = "a generation model"
    commands = ("generate", "img2img", "inpaint", "outpaint", "sample", "synth")
    routes = ("/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs")

    def check_from_noise(self, ldm, command: str) -> None:
        """A model whose backbone takes more than the latent cannot start from noise alone; an imported one with
        Stable Diffusion's inpainting layout (mask and masked-image latents) is named as the inpainting model it is
        (its file does not record a task)."""
        extra = ldm.run.backbone.in_channels - ldm.latent_channels
        if extra == 0:
            return
        if extra == ldm.latent_channels + 1:
            raise TASKS["inpaint"].wrong_command(ldm.source or "this model", command)
        raise InputError(
            f"{ldm.source or 'this model'} takes {extra} input channels beside the latent, so it cannot generate "
            f"from noise alone; use it with the command it was trained for"
        )


GENERATE = register(Generate())
