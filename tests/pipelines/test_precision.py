"""--precision: fp32 is the plain float32 path bit for bit, bf16 autocast gives finite images close to it (and keeps
batch invariance), and bf16 where the device has no native bf16 is refused in one line."""

import contextlib

import pytest
import torch

from ldmkit import runtime
from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest

CPU = torch.device("cpu")
native = pytest.mark.skipif(not runtime.native_bf16(CPU), reason="this CPU has neither AVX-512 BF16 nor AMX")


@pytest.fixture(scope="module")
def ldm(tiny_ldm):
    return LatentDiffusion.load(tiny_ldm)


def request(precision: str, n: int = 2, batch_size: int = 2) -> SampleRequest:
    return SampleRequest(n=n, steps=4, cfg=2.0, seed=3, batch_size=batch_size, device="cpu", precision=precision)


def test_precision_choices_and_refusals(monkeypatch):
    assert runtime.sampling_dtype("fp32", CPU) is None
    with pytest.raises(InputError, match="--precision 'fp16' is not known"):
        runtime.sampling_dtype("fp16", CPU)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.sampling_dtype("auto", CPU) is None
    with pytest.raises(InputError, match="--precision bf16: this CPU has neither AVX-512 BF16 nor AMX"):
        runtime.sampling_dtype("bf16", CPU)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.sampling_dtype("auto", CPU) is torch.bfloat16
    with pytest.raises(InputError, match="--precision"):
        SampleRequest(precision="half")


def test_fp32_is_the_plain_path_bit_for_bit_and_records_nothing(ldm, monkeypatch):
    plain, _ = generate(ldm, request("fp32"))
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: calls.append(k) or contextlib.nullcontext())
    again, _ = generate(ldm, request("fp32"))
    assert torch.equal(plain, again) and calls and all(k.get("enabled") is False for k in calls)  # the decoder's
    assert "precision" not in request("fp32").record() and request("bf16").record()["precision"] == "bf16"


@native
@pytest.mark.slow  # three generations of the tiny model: 329 s on the loaded 2-core machine it was written on
def test_bf16_is_finite_close_to_fp32_and_batch_invariant(ldm):
    fp32, _ = generate(ldm, request("fp32", n=3, batch_size=3))
    bf16, _ = generate(ldm, request("bf16", n=3, batch_size=3))
    assert bool(torch.isfinite(bf16).all()) and not torch.equal(bf16, fp32)  # autocast acts
    assert float((bf16 - fp32).abs().mean()) < 0.02  # images in [-1, 1]
    alone, _ = generate(ldm, request("bf16", n=3, batch_size=1))
    assert torch.equal(alone, bf16)  # image i is the same alone or in a batch, in bf16 too
