"""Batch invariance on the CPU: an image's numbers do not depend on the batch it shares, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.invariant import MIN_ROWS, batch_invariant
from ldmkit.pipelines.generate import SampleRequest, generate
from ldmkit.shipped import resolve_model


def rows_alone_equal_rows_together(fn, x: torch.Tensor) -> bool:
    together = fn(x)
    return all(torch.equal(fn(x[i : i + 1])[0], together[i]) for i in range(x.shape[0]))


@torch.no_grad()
def test_a_lone_image_is_convolved_as_in_any_batch():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(5, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    with batch_invariant():
        assert rows_alone_equal_rows_together(conv, x)
        assert torch.equal(conv(x[:1]), conv(x[:1].contiguous()))


@torch.no_grad()
@pytest.mark.parametrize("shape", [(7, 320), (3, 4, 320), (2, 77, 320)])
def test_a_few_rows_of_a_linear_layer_are_as_in_any_batch(shape):
    lin = torch.nn.Linear(320, 384)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with batch_invariant():
        assert rows_alone_equal_rows_together(lin, x)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # same call, whatever the route


def test_gradients_and_other_devices_are_left_alone():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with batch_invariant():
        conv(x).sum().backward()  # training: the plain kernel, gradients flow
    assert x.grad is not None and x.grad.shape == x.shape
    with batch_invariant("meta"):  # not the CPU: no mode is entered
        assert not torch.overrides._get_current_function_mode_stack()
    with batch_invariant(), batch_invariant():  # nesting enters the mode once
        assert len(torch.overrides._get_current_function_mode_stack()) == 1


def test_tiny_models_give_each_image_the_same_numbers_at_any_batch_size(tiny_ldm, tiny_text_ldm):
    for path, cond in ((tiny_ldm, {"labels": [0, 1, -1]}), (tiny_text_ldm, {"prompts": ["a", "bb cc", ""]})):
        ldm = LatentDiffusion.load(path)
        kw = dict(n=3, sampler="dpmpp_2m", steps=3, cfg=2.5, seed=4, **cond)
        together, _ = generate(ldm, SampleRequest(batch_size=3, **kw))
        alone, _ = generate(ldm, SampleRequest(batch_size=1, **kw))
        assert torch.equal(together, alone)


def test_the_shipped_text_model_gives_each_image_the_same_numbers_alone_and_together():
    ldm = LatentDiffusion.load(resolve_model("emoji"))
    prompts = ["red apple", "grinning face with big eyes", "x" * 300]
    kw = dict(steps=3, cfg=5.0, negative_prompt="blurry")
    together, _ = generate(ldm, SampleRequest(n=3, prompts=prompts, seed=9, batch_size=3, **kw))
    for i, p in enumerate(prompts):
        alone, _ = generate(ldm, SampleRequest(n=1, prompts=[p], seed=9 + i, batch_size=1, **kw))
        assert torch.equal(alone[0], together[i]), p


def test_min_rows_is_where_the_row_count_stops_mattering():
    """The constant is measured, not guessed: from MIN_ROWS rows on, a row's numbers are the same at any count."""
    w = torch.randn(384, 320, generator=torch.Generator().manual_seed(2))
    x = torch.randn(256, 320, generator=torch.Generator().manual_seed(3))
    full = F.linear(x, w)
    assert all(torch.equal(F.linear(x[:m], w), full[:m]) for m in range(MIN_ROWS, 64))
