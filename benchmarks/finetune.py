"""Fine-tuning methods on a concept the base model never saw: full fine-tune, LoRA, DreamBooth, textual inversion.

    .venv/bin/python benchmarks/finetune.py                                  # the emoji model, its held-out emoji
    .venv/bin/python benchmarks/finetune.py --new 4 --steps 2 --samples 2 --methods base,lora8,ti   # a quick run

The shipped emoji model was trained on the first 3,589 emoji (data.limit=3589); the next `--new` emoji, captioned as
they are, are the new concept. Every method starts from the shipped model and trains `--steps` steps of
`--batch-size` images on them, on the same CPU:
- base: no training; full: every backbone weight; lora4 / lora8 / lora16: LoRA of that rank on attention and
  feed-forward layers; locon8: rank 8 on every linear layer and convolution (--lora-targets all+conv);
  dreambooth: the whole backbone on the new emoji under one instance prompt, with the base model's images of the
  class prompt as prior; ti: textual inversion of one new word (2 vectors).
For each, `--samples` images per new caption are drawn (the instance prompt for DreamBooth, the caption with the new
word for textual inversion) and compared with the real new emoji, and as many per old caption (the first `--new`
training emoji) to measure forgetting:
- FID (Inception features; with a few images it ranks methods, it is no absolute number);
- caption retrieval: the share of new-concept images whose nearest real new emoji (Inception features) is their own;
- the size of the file the method writes, and seconds per training step (median over the logged steps).
Writes benchmarks/out/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.config import (  # noqa: E402
    DataConfig,
    DenoiserRun,
    DreamBoothConfig,
    LoRAConfig,
    TextualInversionConfig,
    TrainConfig,
)
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.images import to_pil  # noqa: E402
from ldmkit.errors import InputError  # noqa: E402
from ldmkit.evaluation.fid import FeatureStats, InceptionFeatures, frechet_distance  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.batching import generate_together  # noqa: E402
from ldmkit.pipelines.lora import LoRASpec, apply_embeddings  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.shipped import resolve_model  # noqa: E402
from ldmkit.training.runs import train_denoiser  # noqa: E402

TRAINED = 3589  # the emoji the shipped model was trained on (its data.limit)
METHODS = ("base", "full", "lora4", "lora8", "lora16", "locon8", "dreambooth", "ti")
TOKEN, INSTANCE, CLASS = "<new-emoji>", "a new emoji", "an emoji"


def write_folder(items: list[dict], folder: Path) -> list[str]:
    """The items as PNGs with a metadata.jsonl of their captions; the captions."""
    folder.mkdir(parents=True)
    rows = []
    for i, item in enumerate(items):
        to_pil(item["image"]).save(folder / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": item["caption"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["text"] for r in rows]


def method_lr(method: str, args) -> float:
    """The learning rate a method trains at: --lora-lr for the low-rank methods where given, else --lr."""
    return args.lora_lr if method.startswith(("lora", "locon")) and args.lora_lr else args.lr


def train(method: str, model: Path, folder: Path, out: Path, args, class_data: Path) -> tuple[Path | None, float]:
    """(the file the method wrote, seconds per step); (None, 0) for the base model."""
    if method == "base":
        return None, 0.0
    t = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=method_lr(method, args), log_every=1, ckpt_every=args.steps
    )
    run = DenoiserRun(init=str(model), data=DataConfig(dataset=str(folder), holdout=0), train=t)
    if method.startswith("lora"):
        run = replace(run, lora=LoRAConfig(rank=int(method[4:]), targets="attn+ff"))
    elif method.startswith("locon"):
        run = replace(run, lora=LoRAConfig(rank=int(method[5:]), targets="all+conv"))
    elif method == "dreambooth":
        db = DreamBoothConfig(instance_prompt=INSTANCE, class_prompt=CLASS, class_data=str(class_data))
        run = replace(run, dreambooth=db)
    elif method == "ti":
        run = replace(run, textual_inversion=TextualInversionConfig(token=TOKEN, vectors=2))
    result = train_denoiser(run, out, progress=False, overwrite=True)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_step = [args.batch_size / r["images_per_s"] for r in logged[1:] or logged if r.get("images_per_s")]
    return Path(result["checkpoint"]), statistics.median(per_step) if per_step else float("nan")


def draw(model: Path, method: str, written: Path | None, prompts: list[str], args) -> torch.Tensor:
    """`--samples` images per prompt from the method's model, (N, C, H, W) in [-1, 1]."""
    ldm = LatentDiffusion.load(written if method in ("full", "dreambooth") else model)
    loras = (LoRASpec(str(written)),) if method.startswith(("lora", "locon")) else ()
    if method == "ti":
        apply_embeddings(ldm, [(str(written), None)])
    reqs = [
        SampleRequest(n=args.samples, prompts=[p], steps=args.sample_steps, seed=1000 * i, loras=loras)
        for i, p in enumerate(prompts)
    ]
    return torch.cat(generate_together(ldm, reqs, batch_size=16))


