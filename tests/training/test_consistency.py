"""The latent consistency distillation loss against known answers: for Gaussian data the exact consistency function
x sd / sqrt(sigma^2 + sd^2) has (nearly) no loss while the posterior mean (not a consistency function) has much; the
gradient reaches the student's online call only; each item's loss is the same alone or in a batch."""

import pytest
import torch

from ldmkit.diffusion.schedules import karras_sigmas
from ldmkit.errors import InputError
from ldmkit.noise import generators_from_seed
from ldmkit.training.consistency import consistency_loss

SD = 0.8


def posterior_mean(x, sigma, cond):
    return x * SD**2 / (sigma.view(-1, 1, 1, 1) ** 2 + SD**2)


def consistency_function(x, sigma, cond):
    """Where the probability-flow ODE of N(0, SD^2) data through (x, sigma) ends: it scales x."""
    return x * SD / (sigma.view(-1, 1, 1, 1) ** 2 + SD**2).sqrt()


def batch(n=64):
    return SD * torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_the_exact_consistency_function_has_almost_no_loss_and_the_posterior_mean_has_much():
    grid = torch.cat([karras_sigmas(50, 0.002, 80.0).float()[:-1], torch.zeros(1)])
    gens = generators_from_seed(0, 64)
    exact = consistency_loss(consistency_function, posterior_mean, batch(), None, None, grid, 1.0, gens)
    wrong = consistency_loss(posterior_mean, posterior_mean, batch(), None, None, grid, 1.0, gens)
    assert float(exact.mean()) < 0.1 * float(wrong.mean()), (exact.mean(), wrong.mean())  # measured 0.004 vs 0.079


def test_guidance_is_folded_into_the_teacher_step():
    grid = torch.tensor([4.0, 1.0, 0.0])
    gens = lambda: generators_from_seed(0, 8)  # noqa: E731

    def teacher(x, sigma, cond):  # the conditional branch predicts 1, the unconditional 0: guided D = w
        return torch.full_like(x, 1.0 if cond == "c" else 0.0)

    student = lambda x, sigma, cond: torch.zeros_like(x)  # noqa: E731
    loss = {w: consistency_loss(student, teacher, torch.zeros(8, 1, 2, 2), "c", "u", grid, w, gens()) for w in (1, 3)}
    assert float(loss[3].mean()) > float(loss[1].mean()) > 0  # the target at the grid's end is x_lo, pulled to w


def test_gradients_reach_the_online_call_only_and_items_do_not_depend_on_the_batch():
    scale = torch.nn.Parameter(torch.tensor(0.5))
    calls = []

    def student(x, sigma, cond):
        calls.append(torch.is_grad_enabled())
        return scale * x

    grid = torch.tensor([5.0, 2.0, 0.5, 0.0])
    x0 = batch(4)
    loss = consistency_loss(student, posterior_mean, x0, None, None, grid, 1.0, generators_from_seed(3, 4))
    loss.mean().backward()
    assert scale.grad is not None and calls == [False, True]  # the target under no_grad, then the online call
    alone = consistency_loss(student, posterior_mean, x0[2:3], None, None, grid, 1.0, generators_from_seed(5, 1))
    torch.testing.assert_close(alone, loss[2:3].detach())
    with pytest.raises(InputError, match="ending in 0"):
        consistency_loss(student, posterior_mean, x0, None, None, torch.tensor([5.0, 1.0]), 1.0)
