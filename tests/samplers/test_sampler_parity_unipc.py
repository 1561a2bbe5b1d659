"""UniPC and LCM through `EpsDenoiser` reproduce diffusers' `UniPCMultistepScheduler` and `LCMScheduler` step for
step (conventions as in tests/samplers/test_sampler_parity.py: diffusers' VP latent x_t is our x times sqrt(abar_t)).

- UniPC: timesteps are DPM-Solver's "linspace" (linspace(0, N-1, n + 1) rounded, last point dropped); diffusers'
  defaults are solver_type "bh2", predict_x0 (our data-prediction form), lower_order_final and no disabled
  corrector. With final_sigmas_type "zero" and "bh1" diffusers' last step is NaN (B(h) = -h is infinite there,
  times a zero correction), so "bh1" is compared with final_sigmas_type "sigma_min": both end at abar_0.
- LCM: the boundary scalings c_skip / c_out are the model's, so they wrap our denoiser (`consistency_boundary`)
  while diffusers' scheduler applies them itself; its timesteps are `lcm_timesteps`, and it draws one noise per
  step except the last, as ours does, from the same generator.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.config import DiffusionConfig  # noqa: E402
from ldmkit.diffusion.guidance import bind  # noqa: E402
from ldmkit.diffusion.parameterisation import EpsDenoiser  # noqa: E402
from ldmkit.diffusion.schedules import schedule_from_config, spaced_timesteps  # noqa: E402
from ldmkit.samplers import SAMPLERS  # noqa: E402
from ldmkit.samplers.lcm import consistency_boundary, lcm_timesteps  # noqa: E402
from tests.samplers.test_sampler_parity import (  # noqa: E402
    SD,
    STEPS,
    ToyBackbone,
    assert_same_trajectory,
    ours,
    sigma_grid,
    table_and_noise,
    theirs,
    toy_eps,
)


def theirs_unipc(scheduler, noise: torch.Tensor):
    """diffusers' UniPC loop (its step takes no generator); the trajectory in sigma space, the last state as is."""
    abar = scheduler.alphas_cumprod.double()
    sample, traj = noise.clone(), []
    for t in scheduler.timesteps:
        traj.append(sample / abar[int(t)].sqrt())
        sample = scheduler.step(toy_eps(sample, t), t, sample).prev_sample
    return traj + [sample], [float(t) for t in scheduler.timesteps]


@pytest.mark.parametrize(
    "variant,order,final,lower_order_final,disable_corrector",
    [
        ("bh2", 2, "zero", True, ()),  # diffusers' defaults
        ("bh2", 1, "zero", True, ()),
        ("bh2", 3, "zero", True, ()),
        ("bh2", 3, "sigma_min", False, ()),
        ("bh2", 2, "zero", True, (0, 1, 2)),
        ("bh1", 1, "sigma_min", True, ()),
        ("bh1", 2, "sigma_min", True, ()),
        ("bh1", 3, "sigma_min", True, ()),
        ("bh1", 3, "sigma_min", False, (4,)),
    ],
)
def test_unipc_matches_diffusers(variant, order, final, lower_order_final, disable_corrector):
    table, noise = table_and_noise()
    sched = diffusers.UniPCMultistepScheduler(
        **SD,
        solver_type=variant,
        solver_order=order,
        final_sigmas_type=final,
        lower_order_final=lower_order_final,
        disable_corrector=list(disable_corrector),
    )
    sched.set_timesteps(STEPS)
    ts = spaced_timesteps(STEPS + 1, 1000, "linspace").round()[:-1]
    sigmas = sigma_grid(table, ts, 0.0 if final == "zero" else float(table[0]))
    name = "unipc" if variant == "bh2" else "unipc_bh1"
    mine, t_mine = ours(
        name,
        sigmas,
        noise * (sigmas[0] ** 2 + 1).sqrt(),
        0,
        order=order,
        lower_order_final=lower_order_final,
        disable_corrector=disable_corrector,
    )
    ref, t_ref = theirs_unipc(sched, noise)
    if final == "sigma_min":
        ref[-1] = ref[-1] / float(sched.alphas_cumprod[0]) ** 0.5
    assert t_mine == t_ref
    assert_same_trajectory(mine, ref)  # measured: at most 2.7e-6 relative


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_with_the_boundary_wrapper_matches_diffusers(steps):
    table, noise = table_and_noise()
    sched = diffusers.LCMScheduler(**SD)
    sched.set_timesteps(steps)
    ts = lcm_timesteps(steps)
    assert ts.tolist() == sched.timesteps.tolist()
    sigmas = sigma_grid(table, ts.double())
    backbone = ToyBackbone()
    den = EpsDenoiser(backbone, schedule_from_config(DiffusionConfig()))
    mine = []
    out = SAMPLERS["lcm"](
        consistency_boundary(bind(den, None), den.timestep, timestep_scaling=sched.config.timestep_scaling),
        noise * (sigmas[0] ** 2 + 1).sqrt(),
        sigmas,
        generator=torch.Generator().manual_seed(7),
        callback=lambda i, xi, x0, s: mine.append(xi),
    )
    ref, t_ref = theirs(sched, noise, 7, vp=True)
    assert backbone.timesteps == t_ref
    assert_same_trajectory(mine + [out], ref)  # measured: at most 1e-6 relative
