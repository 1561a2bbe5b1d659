"""Batch invariance on the CPU: an image's numbers do not depend on the batch it shares, bit for bit."""

import contextlib

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


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_1x1_convolution_gives_each_image_the_same_numbers_in_a_batch_of_16_at_one_thread_too(n_threads):
    # at one thread oneDNN computed a 1x1 convolution of 16 or more images differently from a smaller batch
    conv = torch.nn.Conv2d(64, 128, 1)
    x = torch.randn(32, 64, 8, 8, generator=torch.Generator().manual_seed(5))
    with threads(n_threads), batch_invariant():
        assert rows_alone_equal_rows_together(conv, x)
        assert rows_alone_equal_rows_together(torch.nn.Conv2d(64, 8, 1, bias=False), x[:, :, :2, :2])  # 4 rows each
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias), atol=1e-5)
        # few output channels: a matrix product over channels moved last, if left strided, depends on the row count
        narrow = torch.nn.Conv2d(16, 8, 1)
        assert rows_alone_equal_rows_together(narrow, torch.randn(3, 16, 16, 16, generator=torch.Generator()))


def test_eight_strangers_batched_at_one_thread_get_the_images_they_get_alone():
    ldm = LatentDiffusion.load(resolve_model("emoji"))
    prompts = [f"prompt {i}" for i in range(8)]
    with threads(1):
        together, _ = generate(ldm, SampleRequest(n=8, prompts=prompts, seed=100, steps=2, cfg=3.0, batch_size=8))
        for i in (0, 7):
            alone, _ = generate(ldm, SampleRequest(n=1, prompts=[prompts[i]], seed=100 + i, steps=2, cfg=3.0))
            assert torch.equal(alone[0], together[i]), prompts[i]
