"""Train, evaluate and package a shipped model from its recipe: weights/NAME.safetensors, NAME.md, NAME.png.

    .venv/bin/python recipes/build.py fashion-mnist                 # the full recipe (a GPU is advised)
    .venv/bin/python recipes/build.py emoji --set train.steps=2000  # any setting, recorded in the model card
    .venv/bin/python recipes/build.py fashion-mnist --eval-n 2000   # fewer images for FID / KID
    .venv/bin/python recipes/build.py emoji-upscale                 # an editing model on a shipped autoencoder
    .venv/bin/python recipes/build.py fashion-mnist-lcm --eval-n 2000  # a few-step LCM-LoRA of a shipped model
    .venv/bin/python recipes/build.py fashion-mnist-mask --eval-n 200  # a ControlNet of a shipped model

Stages are resumable: rerunning continues a killed run in runs/recipes/NAME/ (both stages use `--resume`).
Overrides given with --ae-set apply to the autoencoder and --set to the denoiser. `--ae-from MODEL` skips the
autoencoder stage and trains the denoiser on the autoencoder inside MODEL (a shipped model or any model file), so
a retrained denoiser keeps the latent space the editing models and earlier figures share; the card says so.

A style LoRA (a recipe with only a lora.toml) trains a LoRA of the shipped model its `init` names on that model's
training images made over in the style (emoji-pixel: pixel art), ships the LoRA alone in half precision, and is
measured by how near its images come to the style, beside the base model's on the same prompts and seeds.

A distilled model (a recipe with only a distill.toml) trains an LCM-LoRA of the shipped model its `init` names and
ships the LoRA alone, in half precision: it names its base, and loads as the base with the LoRA merged. Its card
gives FID at its own steps and at half of them beside the teacher's card figures.

A ControlNet (a recipe with only a control.toml) trains a ControlNet of the shipped model its `init` names, ships
it in half precision (a low-rank one holds only what differs from its base), and is measured by
benchmarks/control.py's condition fidelity on held-out images, with and without it; its grid shows held-out
conditions, the base model's images of the same labels and seeds, and the controlled ones.

An editing model (a recipe with `task = "inpaint"` or `"upscale"` and only a denoiser.toml) trains its denoiser
on the autoencoder of the shipped model its recipe names (paths are relative to the repository root), and is
measured by its section of benchmarks/editing_quality.py instead of generation FID; its grid shows held-out
images before and after the edit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import control as control_bench  # noqa: E402
import editing_quality  # noqa: E402
from common import cpu_name  # noqa: E402
from editing_quality import box_mask, stroke_mask  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit.autoencoder.files import KIND as AE_KIND  # noqa: E402
from ldmkit.autoencoder.files import load_autoencoder  # noqa: E402
from ldmkit.config import AutoencoderRun, DataConfig, DenoiserRun, from_dict, load_run, to_dict  # noqa: E402
from ldmkit.data import build_dataset  # noqa: E402
from ldmkit.data.conditions import detect  # noqa: E402
from ldmkit.data.images import save_grid, to_pil  # noqa: E402
from ldmkit.denoisers.controlnet import Control, load_controlnet  # noqa: E402
from ldmkit.diffusion.lowres import downscale  # noqa: E402
from ldmkit.evaluation.evaluate import evaluate  # noqa: E402
from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.pipelines.control import condition_settings, controlled  # noqa: E402
from ldmkit.pipelines.generate import generate, generate_to_file  # noqa: E402
from ldmkit.pipelines.inpaint import inpaint  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.pipelines.upscale import upscale  # noqa: E402
from ldmkit.runtime import resolve_device  # noqa: E402
from ldmkit.shipped import CONTROLNETS, SHIPPED, export_half, load_model, weights_dir  # noqa: E402
from ldmkit.training.runs import train_autoencoder, train_denoiser  # noqa: E402

TARGET_WORDS = {  # a LoRA's --lora-targets, as its card says them
    "attn": "the attention projections",
    "attn+ff": "the attention projections and feed-forward layers",
    "all": "every linear layer and 1x1 convolution",
    "all+conv": "every linear layer and convolution (LoCon: a 3x3 down convolution and a 1x1 up on the 3x3 ones)",
}
GRID_PROMPTS = ["red apple", "grinning face", "blue heart", "rocket", "pizza", "cat face", "sun", "christmas tree"]


def device_name(device: str) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"CPU ({cpu_name()}, {n} thread{'s' if n != 1 else ''})"


def train_edit_stage(name: str, args) -> tuple[dict, dict]:
    """The denoiser of an editing model on the shipped autoencoder its recipe names: (training result, record)."""
    out = ROOT / "runs" / "recipes" / name
    dn_run = load_run(
        DenoiserRun, str(ROOT / "recipes" / name / "denoiser.toml"), [f"train.device={args.device}"] + args.set
    )
    resume = (out / "ldm" / "train-state.safetensors").exists()
    dn = train_denoiser(dn_run, out / "ldm", resume=resume)
    return dn, {
        "denoiser": to_dict(dn_run),
        "denoiser_s": training_seconds(out / "ldm"),
        "command": command(name, args),
    }


def training_seconds(run_dir: Path) -> float:
    """The training time of a run, over all its sessions: the log's images / (images per second) summed."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    cfg = json.loads((run_dir / "config.json").read_text())["train"]
    total, last = 0.0, 0
    for r in recs:
        total += (r["step"] - last) * cfg["batch_size"] / max(r["images_per_s"], 1e-9)
        last = r["step"]
    return round(total, 1)


