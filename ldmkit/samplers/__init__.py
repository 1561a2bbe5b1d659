"""Samplers: one pure function per method, all with one signature.

    sample_x(denoise, x, sigmas, *, generator=None, callback=None, **method_options) -> x

denoise(x (B,C,H,W), sigma (B,)) -> x0 prediction; x: the starting latent, already scaled by sigmas[0]; sigmas: a
1-D decreasing tensor, normally ending in 0; generator: a torch.Generator or one per sample (for batch-size
independent noise); callback(i, x, x0_pred, sigma) is called once per step with the state before its update.
Samplers hold no state, so two threads may sample with one model at once.
"""

from __future__ import annotations

from ..errors import InputError
from .ddim import sample_ddim, sample_ddpm
from .dpm import sample_dpmpp_2m, sample_dpmpp_2m_sde
from .euler import sample_euler, sample_euler_ancestral, sample_heun
from .flow import sample_flow_euler
from .lcm import sample_lcm
from .unipc import sample_unipc, sample_unipc_bh1

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,  # UniPC-2 with B(h) = e^{-h} - 1 ("bh2"), diffusers' default
    "unipc_bh1": sample_unipc_bh1,
    "lcm": sample_lcm,  # multistep consistency sampling, for consistency (LCM) models
    "flow_euler": sample_flow_euler,  # the same steps as euler, written in the rectified flow's x_t and t
}


def get_sampler(name: str):
    """The sampler function registered as `name`."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "get_sampler", *(f.__name__ for f in SAMPLERS.values())]
