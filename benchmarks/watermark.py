"""Does the invisible watermark survive what happens to images after they leave the server, and what does it cost?

    .venv/bin/python benchmarks/watermark.py --n 200

Real pictures (Fashion-MNIST test images and emoji of the built-in data set, resized to each side) are marked with
a random 48-bit tag each (`ldmkit.governance.watermark`), then re-saved as PNG, compressed as JPEG at quality 75,
halved in size (bilinear), cropped to 90% of each side (round(0.9 * side) pixels kept, at a random offset on each
axis: crop10), or cropped so and resized back to the original side (bicubic: crop10r). The table gives the share of
tags recovered exactly (the CRC must match: a wrong tag is never reported), the bit accuracy of the decoded payload,
the PSNR of marking, the milliseconds to mark and to read an unmarked image (every hypothesis tried), and how many
unmarked images, whole or cropped like crop10, were falsely read as marked. Writes benchmarks/out/watermark.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import DataConfig  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.fashion_mnist import load_arrays  # noqa: E402
from ldmkit.data.images import to_pil  # noqa: E402
from ldmkit.governance import watermark as wm  # noqa: E402


def pictures(n: int) -> list[Image.Image]:
    """n/2 Fashion-MNIST test images and n/2 emoji, as RGB pictures."""
    fashion, _ = load_arrays("test")
    emoji = build_dataset(DataConfig(dataset="emoji", resolution=64, limit=n // 2, holdout=0))
    out = [Image.fromarray(a).convert("RGB") for a in fashion[: n - n // 2]]
    return out + [to_pil(emoji[i]["image"]).convert("RGB") for i in range(min(n // 2, len(emoji)))]


def jpeg(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf).convert("RGB"))


def png(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return np.asarray(Image.open(buf))


def half(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(a).resize((w // 2, h // 2), Image.Resampling.BILINEAR))


def crop(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape[:2]
    ch, cw = round(0.9 * h), round(0.9 * w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return a[y : y + ch, x : x + cw]


def crop_back(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(crop(a, rng)).resize((w, h), Image.Resampling.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="images per side (default 200)")
    ap.add_argument("--sides", type=int, nargs="*", default=[32, 64, 256, 512])
    ap.add_argument("--out", default=default_out("watermark"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pics = pictures(args.n)
    attacks = {
        "none": lambda a: a,
        "png": png,
        "jpeg75": jpeg,
        "half": half,
        "crop10": lambda a: crop(a, rng),
        "crop10r": lambda a: crop_back(a, rng),
    }
    rows = []
    for side in args.sides:
        found = {k: 0 for k in attacks}
        bits = {k: [] for k in attacks}
        tried = {k: 0 for k in attacks}
        psnr, t_embed, t_read, false = [], 0.0, 0.0, 0
        for pic in pics:
            a = np.asarray(pic.resize((side, side), Image.Resampling.BICUBIC))
            tag = rng.bytes(6)
            t = time.perf_counter()
            marked = wm.embed(a, tag)
            t_embed += time.perf_counter() - t
            psnr.append(10 * np.log10(255**2 / max(np.mean((marked.astype(float) - a) ** 2), 1e-12)))
            t = time.perf_counter()
            false += wm.read(a).tag is not None
            t_read += time.perf_counter() - t
            cropped = crop(a, rng)
            false += min(cropped.shape[:2]) >= wm.MIN_SIDE and wm.read(cropped).tag is not None
            for name, attack in attacks.items():
                b = attack(marked)
                if min(b.shape[:2]) < wm.MIN_SIDE:
                    continue
                reading = wm.read(b)
                tried[name] += 1
                found[name] += reading.tag == tag
                bits[name].append(float(np.mean(reading.bits == wm.payload_bits(tag))))
        row = {
            "side": side,
            "images": len(pics),
            "psnr_db_median": float(np.median(psnr)),
            "embed_ms": 1000 * t_embed / len(pics),
            "read_ms": 1000 * t_read / len(pics),
            "false_detections": false,
            "unmarked_reads": 2 * len(pics),
        }
        for name in attacks:
            row[f"{name}_recovered"] = found[name] / tried[name] if tried[name] else None
            row[f"{name}_bit_accuracy"] = float(np.mean(bits[name])) if bits[name] else None
        rows.append(row)
    print("| side | PSNR dB | embed ms | read ms | " + " | ".join(f"{k} tags (bits)" for k in attacks) + " | false |")
    print("| --- " * (5 + len(attacks)) + "|")
    for r in rows:
        cells = []
        for k in attacks:
            rec, acc = r[f"{k}_recovered"], r[f"{k}_bit_accuracy"]
            cells.append("n/a (too small)" if rec is None else f"{100 * rec:.0f}% ({100 * acc:.1f}%)")
        print(
            f"| {r['side']} | {r['psnr_db_median']:.1f} | {r['embed_ms']:.1f} | {r['read_ms']:.1f} | "
            + " | ".join(cells)
            + f" | {r['false_detections']}/{r['unmarked_reads']} |"
        )
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