def held_out_edits(name: str, dst: Path) -> tuple[torch.Tensor, list[str], int]:
    """A grid of held-out images before and after the edit: (panels (n * k, C, H, W), captions, k per row): for an
    inpainting model the input with its mask in white, the result and the original; for an upscaler the input
    (enlarged by pixel repetition), bicubic interpolation, the result and the original."""
    ldm = LatentDiffusion.load(dst)
    if ldm.task == "inpaint":  # Fashion-MNIST test images, centre box and strokes alternating, own label
        data = build_dataset(replace(ldm.run.data, split="test", limit=0, holdout=0, crop="center", flip=False))
        g = torch.Generator().manual_seed(0)
        panels, caps = [], []
        for i in range(6):
            item = data[i * 7]
            x, h = item["image"][None], ldm.run.data.resolution
            m = box_mask(h, h) if i % 2 == 0 else stroke_mask(h, h, g)
            label = int(item["label"])
            out, _ = inpaint(ldm, SampleRequest(n=1, labels=[label], steps=25, seed=i), x, m)
            panels += [torch.where(m > 0.5, torch.ones_like(x), x), out, x]
            caps += ["in", "out", "real"]  # 32-pixel tiles: captions of a few letters
        return torch.cat(panels), caps, 3
    data = build_dataset(DataConfig(dataset="emoji", resolution=ldm.run.data.resolution, channels=3))
    panels, caps = [], []
    k = ldm.run.upscale.factor
    for i in range(6):  # the last (held-out) emoji
        x = data[len(data) - 1 - 17 * i]["image"][None]
        low = downscale(x, k)
        out, _ = upscale(ldm, low, SampleRequest(n=1, steps=25, cfg=1.0, seed=i))
        bicubic = F.interpolate(low, scale_factor=k, mode="bicubic", align_corners=False).clamp(-1, 1)
        panels += [F.interpolate(low, scale_factor=k, mode="nearest"), bicubic, out, x]
        caps += [f"in {low.shape[-1]}px", "bicubic", "upscaled", "original"]
    return torch.cat(panels), caps, 4


def edit_quality(name: str, dst: Path, args) -> dict:
    """The model's section of benchmarks/editing_quality.py, run on it (written to runs/recipes/NAME/quality.json)."""
    out = ROOT / "runs" / "recipes" / name / "quality.json"
    task = LatentDiffusion.load(dst).task
    bench = ["--out", str(out), "--n", str(min(args.eval_n, 100))]
    if task == "inpaint":
        bench += ["--sections", "inpainting", "--inpaint-checkpoint", str(dst)]
    else:
        bench += ["--sections", "super-resolution", "--upscale-checkpoint", str(dst)]
    editing_quality.main(bench)
    return json.loads(out.read_text())


