"""Full-reference reconstruction metrics: PSNR and SSIM, one value per image.

Images are float tensors in [-1, 1] shaped (B, C, H, W) with any number of channels, so `data_range` defaults to 2.
SSIM follows Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from error visibility to structural
similarity" (IEEE TIP 2004): an 11-tap Gaussian window of standard deviation 1.5, K1 = 0.01, K2 = 0.03, local
statistics over the valid part of the image only (no padding), averaged per channel and then over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.common import stack_images
from ..errors import InputError


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise InputError(
            f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)} differ; pass two image batches of "
            f"the same (B, C, H, W) shape"
        )
    if x.ndim != 4:
        raise InputError(
            f"{name}: expected (B, C, H, W) image batches, got {x.ndim} dimensions; add a batch "
            f"dimension with x.unsqueeze(0) for a single image"
        )


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(L^2 / MSE) per image, in dB; +inf where the images are identical."""
    _check_pair(x, y, "psnr")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # (B,); division by 0 gives +inf


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    """The normalised 1-D Gaussian g[i] ~ exp(-(i - (size-1)/2)^2 / (2 sigma^2)) of length `size`."""
    i = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2.0 * sigma**2))
    return g / g.sum()  # (size,)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid convolution of every channel of x (B, C, H, W) with the window g (k,): (B, C, H-k+1, W-k+1)."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # (B, C, H-k+1, W)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # (B, C, H-k+1, W-k+1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image: mean over channels and valid positions of

    ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (k1 L)^2, C2 = (k2 L)^2, with Gaussian-weighted local means and (co)variances.

    x, y: (B, C, H, W); data_range: L, the span of pixel values (2 for [-1, 1]); window: Gaussian taps, shrunk to
    the largest odd size that fits when an image side is smaller; sigma: the window's standard deviation.
    Returns (B,) values in [-1, 1]; identical images give exactly 1.
    """
    _check_pair(x, y, "ssim")
    side = min(x.shape[-2:])
    k = min(window, side if side % 2 else side - 1)
    if k < 1:
        raise InputError(f"ssim: image of size {tuple(x.shape[-2:])} is too small; SSIM needs at least 1x1 pixels")
    x, y = x.float(), y.float()
    g = gaussian_window(k, sigma, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    # local statistics, each (B, C, h, w)
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x**2
    var_y = _blur(y * y, g) - mu_y**2
    cov_xy = _blur(x * y, g) - mu_x * mu_y

    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=(2, 3)).mean(dim=1)  # (B,)


@torch.no_grad()
def reconstruction_metrics(model: nn.Module, dataset, device, batch: int = 64, progress: bool = True) -> dict:
    """PSNR and SSIM (mean over images) of deterministic reconstructions of `dataset`."""
    model.eval()
    ps, ss = [], []
    for i in tqdm(range(0, len(dataset), batch), desc="reconstruction metrics", disable=not progress, leave=False):
        x = stack_images(dataset, range(i, min(i + batch, len(dataset)))).to(device)
        r = model(x, sample=False)[0].float().clamp(-1, 1)
        ps.append(psnr(r, x).cpu())
        ss.append(ssim(r, x).cpu())
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), "n": len(dataset)}
