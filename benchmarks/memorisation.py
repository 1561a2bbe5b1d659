"""Does the similarity screen catch training images among generations, and leave ordinary generations alone?

    .venv/bin/python benchmarks/memorisation.py --n 200

For each shipped generation model: its training-data index is built (or read from beside the weights), `n`
ordinary images are generated (emoji: its training captions as prompts; fashion-mnist: every class in turn; 20
steps), and `n` training images are injected under each transform: exact, cropped to 80% of each side at a random
position and resized back, mirrored, JPEG at quality 60, and colour-jittered (brightness, contrast and saturation
+-10%). The table gives the share of injected images at or above the threshold whose match is their source or a
training twin of it (the detection rate; target at least 99%), in brackets the share whose match is the source
itself, the share of ordinary generations at or above it (the false-positive rate; target at most 1%), and the
milliseconds per query. A twin is another training image that the screen cannot tell from the source: compared
with the source by the screen itself, it scores at or above the threshold (emoji holds mirror-image pairs, such as
"man running" and "man running facing right", and gray-identical ones, such as skin tones and coloured squares).
Writes benchmarks/out/memorisation.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.images import to_pil  # noqa: E402
from ldmkit.governance.similarity import DEFAULT_THRESHOLD, SimilarityIndex, build_index, index_path_for  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.shipped import resolve_model  # noqa: E402


def rgb(x: torch.Tensor) -> np.ndarray:
    return np.asarray(to_pil(x).convert("RGB"))


def transforms(rng: np.random.Generator) -> dict:
    def crop(a):
        h, w = a.shape[:2]
        ch, cw = round(0.8 * h), round(0.8 * w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return np.asarray(Image.fromarray(a[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC))

    def jpeg(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=60)
        return np.asarray(Image.open(buf).convert("RGB"))

    def jitter(a):
        img = Image.fromarray(a)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(1 + rng.uniform(-0.1, 0.1))
        return np.asarray(img)

    return {"exact": lambda a: a, "crop80": crop, "flip": lambda a: a[:, ::-1].copy(), "jpeg60": jpeg, "jitter": jitter}


def twins(ds, entry: int, source: np.ndarray) -> bool:
    """Whether training image `entry` is a twin of `source`: the screen, given an index of `entry` alone, flags
    `source` as its copy."""
    alone = SimilarityIndex().build([rgb(ds[entry]["image"])], ["entry"], progress=False)
    return alone.query([source])[0].similarity >= DEFAULT_THRESHOLD


def generations(ldm: LatentDiffusion, ds, n: int) -> list[np.ndarray]:
    out = []
    for start in range(0, n, 50):
        k = min(50, n - start)
        if ldm.text_encoder is not None:
            caps = [ds.captions[(start + i) * 7 % len(ds)] or "emoji" for i in range(k)]
            req = SampleRequest(n=k, prompts=caps, steps=20, cfg=3.0, seed=start)
        else:
            req = SampleRequest(n=k, labels=[(start + i) % 10 for i in range(k)], steps=20, cfg=3.0, seed=start)
        out += [rgb(x) for x in generate(ldm, req)[0]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="ordinary generations and injected images per transform")
    ap.add_argument("--models", nargs="*", default=["emoji", "fashion-mnist"])
    ap.add_argument("--out", default=default_out("memorisation"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        model = resolve_model(name)
        path = index_path_for(model)  # a shipped index beside the weights, else one built here
        path = path if path.is_file() else Path(args.out).parent / path.name
        t = time.perf_counter()
        index = SimilarityIndex.load(path) if path.is_file() else build_index(name, path)
        build_s = time.perf_counter() - t
        ldm = LatentDiffusion.load(model, "cpu")
        ds = build_dataset(replace(ldm.run.data, limit=0, holdout=0, crop="center", flip=False))
        ordinary = generations(ldm, ds, args.n)
        t = time.perf_counter()
        scores = np.array([m.similarity for m in index.query(ordinary)])
        query_ms = 1000 * (time.perf_counter() - t) / len(ordinary)
        row = {
            "model": name,
            "index_entries": len(index),
            "index_mb": path.stat().st_size / 2**20,
            "index_s": build_s,
            "threshold": DEFAULT_THRESHOLD,
            "false_positive_rate": float((scores >= DEFAULT_THRESHOLD).mean()),
            "ordinary_max": float(scores.max()),
            "query_ms": query_ms,
        }
        picks = rng.choice(len(ds), size=args.n, replace=False)
        originals = [rgb(ds[int(i)]["image"]) for i in picks]
        for tname, f in transforms(rng).items():
            matches = index.query([f(a) for a in originals])
            flagged = [m.similarity >= DEFAULT_THRESHOLD for m in matches]
            named = [ok and m.index == int(i) for ok, m, i in zip(flagged, matches, picks)]
            twin = [
                ok and not same and twins(ds, m.index, a) for ok, same, m, a in zip(flagged, named, matches, originals)
            ]
            row[f"detected_{tname}"] = float(np.mean(np.logical_or(named, twin)))
            row[f"named_{tname}"] = float(np.mean(named))
        rows.append(row)
    names = list(transforms(rng))
    print("| model | entries | index MB | " + " | ".join(names) + " | false positives | query ms |")
    print("| --- " * (5 + len(names)) + "|")
    for r in rows:
        print(
            f"| {r['model']} | {r['index_entries']} | {r['index_mb']:.1f} | "
            + " | ".join(f"{100 * r[f'detected_{t}']:.1f}% ({100 * r[f'named_{t}']:.0f}%)" for t in names)
            + f" | {100 * r['false_positive_rate']:.1f}% (max {r['ordinary_max']:.3f}) | {r['query_ms']:.0f} |"
        )
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