def edit_card(name: str, recipe: dict, dn: dict, quality: dict, size_mb: float, dev: str) -> str:
    d = recipe["denoiser"]
    params = f"{dn.get('parameters', 0) / 1e6:.2f} M"
    if d["task"] == "inpaint":
        use = f".venv/bin/ldmkit inpaint shirt.png --mask hole.png --model {name} --label 0"
        head = "| mask | method | FID | PSNR in mask |\n| --- | --- | --- | --- |"
        rows = [
            f"| {r['mask']} | {r['method']} | {r['fid']:.1f} | {r['psnr in mask']:.2f} dB |"
            for r in quality["inpainting"]
            if "fid" in r
        ]
        about = (
            f"{quality['n']} held-out images of the Fashion-MNIST test split, masks covering 25% of the image, "
            f"{quality['sampler']} sampler, {quality['steps']} steps, guidance {quality['cfg']}, each image's own "
            f"label; FID against the originals (noisy at this n: compare rows)"
        )
    else:
        use = f".venv/bin/ldmkit upscale small.png --model {name}"
        head = "| method | PSNR | SSIM | FID |\n| --- | --- | --- | --- |"
        sr = quality["super_resolution"]
        rows = [
            f"| {r['method']} | {r['psnr']:.2f} dB | {r['ssim']:.4f} | {r['fid']:.1f} |"
            for r in sr["rows"]
            if "fid" in r
        ]
        about = (
            f"the last {quality['sr_n']} emoji (held out from training), downscaled {sr['factor']}x by "
            f"bicubic interpolation and brought back; {quality['sr_steps']} steps; FID against the originals"
        )
    table = "\n".join([head, *rows])
    return f"""# {name}

{SHIPPED[name]}.

![held-out images before and after]({name}.png)

## Use

```sh
{use}
```

## Recipe

`recipes/{name}/denoiser.toml` (task {d["task"]}), on the autoencoder of `{d["autoencoder"]}`, built on {dev} with

```sh
{recipe["command"]}
```

| stage | steps | batch | parameters | training time |
| --- | --- | --- | --- | --- |
| denoiser | {d["train"]["steps"]} | {d["train"]["batch_size"]} | {params} | {recipe["denoiser_s"] / 60:.1f} min |

Diffusion: {d["diffusion"]["parameterisation"]}-prediction, {d["diffusion"]["schedule"]} schedule,
min-SNR gamma {d["diffusion"]["min_snr_gamma"]}. Weights: half precision, {size_mb:.1f} MB.

## Quality

Measured by `benchmarks/editing_quality.py` on {about}:

{table}
"""


def build_edit_model(name: str, args) -> int:
    dn, recipe = train_edit_stage(name, args)
    dst = export_half(dn["checkpoint"], weights_dir() / f"{name}.safetensors")
    panels, caps, k = held_out_edits(name, dst)
    save_grid(panels, weights_dir() / f"{name}.png", nrow=k, labels=caps)
    quality = edit_quality(name, dst, args)
    card = edit_card(name, recipe, dn, quality, dst.stat().st_size / 2**20, device_name(args.device))
    return write_card(name, dst, card, {"recipe": recipe, "quality": quality})


def train_stages(name: str, args) -> tuple[dict, dict, dict]:
    out = ROOT / "runs" / "recipes" / name
    recipe = ROOT / "recipes" / name
    dev = [f"train.device={args.device}"]
    ae_run = load_run(AutoencoderRun, str(recipe / "autoencoder.toml"), dev + args.ae_set)
    times = {}
    t = time.time()
    if args.ae_from:
        ae, ae_run, times["autoencoder_from"] = autoencoder_from(args.ae_from, ae_run, out / "ae")
    else:
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


def autoencoder_from(model: str, recipe_run: AutoencoderRun, dst: Path) -> tuple[dict, AutoencoderRun, dict]:
    """The autoencoder inside `model`, written once as dst/model.safetensors (an autoencoder checkpoint with the
    recipe's data section, so its reconstruction metrics use the recipe's held-out images): (result, run, source).
    A rerun reuses what it wrote (the build may since have replaced `model`), so a resumed denoiser keeps the
    latents it began with."""
    path = dst / "model.safetensors"
    if path.is_file():
        meta = checkpoint.read_metadata(path)
        source = meta.get("source") or {}
        if source.get("model") != str(model):
            raise SystemExit(
                f"{path} holds the autoencoder of {source.get('model', 'a trained stage')}, not of {model}; "
                f"remove {dst} to start over"
            )
        return {"checkpoint": str(path), "step": 0}, from_dict(AutoencoderRun, meta["config"]), source
    source = {"model": str(model), "sha256": checkpoint.file_sha256(model)}
    model_ae, run = load_autoencoder(model)
    run = replace(recipe_run, model=run.model)  # its architecture and latent scale, the recipe's data and training
    dst.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, model_ae.state_dict(), AE_KIND, to_dict(run), step=0, source=source)
    return {"checkpoint": str(path), "step": 0}, run, source


