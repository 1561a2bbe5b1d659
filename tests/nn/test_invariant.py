"""Batch invariance on the CPU: an image's numbers do not depend on the batch it shares, bit for bit."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.invariant import batch_invariant, image_rows, plain_kernels, self_check
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
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


@torch.no_grad()
def test_a_guided_image_is_one_call_of_its_two_rows_as_alone():
    """Inside image_rows(2, n) an image's rows i and i + n / 2 are one two-row call, the call the image makes
    alone; a call with another row count (attention heads folded in, say) is still split row by row."""
    g = torch.Generator().manual_seed(5)
    conv, lin = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Linear(24, 40)
    for layer, x in ((conv, torch.randn(10, 8, 8, 8, generator=g)), (lin, torch.randn(10, 6, 24, generator=g))):
        b = 5
        with batch_invariant():
            with image_rows(2, 2 * b):
                together = layer(x)
                other = layer(x[:6])  # 6 rows: not the guided batch, split row by row
            for i in range(b):
                with image_rows(2, 2):
                    alone = layer(x[i::b])  # the image alone: its two branches
                assert torch.equal(together[i::b], alone), (type(layer).__name__, i)
            assert torch.equal(other, torch.cat([layer(x[i : i + 1]) for i in range(6)]))
        assert torch.allclose(together, layer(x), atol=1e-5)  # and the numbers the plain kernels give
    q, k, v = (torch.randn(6, 2, 9, 16, generator=g) for _ in range(3))
    with batch_invariant(), image_rows(2, 6):
        together = F.scaled_dot_product_attention(q, k, v)
        for i in range(3):
            with image_rows(2, 2):
                assert torch.equal(together[i::3], F.scaled_dot_product_attention(q[i::3], k[i::3], v[i::3]))


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


def inputs_alone_equal_together(fn, *tensors) -> bool:
    together = fn(*tensors)
    return all(torch.equal(fn(*(t[i : i + 1] for t in tensors))[0], together[i]) for i in range(len(together)))


@torch.no_grad()
def test_matrix_products_and_attention_give_each_image_its_own_numbers():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(6, 9, 24, generator=g), torch.randn(6, 24, 5, generator=g)
    w = torch.randn(24, 7, generator=g)
    q, k, v = (torch.randn(6, 2, 11, 16, generator=g) for _ in range(3))
    mask = torch.rand(6, 1, 1, 11, generator=g) > 0.3
    mask[..., 0] = True
    c = torch.randn(6, 9, 5, generator=g)
    with batch_invariant():
        assert inputs_alone_equal_together(lambda x, y: x @ y, a, b)
        assert inputs_alone_equal_together(lambda x: torch.matmul(x, w), a)
        assert inputs_alone_equal_together(torch.bmm, a, b)
        assert inputs_alone_equal_together(torch.baddbmm, c, a, b)
        assert inputs_alone_equal_together(
            lambda *t: F.scaled_dot_product_attention(*t[:3], attn_mask=t[3]), q, k, v, mask
        )
        assert inputs_alone_equal_together(F.scaled_dot_product_attention, q, k, v)  # no mask
        # the per-image route computes what the plain kernels compute
        assert torch.allclose(torch.baddbmm(c, a, b), c + a @ b, atol=1e-5)


@torch.no_grad()
def test_an_image_gets_the_same_numbers_wherever_it_lies_in_memory():
    """A slice at an odd offset of a larger buffer (other alignment, other strides) is computed like a fresh image."""
    conv, lin = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Linear(40, 24)
    buf = torch.randn(1 + 2 * 8 * 10 * 10, generator=torch.Generator().manual_seed(7))
    x = buf[1:].view(2, 8, 10, 10)  # 4 bytes past an aligned start
    with batch_invariant():
        assert torch.equal(conv(x)[1], conv(x[1:].clone())[0])
        t = buf[1 : 1 + 2 * 40 * 20].view(2, 40, 20).transpose(1, 2)  # (2, 20, 40), strided and offset
        assert torch.equal(lin(t)[0], lin(t[:1].contiguous())[0])


def test_the_self_check_holds_here_and_catches_the_plain_kernels():
    result = self_check()
    assert result["holds"], result["failures"]
    with plain_kernels():  # the same probe without the mode: batch-dependent numbers, which the check must see
        plain = self_check()
    assert not plain["holds"] and plain["failures"], "the probe no longer exercises batch-dependent kernels"


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# Each instruction-set level the libraries let a process cap: oneDNN (convolutions), MKL (matrix products) and
# ATen's own vectorised kernels, with the CPU flag the level needs.
ISA_LEVELS = {
    "sse41": (
        {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default"},
        "sse4_1",
    ),
    "avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
    "avx512": (
        {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ATEN_CPU_CAPABILITY": "avx512"},
        "avx512f",
    ),
    "avx512-bf16": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "avx512_bf16"),
    "amx": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "amx_tile"),
    "uncapped": ({}, None),
}

_CHILD = """
import json, sys, torch
from ldmkit.ldm import LatentDiffusion
from ldmkit.nn.invariant import self_check
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
out = {}
ldm = LatentDiffusion.load(sys.argv[1])
prompts = ["a", "bb cc", "", "d e f"]
for threads in (1, 2):
    torch.set_num_threads(threads)
    check = self_check()
    kw = dict(sampler="dpmpp_2m", steps=2, cfg=2.5)
    together, _ = generate(ldm, SampleRequest(n=4, prompts=prompts, seed=3, batch_size=4, **kw))
    alone = [generate(ldm, SampleRequest(n=1, prompts=[p], seed=3 + i, **kw))[0][0] for i, p in enumerate(prompts)]
    model = [i for i in range(4) if not torch.equal(alone[i], together[i])]
    out[threads] = check["failures"] + [f"tiny text model, image {i} of 4" for i in model]
print(json.dumps(out))
"""


@pytest.mark.parametrize("level", list(ISA_LEVELS))
def test_batch_invariance_holds_at_every_instruction_set_level_and_thread_count(level, tiny_text_ldm):
    """A fresh process per level (the libraries read their caps once, at start), at one and two threads."""
    env_caps, flag = ISA_LEVELS[level]
    if flag is not None and flag not in _cpu_flags():
        pytest.skip(f"level {level}: this CPU has no {flag}")
    env = {k: v for k, v in os.environ.items() if k not in env_caps and not k.startswith(("ONEDNN_", "MKL_ENABLE"))}
    env.update(env_caps, OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_text_ldm)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {"1": [], "2": []}, f"level {level} ({env_caps}): {failures}"
