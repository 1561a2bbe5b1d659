"""LoRA layers: the update, per-sample scales, merge and an exact unmerge."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import InputError
from ldmkit.nn.invariant import batch_invariant, image_rows
from ldmkit.nn.lora import LoRA, LoRASet, attach, merge, scales


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5))


def _set(net, paths, rank=2, alpha=3.0, seed=1):
    s = LoRASet.for_modules(net, paths, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in s.items():
            m.up.copy_(torch.randn(m.up.shape, generator=g))  # B is zero at initialisation
    return s


def test_fresh_lora_leaves_the_output_unchanged_exactly():
    net = _net()
    x = torch.randn(3, 6)
    base = net(x)
    h = attach(net, LoRASet.for_modules(net, ["0", "1"], 2))
    assert torch.equal(net(x), base)
    h.remove()


def test_unmerged_update_is_w_plus_scale_alpha_over_rank_ba():
    net = _net()
    lora = _set(net, ["0"], rank=2, alpha=3.0)
    x = torch.randn(4, 6)
    attach(net, lora, scale=0.7)
    w = net[0].weight + 0.7 * (3.0 / 2) * lora["0"].up @ lora["0"].down
    expected = net[1](F.linear(x, w, net[0].bias))
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_one_by_one_convolution():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 6, 1))
    lora = _set(conv, ["0"], rank=3, alpha=1.5)
    x = torch.randn(2, 4, 5, 5)
    attach(conv, lora, scale=-0.5)
    w = conv[0].weight + (-0.5 * 0.5 * lora["0"].up @ lora["0"].down)[:, :, None, None]
    assert torch.allclose(conv(x), F.conv2d(x, w, conv[0].bias), atol=1e-6)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_kernel_convolution_locon(stride, padding, dilation):
    """A LoRA on a 3x3 convolution (LoCon): A a 3x3 convolution with the layer's stride, padding and dilation, B a
    1x1; unmerged it equals the layer with W + s (alpha / r) B A (A unflattened to a kernel), and merged the same,
    with the weight back bit for bit after unmerge."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation))
    lora = _set(conv, ["0"], rank=3, alpha=1.5)
    assert lora["0"].down.shape == (3, 4 * 9) and lora["0"].kernel == (3, 3)
    x = torch.randn(2, 4, 9, 9)
    delta = (-0.5 * 0.5 * lora["0"].up @ lora["0"].down).view(6, 4, 3, 3)
    expected = F.conv2d(x, conv[0].weight + delta, conv[0].bias, stride, padding, dilation)
    before = conv[0].weight.clone()
    h = attach(conv, lora, scale=-0.5)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    h.remove()
    m = merge(conv, lora, scale=-0.5)
    assert torch.allclose(conv(x), expected, atol=1e-5)
    m.unmerge()
    assert torch.equal(conv[0].weight, before)


def test_a_kernel_convolution_narrower_than_the_rank_gets_a_full_rank_update():
    """LoCon on a U-Net reaches conv_out, whose outputs are the latent channels: its rank is capped at min(in, out)
    with the factor alpha / r kept; a linear layer (or 1x1 convolution) narrower than the rank is still refused."""
    net = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(2, 8, 3, padding=1))
    s = LoRASet.for_modules(net, ["0", "1"], 8, alpha=4.0)
    assert (s["0"].rank, s["0"].factor) == (2, 0.5) and (s["1"].rank, s["1"].factor) == (8, 0.5)
    with pytest.raises(InputError, match="rank 8 does not fit a layer of 4 -> 2"):
        LoRASet.for_modules(nn.Sequential(nn.Conv2d(4, 2, 1)), ["0"], 8)


def test_per_sample_scales_equal_each_sample_alone():
    net = _net()
    a, b = _set(net, ["0", "1"], seed=1), _set(net, ["1"], seed=2)
    attach(net, a, scale=0.0)
    attach(net, b, scale=0.0)
    x = torch.randn(3, 6)
    sa, sb = torch.tensor([1.0, 0.0, -0.8]), torch.tensor([0.0, 0.5, 1.0])
    with scales({a: sa, b: sb}):
        batch = net(x)
        doubled = net(torch.cat([x, x]))  # classifier-free guidance doubles the batch: scales repeat
    for i in range(3):
        with scales({a: float(sa[i]), b: float(sb[i])}):
            alone = net(x[i : i + 1])
        assert torch.allclose(batch[i], alone[0], atol=1e-6)
    assert torch.allclose(doubled[3:], batch, atol=1e-6)


@torch.no_grad()
def test_a_batch_computes_a_lora_on_the_images_that_use_it_alone_with_their_numbers():
    """Per-sample scales with zeros: the update runs on the rows of the images that use the LoRA only (both
    branches of each under guidance), the other images keep the base numbers bit for bit, and each user gets, bit
    for bit, what it gets alone."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    lora = _set(conv, ["0"], rank=3)
    seen = []
    lora["0"].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    x = torch.randn(8, 4, 6, 6)  # 4 images, guided: the conditional rows, then the unconditional
    s = torch.tensor([0.0, 1.5, 0.0, -0.5])
    with batch_invariant(), image_rows(2, 8):
        base = conv(x)
        attach(conv, lora, scale=0.0)
        with scales({lora: s}):
            seen.clear()
            out = conv(x)
    assert seen == [4]  # the two users' two rows each
    assert torch.equal(out[[0, 2, 4, 6]], base[[0, 2, 4, 6]])
    for i in (1, 3):
        with batch_invariant(), image_rows(2, 2), scales({lora: float(s[i])}):
            alone = conv(x[i::4])
        assert torch.equal(out[i::4], alone), i


def test_scale_zero_adds_an_exact_zero():
    net = _net()
    x = torch.randn(2, 6)
    base = net(x)
    lora = _set(net, ["0", "1"])
    attach(net, lora, scale=0.0)
    assert torch.equal(net(x), base)


def test_merge_matches_unmerged_and_unmerge_restores_bit_for_bit():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lora, other = _set(net, ["0", "1"], seed=1), _set(net, ["1"], seed=2)
    x = torch.randn(4, 6)
    h = attach(net, lora, scale=0.6)
    unmerged = net(x)
    h.remove()
    merged = merge(net, lora, 0.6).merge(other, -1.0)
    with torch.no_grad():
        got = net(x)
    h2 = attach(net, other, scale=-1.0)  # merged lora + unmerged other = both merged
    merged.unmerge()
    h3 = attach(net, lora, scale=0.6)
    assert torch.allclose(net(x), got, atol=1e-5)
    h2.remove(), h3.remove()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not torch.equal(unmerged, net(x))


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(InputError, match="rank 9 does not fit a layer of 6 -> 8.*from 1 to 6"):
        LoRA(6, 8, 9)
    with pytest.raises(InputError, match="without groups, not Conv2d \\(groups=2"):
        LoRASet.for_modules(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), ["0"], 1)
    with pytest.raises(InputError, match="padding_mode='reflect'"):
        LoRASet.for_modules(nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect")), ["0"], 1)


def test_wrong_number_of_scales_is_refused():
    net = _net()
    lora = _set(net, ["0"])
    attach(net, lora, scale=torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match="2 LoRA scales do not fit a batch of 3"):
        net(torch.randn(3, 6))