def command(name: str, args) -> str:
    """The build command line that reproduces this model, overrides included."""
    parts = (
        ["python recipes/build.py", name]
        + ([f"--ae-from {args.ae_from}"] if args.ae_from else [])
        + [f"--ae-set {s}" for s in args.ae_set]
        + [f"--set {s}" for s in args.set]
    )
    return " ".join(parts + ([f"--eval-n {args.eval_n}"] if args.eval_n != 10000 else []))


def ae_row(recipe: dict) -> str:
    """The card's autoencoder row: its training, or the model it was taken from (`--ae-from`)."""
    a, src = recipe["autoencoder"], recipe.get("autoencoder_from")
    if src:
        return f"| autoencoder | from `{src['model']}` (SHA-256 {src['sha256'][:12]}...), not retrained | | | |"
    minutes = recipe["autoencoder_s"] / 60
    return f"| autoencoder | {a['train']['steps']} | {a['train']['batch_size']} | | {minutes:.1f} min |"


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
{ae_row(recipe)}
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


def eval_split(model: str, args) -> str:
    """The split a shipped model's FID is measured against: --eval-split for fashion-mnist; the emoji set has no
    test split, so its models (and their LoRAs) are measured against their training images, as their cards say."""
    return args.eval_split if model == "fashion-mnist" else "train"


