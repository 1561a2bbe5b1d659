"""PSNR and SSIM: known answers and agreement with an independent scipy computation of Wang et al. (2004)."""

import math

import numpy as np
import pytest
import torch

from ldmkit.evaluation.metrics import psnr, ssim


def _images(b=3, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g) * 2 - 1
    return x, g


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range=2.0) -> float:
    """SSIM of one (C, H, W) pair: scipy Gaussian filtering (sigma 1.5, radius 5), borders of 5 px dropped."""
    ndimage = pytest.importorskip("scipy.ndimage")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
        f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        s = ((2 * ma * mb + c1) * (2 * cab + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_psnr_identical_is_inf_and_known_noise_level():
    x, g = _images()
    assert torch.isinf(psnr(x, x)).all()
    # a constant offset of 0.02 everywhere: MSE = 4e-4, PSNR = 10 log10(4 / 4e-4) = 40 dB
    assert torch.allclose(psnr(x, x + 0.02), torch.full((3,), 40.0), atol=1e-3)
    # Gaussian noise of std s: PSNR ~ 10 log10(4 / s^2), per image
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    p = psnr(noisy, x)
    assert p.shape == (3,)
    assert torch.allclose(p, torch.full((3,), 10 * math.log10(4 / 0.01)), atol=0.2)
    # data_range enters as 20 log10(L)
    assert torch.allclose(psnr(noisy, x, data_range=1.0), p - 20 * math.log10(2.0), atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 28, 28), (1, 3, 29, 41)])
def test_ssim_matches_scipy_reference(shape):
    x, g = _images(*shape)
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)
    assert ours.shape == (shape[0],)
    ref = [_ssim_reference(x[i].numpy(), y[i].numpy()) for i in range(shape[0])]
    assert np.allclose(ours.numpy(), ref, atol=1e-5)
    assert (ours < 0.9).all()


def test_ssim_known_values():
    x, g = _images(2, 3, 28, 28)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    # symmetric, and less similar with more noise
    y1 = x + 0.05 * torch.randn(x.shape, generator=g)
    y2 = x + 0.5 * torch.randn(x.shape, generator=g)
    assert torch.allclose(ssim(x, y1), ssim(y1, x), atol=1e-6)
    assert (ssim(x, y1) > ssim(x, y2)).all()
    # a constant image against its negation: mu term (2ab+C1)/(a^2+b^2+C1), variances zero -> C2/C2
    a = torch.full((1, 1, 16, 16), 0.5)
    c1 = (0.01 * 2) ** 2
    expect = (2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1)
    assert torch.allclose(ssim(a, -a), torch.tensor([expect]), atol=1e-6)


def test_ssim_small_images_and_errors():
    x, _ = _images(1, 1, 7, 9)
    assert torch.allclose(ssim(x, x), torch.ones(1))  # window shrinks to 7 taps
    assert torch.isfinite(ssim(x, -x)).all()
    with pytest.raises(ValueError, match="differ"):
        ssim(x, x[..., :8])
    with pytest.raises(ValueError, match="batch"):
        psnr(x[0], x[0])
