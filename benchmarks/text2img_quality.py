"""Does a conditional model draw what it is asked? Caption (or class) retrieval accuracy of generated images.

    .venv/bin/python benchmarks/text2img_quality.py weights/emoji.safetensors --k 20 --per 4
    .venv/bin/python benchmarks/text2img_quality.py weights/fashion-mnist.safetensors --per 20

K captions are drawn (seeded) from the model's training data (for a class-conditional model: its classes). A small
CNN is trained by this script on the real images of those K captions, with random shifts and noise as
augmentation, until it classifies them. The model then generates `per` images for each caption, and the table
reports how often the classifier recovers the intended caption, against chance (1/K) and against the same
classifier on images generated for a random other caption (what a model ignoring its condition would score).
Writes benchmarks/out/text2img_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402


def real_images(ldm: LatentDiffusion, k: int, max_per: int, seed: int):
    """(images (N, C, H, W), targets (N,), names [K]) for K captions or classes of the training data."""
    ds = build_dataset(replace(ldm.run.data, limit=0, holdout=0, crop="center", flip=False))
    g = torch.Generator().manual_seed(seed)
    if ldm.text_encoder is not None:
        caps = ds.captions or []
        names = sorted(set(c for c in caps if c))
        names = [names[i] for i in torch.randperm(len(names), generator=g)[:k].tolist()]
        key = [caps[i] for i in range(len(ds))]
    else:
        names = list(ldm.class_names)[:k]
        key = [None] * len(ds)  # labels are read from the items, which are cheap for in-memory sets
    images, targets, counts = [], [], {n: 0 for n in names}
    for i in torch.randperm(len(ds), generator=g).tolist():
        item = ds[i]
        name = key[i] if key[i] is not None else (ds.class_names[item["label"]] if item["label"] >= 0 else "")
        if name in counts and counts[name] < max_per:
            counts[name] += 1
            images.append(item["image"])
            targets.append(names.index(name))
        if all(c >= max_per for c in counts.values()):
            break
    return torch.stack(images), torch.tensor(targets), names


class SmallCNN(nn.Module):
    def __init__(self, channels: int, k: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, k),
        )

    def forward(self, x):
        return self.net(x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side (edge-padded) plus Gaussian noise of std 0.1."""
    b, _, h, w = x.shape
    p = max(1, h // 8)
    x = F.pad(x, (p, p, p, p), mode="replicate")
    dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
    x = x[:, :, dy : dy + h, dx : dx + w]
    return x + 0.1 * torch.randn(x.shape, generator=g)


def train_classifier(x: torch.Tensor, y: torch.Tensor, k: int, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = SmallCNN(x.shape[1], k)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(128, len(x) * 4),), generator=g)
        loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def generated(ldm: LatentDiffusion, names: list[str], per: int, args) -> torch.Tensor:
    """(K * per, C, H, W): per images for each caption / class in turn."""
    if ldm.text_encoder is not None:
        req = SampleRequest(
            n=len(names) * per,
            prompts=[n for n in names for _ in range(per)],
            sampler=args.sampler,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
        )
    else:
        labels = [ldm.class_names.index(n) for n in names for _ in range(per)]
        req = SampleRequest(
            n=len(labels), labels=labels, sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=args.seed
        )
    return generate(ldm, req)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--k", type=int, default=10, help="captions (or classes) to tell apart")
    ap.add_argument("--per", type=int, default=4, help="generated images per caption")
    ap.add_argument("--real-per", type=int, default=200, help="real images per caption for the classifier, at most")
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("text2img_quality"))
    args = ap.parse_args(argv)

    t0 = time.time()
    ldm = LatentDiffusion.load(args.checkpoint)
    x, y, names = real_images(ldm, args.k, args.real_per, args.seed)
    k = len(names)
    clf = train_classifier(x, y, k, args.classifier_steps, args.seed)
    with torch.no_grad():
        real_acc = float((clf(x).argmax(1) == y).float().mean())
        images = generated(ldm, names, args.per, args)
        pred = clf(images).argmax(1)
    target = torch.arange(k).repeat_interleave(args.per)
    shuffled = (target + torch.randint(1, k, target.shape, generator=torch.Generator().manual_seed(1))) % k
    rows = {
        "captions (K)": k,
        "generated per caption": args.per,
        "classifier accuracy on real images": real_acc,
        "retrieval accuracy": float((pred == target).float().mean()),
        "accuracy against a wrong caption": float((pred == shuffled).float().mean()),
        "chance": 1 / k,
    }
    w = max(len(r) for r in rows)
    print(f"{'measure':<{w}}  value")
    for r, v in rows.items():
        print(f"{r:<{w}}  {v:.3f}" if isinstance(v, float) else f"{r:<{w}}  {v}")
    result = {
        "checkpoint": args.checkpoint,
        **rows,
        "names": names,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "seconds": round(time.time() - t0, 1),
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
