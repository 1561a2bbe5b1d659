"""Several requests in one forward pass: every image is bit for bit what its request alone gives."""

import pytest
import torch

from ldmkit.errors import InputError
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.batching import generate_together, share_key
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest


@pytest.fixture(scope="module")
def text_ldm(tiny_text_ldm):
    return LatentDiffusion.load(tiny_text_ldm)


@pytest.fixture(scope="module")
def class_ldm(tiny_ldm):
    return LatentDiffusion.load(tiny_ldm)


def test_strangers_batched_together_get_their_own_images(text_ldm):
    reqs = [
        SampleRequest(n=2, prompts=["a red apple"], cfg=4.0, seed=3, steps=4),
        SampleRequest(n=1, prompts=["blue heart"], negative_prompt="dark", cfg=7.5, seed=100, steps=4),
        SampleRequest(n=3, prompts=["x", "yy"], cfg=2.0, seed=3, steps=4),
    ]
    together = generate_together(text_ldm, reqs, batch_size=4)  # passes of 4 and 2 images, across requests
    assert [t.shape[0] for t in together] == [2, 1, 3]
    for req, got in zip(reqs, together):
        alone, _ = generate(text_ldm, req)
        assert torch.equal(alone, got)


def test_class_requests_and_unguided_requests(class_ldm):
    reqs = [SampleRequest(n=2, labels=[1], cfg=1.0, seed=5, steps=3), SampleRequest(n=1, cfg=1.0, seed=0, steps=3)]
    together = generate_together(class_ldm, reqs)
    for req, got in zip(reqs, together):
        assert torch.equal(generate(class_ldm, req)[0], got)


def test_share_key_separates_what_changes_the_computation():
    base = SampleRequest(prompts=["a"], cfg=3.0)
    assert share_key(base) == share_key(SampleRequest(prompts=["b"], cfg=9.0, seed=4, negative_prompt="z"))
    for other in (dict(steps=10), dict(sampler="euler"), dict(cfg=1.0), dict(height=32), dict(cfg_rescale=0.7)):
        assert share_key(base) != share_key(SampleRequest(**{**base.__dict__, **other}))


def test_requests_that_cannot_share_a_pass_are_refused(text_ldm):
    with pytest.raises(InputError, match="must share"):
        generate_together(text_ldm, [SampleRequest(n=1, steps=3), SampleRequest(n=1, steps=4)])