def build_distilled_model(name: str, args) -> int:
    """recipes/NAME/distill.toml -> weights/NAME.safetensors (the LCM-LoRA in half precision), NAME.md, .png, .json."""
    out = ROOT / "runs" / "recipes" / name / "ldm"
    run = load_run(
        DenoiserRun, str(ROOT / "recipes" / name / "distill.toml"), [f"train.device={args.device}"] + args.set
    )
    dn = train_denoiser(run, out, resume=(out / "train-state.safetensors").exists())
    dst = weights_dir() / f"{name}.safetensors"
    half_lora(Path(dn["checkpoint"]), dst)
    k, teacher = run.distill.steps, json.loads((weights_dir() / f"{run.init}.json").read_text())["eval"]
    split = eval_split(run.init, args)
    evs = [
        evaluate(dst, split=split, n=args.eval_n, sampler="lcm", steps=s, cfg=1.0, device=args.device)
        for s in dict.fromkeys((k, max(1, k // 2), 1))
    ]
    ldm = load_model(dst)
    prompts = GRID_PROMPTS * 2 if run.init == "emoji" else None
    req = SampleRequest(n=16 if prompts else 20, prompts=prompts, sampler="lcm", steps=k, cfg=1.0, device=args.device)
    generate_to_file(dst, req, weights_dir() / f"{name}.png")
    recipe = {"distill": to_dict(run), "distill_s": training_seconds(out), "command": command(name, args)}
    card = distilled_card(name, recipe, dn, evs, teacher, dst.stat().st_size / 2**20, device_name(args.device))
    (weights_dir() / f"{name}.md").write_text(card)
    record = json.dumps({"recipe": recipe, "evals": evs, "teacher_eval": teacher}, indent=2)
    (weights_dir() / f"{name}.json").write_text(record.replace(f"{ROOT}/", ""))
    print(f"wrote {dst} ({ldm.run.distill.steps}-step), {name}.md, {name}.png and {name}.json in {weights_dir()}")
    return 0


def pixel_art(x: torch.Tensor, block: int = 4, levels: int = 6) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] as pixel art: block x block cells of their mean colour, each channel rounded
    to `levels` values. The style the example LoRA `emoji-pixel` learns, and the yardstick its card measures with."""
    cells = F.avg_pool2d(x, block)
    q = torch.round((cells + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
    return q.repeat_interleave(block, -2).repeat_interleave(block, -1)


def pixel_art_folder(folder: Path, data: DataConfig) -> Path:
    """The training images of `data` (its held-out ones left out) as pixel art with their captions: folder/*.png
    and metadata.jsonl, written once (deterministic, so a rerun finds the same data)."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    ds = build_dataset(replace(data, holdout=0))
    keep = len(ds) - data.holdout
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = []
    for i in range(keep):
        item = ds[i]
        to_pil(pixel_art(item["image"][None])[0]).save(tmp / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": item["caption"]}) + "\n")
    (tmp / "metadata.jsonl").write_text("".join(rows))
    tmp.rename(folder)
    return folder


def pixel_error(images: torch.Tensor) -> float:
    """Mean absolute difference (0..1) between images and their pixel art: 0 for images that are pixel art."""
    return float((images - pixel_art(images)).abs().mean() / 2)


def write_card(name: str, dst: Path, card: str, record: dict) -> int:
    """weights/NAME.md (the card) and NAME.json (the record, paths relative to the repository) beside `dst`."""
    (weights_dir() / f"{name}.md").write_text(card)
    (weights_dir() / f"{name}.json").write_text(json.dumps(record, indent=2).replace(f"{ROOT}/", ""))
    print(f"wrote {dst}, {name}.md, {name}.png and {name}.json in {weights_dir()}")
    return 0


def build_lora_model(name: str, args) -> int:
    """recipes/NAME/lora.toml -> weights/NAME.safetensors (a style LoRA of the shipped model its `init` names, in half
    precision, naming its base), NAME.md, .png (the base and the LoRA on the same prompts and seeds) and .json."""
    out = ROOT / "runs" / "recipes" / name
    run = load_run(DenoiserRun, str(ROOT / "recipes" / name / "lora.toml"), [f"train.device={args.device}"] + args.set)
    base_data = from_dict(
        DataConfig, checkpoint.read_metadata(weights_dir() / f"{run.init}.safetensors")["config"]["data"]
    )
    pixel_art_folder(ROOT / run.data.dataset, base_data)  # the base model's training images, its held-out ones not
    dn = train_denoiser(run, out / "ldm", resume=(out / "ldm" / "train-state.safetensors").exists())
    dst = half_lora(Path(dn["checkpoint"]), weights_dir() / f"{name}.safetensors")
    prompts = GRID_PROMPTS * 8  # 8 seeds of each grid prompt
    req = SampleRequest(n=len(prompts), prompts=prompts, seed=0, device=args.device)
    base, _ = generate(load_model(weights_dir() / f"{run.init}.safetensors"), req)
    styled, _ = generate(load_model(dst), req)
    k = len(GRID_PROMPTS)
    save_grid(torch.cat([base[:k], styled[:k]]), weights_dir() / f"{name}.png", nrow=k, labels=GRID_PROMPTS * 2)
    quality = {"n": len(prompts), "pixel_error_base": pixel_error(base), "pixel_error_lora": pixel_error(styled)}
    recipe = {"lora": to_dict(run), "lora_s": training_seconds(out / "ldm"), "command": command(name, args)}
    card = lora_card(name, recipe, dn, quality, dst.stat().st_size / 2**20, device_name(args.device))
    return write_card(name, dst, card, {"recipe": recipe, "quality": quality})


def lora_card(name: str, recipe: dict, dn: dict, quality: dict, size_mb: float, dev: str) -> str:
    d, base = recipe["lora"], recipe["lora"]["init"]
    return f"""# {name}

{SHIPPED[name]}.

![the base model (top) and the LoRA (bottom), same prompts and seeds]({name}.png)

## Use

```sh
.venv/bin/ldmkit generate "red apple" --model {name}
.venv/bin/ldmkit generate "red apple" --model {base} --lora weights/{name}.safetensors:0.5   # half the style
```

The file is a LoRA of rank {d["lora"]["rank"]} on {TARGET_WORDS[d["lora"]["targets"]]} of `{base}`'s U-Net,
in the diffusers/PEFT layout (diffusers' `load_lora_weights` reads it). It names its base (and its SHA-256) and loads
as `{base}` with the LoRA merged; with `--lora FILE:SCALE` on `{base}` any scale, negative ones included, applies.

## Recipe

`recipes/{name}/lora.toml`: the training images of `{base}` turned into pixel art (4x4-pixel cells of their mean
colour, 6 levels a channel; `recipes/build.py` writes them to `{d["data"]["dataset"]}`), captioned as they are;
{d["train"]["steps"]} steps of batch {d["train"]["batch_size"]} on the frozen `{base}`
({dn.get("trained_parameters", 0) / 1e6:.2f} M trained parameters, {recipe["lora_s"] / 60:.1f} min on {dev}),
built with

```sh
{recipe["command"]}
```

Weights: half precision, {size_mb:.2f} MB.

## Quality

How far the images are from pixel art (the mean absolute difference, 0..1, between an image and its own 4x4-cell,
6-level version; 0 is pixel art), over {quality["n"]} images (the grid's 8 prompts, 8 each, seeds 0 to
{quality["n"] - 1}), 25 dpmpp_2m steps, guidance 3:

| model | pixel-art error |
| --- | --- |
| `{base}` | {quality["pixel_error_base"]:.4f} |
| `{name}` | {quality["pixel_error_lora"]:.4f} |
"""


def half_lora(src: Path, dst: Path) -> Path:
    """A LoRA file with its floating-point tensors in half precision, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return checkpoint.atomic_write(dst, lambda tmp: save_file(state, tmp, metadata=meta))


def distilled_card(name: str, recipe: dict, dn: dict, evs: list, teacher: dict, size_mb: float, dev: str) -> str:
    d = recipe["distill"]
    k, base = d["distill"]["steps"], d["init"]
    t = teacher
    rows = [f"| {base} (teacher) | {t['sampler']} | {t['steps']} | {t['cfg']} | {t['fid']:.2f} | 1.00 |"]
    rows += [f"| {name} | lcm | {e['steps']} | 1.0 | {e['fid']:.2f} | {e['fid'] / teacher['fid']:.2f} |" for e in evs]
    return f"""# {name}

{SHIPPED[name]}.

![samples]({name}.png)

## Use

```sh
.venv/bin/ldmkit generate --model {name} {'"red apple"' if base == "emoji" else "--label 7"}
```

It samples with the lcm sampler in {k} steps and guidance 1 unless `--sampler`, `--steps` or `--cfg` say
otherwise. The file is a LoRA of rank {d["lora"]["rank"]} on {TARGET_WORDS[d["lora"]["targets"]]} of `{base}`'s
U-Net: it names its base (and its SHA-256), and loads as `{base}` with the LoRA merged;
`--model {base} --lora weights/{name}.safetensors` is the same model.

## Recipe

`recipes/{name}/distill.toml`: latent consistency distillation of `{base}` along its {d["distill"]["grid"]}-step
sampling grid with guidance {d["distill"]["guidance"]} folded in, {d["train"]["steps"]} steps of batch
{d["train"]["batch_size"]} ({dn.get("trained_parameters", 0) / 1e6:.2f} M trained parameters,
{recipe["distill_s"] / 60:.1f} min on {dev}), built with

```sh
{recipe["command"]}
```

Weights: half precision, {size_mb:.2f} MB.

## Quality

Measured with `ldmkit evaluate` against the {evs[0]["split"]} split, {evs[0]["n"]} images (TF-Inception features); the
teacher's row is its card's:

| model | sampler | steps | guidance | FID | x teacher |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""


def build_controlnet(name: str, args) -> int:
    """recipes/NAME/control.toml -> weights/NAME.safetensors (the ControlNet in half precision), NAME.md, NAME.png
    (held-out conditions, the base model's images and the controlled ones) and NAME.json."""
    out = ROOT / "runs" / "recipes" / name / "control"
    run = load_run(
        DenoiserRun, str(ROOT / "recipes" / name / "control.toml"), [f"train.device={args.device}"] + args.set
    )
    dn = train_denoiser(run, out, resume=(out / "train-state.safetensors").exists())
    dst = half_lora(Path(dn["checkpoint"]), weights_dir() / f"{name}.safetensors")
    base = weights_dir() / f"{run.init}.safetensors"
    bench_out = ROOT / "runs" / "recipes" / name / "quality.json"
    n = min(args.eval_n, 200)
    bench = ["--checkpoint", str(base), "--controlnet", str(dst), "--condition", run.control.condition]
    control_bench.main(bench + ["--n", str(n), "--out", str(bench_out)])
    quality = json.loads(bench_out.read_text())
    ldm = LatentDiffusion.load(base)
    net, meta = load_controlnet(dst, ldm.device, ldm.unet)
    kind, cfg = condition_settings(meta)
    images, labels = control_bench.held_out(ldm, 8, seed=1)
    conditions = detect(kind, images, cfg)
    req = SampleRequest(n=8, labels=labels, steps=25, seed=0, device=args.device)
    plain, _ = generate(ldm, req)
    with controlled(ldm, [Control(net, conditions)], req.steps):
        steered, _ = generate(ldm, req)
    panels = torch.cat([conditions * 2 - 1, plain.expand(-1, 3, -1, -1), steered.expand(-1, 3, -1, -1)])
    panels = F.interpolate(panels, scale_factor=max(1, 64 // panels.shape[-1]), mode="nearest")  # legible tiles
    save_grid(panels, weights_dir() / f"{name}.png", nrow=8)
    recipe = {"control": to_dict(run), "control_s": training_seconds(out), "command": command(name, args)}
    card = control_card(name, recipe, dn, quality, dst.stat().st_size / 2**20, device_name(args.device))
    return write_card(name, dst, card, {"recipe": recipe, "quality": quality})


def control_card(name: str, recipe: dict, dn: dict, quality: dict, size_mb: float, dev: str) -> str:
    d, q = recipe["control"], quality
    base, kind = d["init"], d["control"]["condition"]
    metric = {"canny": ("edge_f1", "edge F1 (2 px)"), "mask": ("mask_iou", "mask IoU")}.get(
        kind, ("colour_error", "colour error")
    )
    rows = [
        f"| {r['row']} | {r[metric[0]]:.3f} | {r.get('fid', float('nan')):.1f} | {r['cost_ratio']:.2f}x |"
        for r in q["rows"]
    ]
    rank = d["control"]["rank"]
    shape = (
        f"a low-rank ControlNet (rank {rank}): its copy of `{base}`'s U-Net encoder keeps that model's weights,\n"
        f"frozen, plus a LoRA of rank {rank} on each of its layers; the file holds the LoRAs, the hint encoder and\n"
        f"the zero convolutions, and loads with `{base}` (the copy rebuilt from its U-Net, the updates merged in)"
        if rank
        else f"a full ControlNet: a trained copy of `{base}`'s U-Net encoder and middle block"
    )
    return f"""# {name}

{CONTROLNETS[name]}.

![held-out conditions (top), `{base}` alone (middle), steered (bottom), same labels and seeds]({name}.png)

## Use

```sh
.venv/bin/ldmkit condition {kind} garment.png --out {kind}.png    # what the ControlNet sees
.venv/bin/ldmkit generate --model {base} --label 0 --control {name}:garment.png
.venv/bin/ldmkit generate --model {base} --label 0 --control {name}:{kind}.png:0.5:raw   # a ready one, half strength
```

It is {shape}.
Its condition is the `{kind}` detector run on the image given to `--control` (KIND `raw` takes the image as the
condition itself).

## Recipe

`recipes/{name}/control.toml`: `{base}`'s training images with their `{kind}` conditions, {d["train"]["steps"]}
steps of batch {d["train"]["batch_size"]} at learning rate {d["train"]["lr"]:g} on the frozen `{base}`
({dn.get("trained_parameters", 0) / 1e6:.2f} M trained parameters, {recipe["control_s"] / 60:.1f} min on {dev}),
built with

```sh
{recipe["command"]}
```

Weights: half precision, {size_mb:.2f} MB.

## Quality

`benchmarks/control.py --condition {kind}` on {q["n"]} held-out test images, each drawn once per row with its true
label, {q["steps"]} steps, guidance {q["cfg"]}: the detector run on each generated image against the image's
condition, FID@{q["n"]} against the held-out images, and the seconds per image as a ratio to the uncontrolled row's.

| row | {metric[1]} | FID@{q["n"]} | cost |
| --- | --- | --- | --- |
{chr(10).join(rows)}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted([*SHIPPED, *CONTROLNETS]))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="denoiser override KEY=VALUE (repeatable)")
    ap.add_argument("--ae-set", action="append", default=[], help="autoencoder override KEY=VALUE (repeatable)")
    ap.add_argument("--ae-from", metavar="MODEL", help="train the denoiser on MODEL's autoencoder (no stage 1)")
    ap.add_argument("--eval-n", type=int, default=10000, help="images for FID / KID (default 10000)")
    ap.add_argument("--eval-split", default="test")
    args = ap.parse_args(argv)
    name = args.name
    os.chdir(ROOT)  # recipes name files relative to the repository root
    if (ROOT / "recipes" / name / "distill.toml").is_file():
        return build_distilled_model(name, args)
    if (ROOT / "recipes" / name / "control.toml").is_file():
        return build_controlnet(name, args)
    if (ROOT / "recipes" / name / "lora.toml").is_file():
        return build_lora_model(name, args)
    if not (ROOT / "recipes" / name / "autoencoder.toml").is_file():
        return build_edit_model(name, args)
    ae, dn, recipe = train_stages(name, args)
    dst = export_half(dn["checkpoint"], weights_dir() / f"{name}.safetensors")
    split = eval_split(name, args)
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
