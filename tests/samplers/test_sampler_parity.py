"""Our samplers through `EpsDenoiser` reproduce diffusers' schedulers step for step (diffusers is a test oracle).

Conventions that differ, and how each test lines them up:
- Space: diffusers' DDIM / DDPM / DPM-Solver work on the VP latent x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, we
  on x = x0 + sigma eps = x_t / sqrt(abar_t). Euler schedulers already work in sigma space.
- Initial latent: VP schedulers start from noise (init_noise_sigma 1), i.e. x = noise * sqrt(sigma_max^2 + 1) for
  us; Euler with "linspace" / "trailing" starts from noise * sigma_max (with "leading", sqrt(sigma_max^2 + 1)).
- Timestep spacing: each scheduler's own default (DDIM / DDPM "leading" with SD's steps_offset = 1, Euler and DPM
  "linspace"). DPM-Solver's "linspace" is linspace(0, N-1, n + 1) rounded with its last point dropped; Euler's is
  unrounded linspace(0, N-1, n), with sigmas interpolated linearly in sigma where we interpolate in log sigma.
- Final step: DDIM with SD's set_alpha_to_one=False ends at abar_0 (sigma_min), not 0: we pass that grid.
  DPM-Solver with final_sigmas_type="zero" takes a first-order last step (lower_order_final), as ours does.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.config import DiffusionConfig  # noqa: E402
from ldmkit.diffusion.guidance import bind  # noqa: E402
from ldmkit.diffusion.parameterisation import EpsDenoiser  # noqa: E402
from ldmkit.diffusion.schedules import append_zero, schedule_from_config, spaced_timesteps, t_to_sigma  # noqa: E402
from ldmkit.samplers import SAMPLERS  # noqa: E402

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
STEPS, SHAPE = 20, (2, 4, 8, 8)


def toy_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth noise predictor depending on the input and the timestep."""
    t = t.float().view(-1, 1, 1, 1) if t.ndim else t.float()
    return 0.8 * torch.tanh(x_in) + 0.3 * torch.sin(x_in.roll(1, dims=1)) * torch.cos(t / 300)


class ToyBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x_in, c_noise, cond):
        self.timesteps.append(c_noise[0].item())
        return toy_eps(x_in, c_noise)


def ours(name: str, sigmas: torch.Tensor, x: torch.Tensor, seed: int, **options):
    backbone = ToyBackbone()
    den = EpsDenoiser(backbone, schedule_from_config(DiffusionConfig()))
    traj = []
    out = SAMPLERS[name](
        bind(den, None),
        x,
        sigmas,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda i, xi, x0, s: traj.append(xi),
        **options,
    )
    return traj + [out], backbone.timesteps


def theirs(scheduler, noise: torch.Tensor, seed: int, vp: bool, **step_options):
    """Run a diffusers scheduler; the trajectory is mapped to sigma space (x_t / sqrt(abar_t)) when `vp`."""
    g = torch.Generator().manual_seed(seed)
    abar = scheduler.alphas_cumprod.double()
    sample = noise * scheduler.init_noise_sigma
    traj = []
    for t in scheduler.timesteps:
        traj.append(sample / abar[int(t)].sqrt() if vp else sample)
        model_in = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(toy_eps(model_in, t), t, sample, generator=g, **step_options).prev_sample
    return traj + [sample], [float(t) for t in scheduler.timesteps]


def assert_same_trajectory(a, b, rtol=1e-4):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        err = (x.double() - y.double()).abs().max() / y.double().abs().max()
        assert err < rtol, f"step {i}: relative difference {err:.2e}"


def table_and_noise():
    return schedule_from_config(DiffusionConfig()), torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def sigma_grid(table, timesteps, final=0.0):
    return torch.cat([t_to_sigma(timesteps, table), torch.tensor([final], dtype=torch.float64)]).float()


@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_ddim_matches_diffusers(alpha_to_one):
    table, noise = table_and_noise()
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=alpha_to_one)
    sched.set_timesteps(STEPS)
    ts = spaced_timesteps(STEPS, 1000, "leading", steps_offset=1)
    sigmas = sigma_grid(table, ts, 0.0 if alpha_to_one else float(table[0]))
    mine, t_mine = ours("ddim", sigmas, noise * (sigmas[0] ** 2 + 1).sqrt(), 0)
    ref, t_ref = theirs(sched, noise, 0, vp=True, eta=0.0)
    final_abar = 1.0 if alpha_to_one else float(sched.alphas_cumprod[0])
    ref[-1] = ref[-1] / final_abar**0.5
    assert t_mine == t_ref  # exact integer timesteps reach the model
    assert_same_trajectory(mine, ref)


def test_ddpm_matches_diffusers_with_the_same_noise():
    table, noise = table_and_noise()
    sched = diffusers.DDPMScheduler(**SD, clip_sample=False)
    sched.set_timesteps(STEPS)
    sigmas = sigma_grid(table, spaced_timesteps(STEPS, 1000, "leading", steps_offset=1))
    mine, t_mine = ours("ddpm", sigmas, noise * (sigmas[0] ** 2 + 1).sqrt(), 5)
    ref, t_ref = theirs(sched, noise, 5, vp=True)
    assert t_mine == t_ref
    assert_same_trajectory(mine, ref)


@pytest.mark.parametrize(
    "name,cls", [("euler", "EulerDiscreteScheduler"), ("euler_ancestral", "EulerAncestralDiscreteScheduler")]
)
def test_euler_schedulers_match_diffusers(name, cls):
    table, noise = table_and_noise()
    sched = getattr(diffusers, cls)(**SD)
    sched.set_timesteps(STEPS)
    sigmas = append_zero(t_to_sigma(spaced_timesteps(STEPS, 1000, "linspace"), table)).float()
    # diffusers interpolates fractional timesteps linearly in sigma, we in log sigma: the grids agree to 1e-5
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=2e-5, atol=0)
    mine, t_mine = ours(name, sigmas, noise * sigmas[0], 3)
    ref, t_ref = theirs(sched, noise, 3, vp=False)
    assert t_mine == pytest.approx(t_ref, abs=1e-3)
    assert_same_trajectory(mine, ref)


@pytest.mark.parametrize("name,algorithm", [("dpmpp_2m", "dpmsolver++"), ("dpmpp_2m_sde", "sde-dpmsolver++")])
def test_dpm_solver_matches_diffusers(name, algorithm):
    table, noise = table_and_noise()
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, algorithm_type=algorithm, solver_order=2, solver_type="midpoint"
    )
    sched.set_timesteps(STEPS)
    ts = spaced_timesteps(STEPS + 1, 1000, "linspace").round()[:-1]  # DPM-Solver's own "linspace"
    sigmas = sigma_grid(table, ts)
    mine, t_mine = ours(name, sigmas, noise * (sigmas[0] ** 2 + 1).sqrt(), 9)
    ref, t_ref = theirs(sched, noise, 9, vp=True)
    assert t_mine == t_ref
    assert_same_trajectory(mine, ref)
