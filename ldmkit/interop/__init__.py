"""Import and export: diffusers models and pipeline folders, Stable Diffusion single-file checkpoints.

`convert(src, dst)` converts whole models between formats; `unet_from_diffusers` / `vae_from_diffusers` /
`dit_from_diffusers` and their reverses map single networks. diffusers itself is never needed at run time (it is
the tests' oracle).
"""

from .bundle import ModelWeights
from .convert import convert, read_any
from .diffusers import (
    unet_from_diffusers,
    unet_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
    write_diffusers_unet,
    write_diffusers_vae,
)
from .diffusers_dit import dit_from_diffusers, dit_to_diffusers, write_diffusers_dit
from .diffusers_pipeline import read_pipeline, write_pipeline
from .single_file import read_single_file, write_single_file

__all__ = [
    "ModelWeights",
    "convert",
    "read_any",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "vae_from_diffusers",
    "vae_to_diffusers",
    "write_diffusers_unet",
    "write_diffusers_vae",
    "dit_from_diffusers",
    "dit_to_diffusers",
    "write_diffusers_dit",
    "read_pipeline",
    "write_pipeline",
    "read_single_file",
    "write_single_file",
]
