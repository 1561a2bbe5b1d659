"""Train, evaluate and package a shipped model from its recipe: weights/NAME.safetensors, NAME.md, NAME.png.

    .venv/bin/python recipes/build.py fashion-mnist                 # the full recipe (a GPU is advised)
    .venv/bin/python recipes/build.py emoji --set train.steps=2000  # any setting, recorded in the model card
    .venv/bin/python recipes/build.py fashion-mnist --eval-n 2000   # fewer images for FID / KID

Stages are resumable: rerunning continues a killed run in runs/recipes/NAME/ (both stages use `--resume`).
Overrides given with --ae-set apply to the autoencoder and --set to the denoiser.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldmkit.config import AutoencoderRun, DenoiserRun, load_run, to_dict  # noqa: E402
from ldmkit.evaluation.evaluate import evaluate  # noqa: E402
from ldmkit.pipelines.generate import SampleRequest, generate_to_file  # noqa: E402
from ldmkit.runtime import resolve_device  # noqa: E402
from ldmkit.shipped import SHIPPED, export_half, weights_dir  # noqa: E402
from ldmkit.training.runs import train_autoencoder, train_denoiser  # noqa: E402

GRID_PROMPTS = ["red apple", "grinning face", "blue heart", "rocket", "pizza", "cat face", "sun", "christmas tree"]


def device_name(device: str) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_stages(name: str, args) -> tuple[dict, dict, dict]:
    out = ROOT / "runs" / "recipes" / name
    recipe = ROOT / "recipes" / name
    dev = [f"train.device={args.device}"]
    ae_run = load_run(AutoencoderRun, str(recipe / "autoencoder.toml"), dev + args.ae_set)
    times = {}
    t = time.time()
    resume = (out / "ae" / "train-state.safetensors").exists()
    ae = train_autoencoder(ae_run, out / "ae", resume=resume)
    times["autoencoder_s"] = round(time.time() - t, 1)
    dn_run = load_run(DenoiserRun, str(recipe / "denoiser.toml"), dev + [f"autoencoder={ae['checkpoint']}"] + args.set)
    t = time.time()
    resume = (out / "ldm" / "train-state.safetensors").exists()
    dn = train_denoiser(dn_run, out / "ldm", resume=resume)
    times["denoiser_s"] = round(time.time() - t, 1)
    return (
        ae,
        dn,
        {"autoencoder": to_dict(ae_run), "denoiser": to_dict(dn_run), **times, "command": command(name, args)},
    )


def command(name: str, args) -> str:
    """The build command line that reproduces this model, overrides included."""
    parts = (
        ["python recipes/build.py", name] + [f"--ae-set {s}" for s in args.ae_set] + [f"--set {s}" for s in args.set]
    )
    return " ".join(parts + ([f"--eval-n {args.eval_n}"] if args.eval_n != 10000 else []))


def model_card(name: str, recipe: dict, ae: dict, dn: dict, ev: dict, ae_ev: dict, size_mb: float, dev: str) -> str:
    a, d = recipe["autoencoder"], recipe["denoiser"]
    rows = [
        ("FID", ev["fid"]),
        ("KID", ev["kid"]),
        ("rFID (autoencoder)", ae_ev["rfid"]),
        ("PSNR (autoencoder, dB)", ae_ev["psnr"]),
        ("SSIM (autoencoder)", ae_ev["ssim"]),
    ]
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in rows)
    params = f"{dn.get('parameters', 0) / 1e6:.2f} M"
    return f"""# {name}

{SHIPPED[name]}.

![samples]({name}.png)

## Use

```sh
.venv/bin/ldmkit generate {'"red apple"' if name == "emoji" else "--model fashion-mnist --label 7"}
```

## Data

`{d["data"]["dataset"]}`, {d["data"]["resolution"]}x{d["data"]["resolution"]}, {d["data"]["channels"]} channel(s);
the autoencoder held out its last {a["data"]["holdout"]} images for the reconstruction metrics.

## Recipe

`recipes/{name}/autoencoder.toml` and `recipes/{name}/denoiser.toml`, built on {dev} with

```sh
{recipe["command"]}
```

| stage | steps | batch | parameters | training time |
| --- | --- | --- | --- | --- |
| autoencoder | {a["train"]["steps"]} | {a["train"]["batch_size"]} | | {recipe["autoencoder_s"] / 60:.1f} min |
| denoiser | {d["train"]["steps"]} | {d["train"]["batch_size"]} | {params} | {recipe["denoiser_s"] / 60:.1f} min |

Diffusion: {d["diffusion"]["parameterisation"]}-prediction, {d["diffusion"]["schedule"]} schedule,
min-SNR gamma {d["diffusion"]["min_snr_gamma"]}. Text encoder: {d.get("text_encoder") or "none"}.
Weights: half precision, {size_mb:.1f} MB.

## Quality

Measured with `ldmkit evaluate` against the {ev["split"]} split, {ev["n"]} images, {ev["sampler"]} sampler,
{ev["steps"]} steps, guidance {ev["cfg"]} (TF-Inception features):

| metric | value |
| --- | --- |
{table}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(SHIPPED))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="denoiser override KEY=VALUE (repeatable)")
    ap.add_argument("--ae-set", action="append", default=[], help="autoencoder override KEY=VALUE (repeatable)")
    ap.add_argument("--eval-n", type=int, default=10000, help="images for FID / KID (default 10000)")
    ap.add_argument("--eval-split", default="test")
    args = ap.parse_args(argv)
    name = args.name
    ae, dn, recipe = train_stages(name, args)
    dst = export_half(dn["checkpoint"], weights_dir() / f"{name}.safetensors")
    split = args.eval_split if name == "fashion-mnist" else "train"  # the emoji set has no test split
    ev = evaluate(dst, split=split, n=args.eval_n, device=args.device)
    ae_ev = evaluate(ae["checkpoint"], split=split, n=min(args.eval_n, 1000), device=args.device)
    req = SampleRequest(n=16, prompts=GRID_PROMPTS * 2 if name == "emoji" else None, device=args.device)
    generate_to_file(dst, req, weights_dir() / f"{name}.png")
    card = model_card(name, recipe, ae, dn, ev, ae_ev, dst.stat().st_size / 2**20, device_name(args.device))
    (weights_dir() / f"{name}.md").write_text(card)
    record = json.dumps({"recipe": recipe, "eval": ev, "autoencoder_eval": ae_ev}, indent=2)
    (weights_dir() / f"{name}.json").write_text(record.replace(f"{ROOT}/", ""))  # paths relative to the repository
    print(f"wrote {dst}, {name}.md, {name}.png and {name}.json in {weights_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