def features(images: torch.Tensor, extract: InceptionFeatures) -> np.ndarray:
    return extract(images.repeat(1, 3 // images.shape[1], 1, 1) if images.shape[1] == 1 else images)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    return round(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=100, help="held-out emoji that make the new concept")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=500, help="training steps of every method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-lr", type=float, help="learning rate of the LoRA and LoCon methods (default: --lr)")
    ap.add_argument("--samples", type=int, default=4, help="images drawn per caption")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--out", default=default_out("finetune"))
    args = ap.parse_args()
    model = resolve_model("emoji")
    base = LatentDiffusion.load(model)
    data = build_dataset(replace(base.run.data, limit=0, holdout=0))
    new_items = [data[i] for i in range(TRAINED, min(len(data), TRAINED + args.new))]
    old_items = [data[i] for i in range(args.new)]
    extract = InceptionFeatures()
    real_new = features(torch.stack([x["image"] for x in new_items]), extract)
    real_old = features(torch.stack([x["image"] for x in old_items]), extract)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = write_folder(new_items, tmp / "new")
        old_captions = [x["caption"] for x in old_items]
        class_data = tmp / "class"
        if "dreambooth" in args.methods:
            from ldmkit.pipelines.dreambooth import class_images

            class_data = class_images(model, CLASS, max(2, args.new), args.sample_steps, root=tmp / "cache")
        for method in args.methods.split(","):
            try:
                written, per_step = train(method, model, tmp / "new", tmp / method, args, class_data)
            except InputError as e:  # a method this model cannot take (textual inversion on a frozen MiniLM)
                rows.append({"method": method, "refused": str(e)})
                print(json.dumps(rows[-1]), flush=True)
                write_json(args.out, result(args, rows))
                continue
            prompts = {"dreambooth": [INSTANCE] * len(captions), "ti": [f"{TOKEN}, {c}" for c in captions]}
            gen_new = features(draw(model, method, written, prompts.get(method, captions), args), extract)
            gen_old = features(draw(model, method, written, old_captions, args), extract)
            nearest = ((gen_new[:, None] - real_new[None]) ** 2).sum(-1).argmin(1)
            own = np.repeat(np.arange(len(captions)), args.samples)
            rows.append(
                {
                    "method": method,
                    "lr": method_lr(method, args) if method != "base" else None,
                    "fid_new": fid(gen_new, real_new),
                    "retrieval_new": round(float((nearest == own).mean()), 3),
                    "fid_old": fid(gen_old, real_old),
                    "file_bytes": written.stat().st_size if written else 0,
                    "s_per_step": round(per_step, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            write_json(args.out, result(args, rows))  # each row as it comes: a crash later loses none
    print(f"\n{'method':>11} {'FID new':>8} {'retr.':>6} {'FID old':>8} {'file MB':>8} {'s/step':>7}")
    for r in rows:
        if "refused" in r:
            print(f"{r['method']:>11} refused: {r['refused']}")
            continue
        mb = r["file_bytes"] / 2**20
        cells = (
            f"{r['fid_new']:>8.1f} {r['retrieval_new']:>6.2f} {r['fid_old']:>8.1f} {mb:>8.2f} {r['s_per_step']:>7.3f}"
        )
        print(f"{r['method']:>11} {cells}")
    write_json(args.out, result(args, rows))


def result(args, rows: list[dict]) -> dict:
    return {
        "machine": f"{os.cpu_count()} CPUs",
        "settings": vars(args),
        "rows": rows,
        "targets": {
            "lora8_fid_gain_of_full": 0.9,
            "lora8_file_of_full": 0.05,
            "lora8_forgets_less_than_full": True,
            "lora_step_of_full": 0.7,
        },
    }


if __name__ == "__main__":
    main()
