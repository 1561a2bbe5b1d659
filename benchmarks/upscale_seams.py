"""Do upscale tiles show at their borders? Seam visibility of `ldmkit upscale` at several tile sizes.

    .venv/bin/python benchmarks/upscale_seams.py --n 50

The shipped 4x upscaler (weights/emoji-upscale.safetensors, trained at 16x16 -> 64x64) enlarges `n` 32x32 emoji
(the built-in data set at 32x32) to 128x128 at each --tile (input pixels; 8 is the least allowed, 16 the former
default, 32 the default: one tile for a 32x32 input) with --steps sampler steps, image i seeded i. Seam visibility
is the mean absolute luminance step between neighbouring output pixels across the tile borders (every row and
column of the output where a tile window starts or ends inside the image) divided by the same mean everywhere
else: 1.0 means the borders are as smooth as the rest, above 1 they show as lines. The table gives that ratio
(mean over images, and the share of images above 1.2). Writes benchmarks/out/upscale_seams.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import DataConfig  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.upscale import UpscaleOptions, tiling_for, upscale  # noqa: E402


def borders(tiling, side: int, scale: int) -> list[int]:
    """Output positions k (a step between pixels k - 1 and k) where a tile window starts or ends inside the image,
    on an axis of `side` latent pixels, scale output pixels per latent pixel."""
    edges = {s for s in tiling.starts(side) if s > 0} | {s + tiling.tile for s in tiling.starts(side)}
    return sorted(e * scale for e in edges if 0 < e < side)


def seam_ratio(img: np.ndarray, rows: list[int], cols: list[int]) -> float:
    """Mean |step| across the border rows and columns over the mean |step| elsewhere, img (H, W) in [0, 255]."""
    dy, dx = np.abs(np.diff(img, axis=0)), np.abs(np.diff(img, axis=1))  # steps into row k + 1 / column k + 1
    on_y, on_x = np.zeros(dy.shape[0], bool), np.zeros(dx.shape[1], bool)
    on_y[[r - 1 for r in rows]], on_x[[c - 1 for c in cols]] = True, True
    seam = np.concatenate([dy[on_y].ravel(), dx[:, on_x].ravel()])
    rest = np.concatenate([dy[~on_y].ravel(), dx[:, ~on_x].ravel()])
    return float(seam.mean() / max(rest.mean(), 1e-9)) if seam.size else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiles", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--checkpoint", default=str(ROOT / "weights" / "emoji-upscale.safetensors"))
    ap.add_argument("--out", default=default_out("upscale_seams"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ldm = LatentDiffusion.load(args.checkpoint, "cpu")
    data = build_dataset(DataConfig(dataset="emoji", resolution=32, limit=args.n, holdout=0))
    rows = []
    for tile in args.tiles:
        opts = UpscaleOptions(tile=tile)
        tiling = tiling_for(ldm, opts)
        scale = ldm.factor
        ratios, t0 = [], time.perf_counter()
        for i in range(args.n):
            x = data[i]["image"][None]  # (1, C, 32, 32)
            y, _ = upscale(ldm, x, SampleRequest(n=1, steps=args.steps, seed=i), opts)  # (1, C, 128, 128)
            lum = ((y[0].clamp(-1, 1) + 1) * 127.5).round()  # (C, H, W)
            lum = (lum * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0) if lum.shape[0] == 3 else lum[0]
            lines = borders(tiling, y.shape[-1] // scale, scale)
            ratios.append(seam_ratio(lum.numpy(), lines, lines))
        rows.append(
            {
                "tile": tile,
                "tiles_per_image": len(tiling.windows(*(2 * [y.shape[-1] // scale]))),
                "seam_ratio": round(float(np.mean(ratios)), 3),
                "share_above_1.2": round(float(np.mean(np.array(ratios) > 1.2)), 3),
                "s_per_image": round((time.perf_counter() - t0) / args.n, 2),
            }
        )
        print(rows[-1], flush=True)
    print(f"\n{'tile':>5} {'tiles':>6} {'seam ratio':>11} {'> 1.2':>7} {'s/image':>8}")
    for r in rows:
        print(
            f"{r['tile']:>5} {r['tiles_per_image']:>6} {r['seam_ratio']:>11.3f} {r['share_above_1.2']:>7.0%} "
            f"{r['s_per_image']:>8.2f}"
        )
    write_json(args.out, {"n": args.n, "steps": args.steps, "rows": rows}, quiet=True)


if __name__ == "__main__":
    main()
