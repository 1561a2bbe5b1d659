"""The two training commands as functions: configuration in, checkpoint out."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..adapters import target_paths
from ..adapters.apply import targetable
from ..adapters.embeddings import add_embedding, initial_vectors
from ..autoencoder.files import load_autoencoder
from ..conditioning.text import EmbeddingCache, build_text_encoder
from ..config import AutoencoderRun, DenoiserRun, check_multiple, to_dict, validate
from ..data import build_dataset, prepare_dataset, split_holdout
from ..data.latents import LatentCache, encode_dataset
from ..denoisers import backbone_name, build_backbone
from ..diffusion.parameterisation import make_denoiser
from ..distributed import World, process_group
from ..errors import InputError
from ..evaluation.metrics import reconstruction_metrics
from ..ldm import LatentDiffusion, LdmFile
from ..nn.lora import LoRASet, attach
from ..runtime import autocast
from ..tasks import get_task
from .autoencoder import AutoencoderTask
from .batches import resolve_workers
from .denoiser import DenoiserTask, resolve_run
from .init import load_parent_weights, start_from, trains_text
from .loop import train
from .rundir import flatten, run_folder


def _datasets(data_cfg, holdout: int):
    """(training set, held-out set or None)."""
    ds = build_dataset(data_cfg)
    if holdout and len(ds) <= holdout:
        raise InputError(
            f"the data set has {len(ds)} images, too few to hold out data.holdout={holdout} for "
            f"evaluation; lower data.holdout or add images"
        )
    return split_holdout(ds, holdout) if holdout else (ds, None)


def _prepare(ds, num_workers: int, progress: bool) -> None:
    """Build (or update) the prepared-image cache of an image folder, held-out images included (they share it)."""
    prepare_dataset(ds, resolve_workers(num_workers, ds), progress)


def train_autoencoder(
    run: AutoencoderRun,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the first stage; writes autoencoder.safetensors, log.jsonl and metrics.json into out_dir.
    resume: continue the run in out_dir; overwrite: replace the run in out_dir (see rundir for the rules).
    Under torchrun every rank runs this with the same arguments (see loop.py); rank 0 writes the files."""
    validate(run)
    with process_group(run.train.device) as (world, device):
        world.check_same("settings", flatten(to_dict(run)))
        progress = progress and world.main
        with run_folder(world, out_dir, resume=resume, overwrite=overwrite) as folder:
            world.on_main(lambda: folder.write_config(to_dict(run)))
            train_set, held = _datasets(run.data, run.data.holdout)
            with world.main_first():  # rank 0 builds the prepared-image cache, the others read it
                _prepare(train_set, run.train.num_workers, progress)
            torch.manual_seed(run.train.seed)  # after the cache build, which may draw from the global RNG
            task = AutoencoderTask(run, train_set, device)
            res = train(
                task,
                run.train,
                folder.path,
                device,
                resume=resume,
                config_dict=to_dict(run),
                progress=progress,
                stop_after=stop_after,
                world=world,
            )

            def finish() -> dict:
                result = {"checkpoint": str(res.export_path), "step": res.step}
                if res.step >= run.train.steps and held is not None:
                    model, _ = load_autoencoder(res.export_path, device)
                    result["holdout"] = reconstruction_metrics(model, held, device, progress=progress)
                (folder.path / "metrics.json").write_text(json.dumps(result, indent=2))
                return result

            return world.on_main(finish)


def text_setup(run: DenoiserRun, captions: list[str], device, parent: LdmFile | None = None):
    """The text encoder for a text-conditional run (the --init model's, with its weights) and, for a frozen one
    whose output does not change while training (no LoRAs in it), the per-caption embedding cache."""
    if not run.text_encoder:
        return None, None
    enc = build_text_encoder(run.text_encoder, **(parent.text_options if parent is not None else {}))
    if parent is not None and parent.text:
        load_parent_weights(parent, None, enc, run.init)
    enc = enc.to(device)
    if getattr(enc, "trainable", False) and not trains_text(run):
        enc.trainable = False  # frozen for this run: eval mode, no graph, cached embeddings
        enc.requires_grad_(False)
    if getattr(enc, "trainable", False) or run.lora.text_encoder:
        return enc, None
    return enc, EmbeddingCache(enc, sorted(set(captions) | {""}))


# settings of a denoiser run that are filled in from the autoencoder and the data (resolve_run): a resume can
# compare them only after loading both
RESOLVED_KEYS = (
    "unet.in_channels",
    "unet.out_channels",
    "unet.context_dim",
    "unet.num_classes",
    "unet.temporal_heads",  # the video task adds temporal layers to an image model ([video])
    "unet.temporal_depth",
    "unet.temporal_conv",
    "unet.max_frames",
    "dit.in_channels",
    "dit.out_channels",
    "dit.context_dim",
    "dit.num_classes",
    "class_names",
    "data.channels",
)


def train_denoiser(
    run: DenoiserRun,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train the second stage on latents of run.autoencoder; writes model.safetensors (self-contained).
    resume: continue the run in out_dir; overwrite: replace the run in out_dir (see rundir for the rules).
    Under torchrun every rank runs this with the same arguments (see loop.py); rank 0 writes the files."""
    if not run.autoencoder and not run.init:
        raise InputError(
            "no autoencoder given: pass --autoencoder PATH (a checkpoint from `ldmkit train-autoencoder`), or start "
            "from a model with --init MODEL"
        )
    validate(run)
    check_lora_run(run)
    if run.control.rank and run.task != "control":
        raise InputError("--control-rank (control.rank) makes a low-rank ControlNet; add --task control or drop it")
    check_textual_inversion_run(run)
    check_dreambooth_run(run)
    check_distill_run(run)
    run, parent = _start(run, out_dir)  # --init: the model's architecture, autoencoder and SHA-256
    check_lora_text(run)  # needs the model's text encoder, known now
    with process_group(run.train.device) as (world, device):
        world.check_same("settings", flatten(to_dict(run)))
        progress = progress and world.main
        with run_folder(world, out_dir, resume=resume, overwrite=overwrite, keep=[run.autoencoder]) as folder:
            # refuse a changed model before the slow setup
            world.on_main(lambda: folder.check_config(to_dict(run), ignore=RESOLVED_KEYS))
            torch.manual_seed(run.train.seed)
            run, task = _denoiser_task(run, device, progress, world, parent)
            world.on_main(lambda: folder.write_config(to_dict(run)))
            res = train(
                task,
                run.train,
                folder.path,
                device,
                resume=resume,
                config_dict=to_dict(run),
                progress=progress,
                stop_after=stop_after,
                world=world,
            )
            result = {
                "checkpoint": str(res.export_path),
                "step": res.step,
                "final_loss": res.history[-1]["loss"] if res.history else None,
                "parameters": sum(p.numel() for p in task.ldm.unet.parameters()),
                "trained_parameters": sum(p.numel() for p in task.model.parameters() if p.requires_grad),
            }
            world.on_main(lambda: (folder.path / "metrics.json").write_text(json.dumps(result, indent=2)))
    return result


def _start(run: DenoiserRun, out_dir: str | Path) -> tuple[DenoiserRun, LdmFile | None]:
    """start_from, for a task that trains beside a frozen base model (a ControlNet) or extends a model of another
    task (a video model from an image model) too: the base comes from --init and keeps its own task; the run's task
    stays the one asked for."""
    task = get_task(run.task)
    if not (task.base_model or (task.extends and run.init)):
        return start_from(run, out_dir)
    if not run.init:
        raise InputError(f"--task {task.name} trains beside a frozen model: name it with --init MODEL")
    started, parent = start_from(replace(run, task=DenoiserRun().task), out_dir)
    takes = (DenoiserRun().task,) if task.base_model else (*task.extends, task.name)
    if started.task not in takes:
        raise InputError(
            f"--init {run.init} is {get_task(started.task).summary} (task {started.task}); --task {task.name} needs "
            f"{' or '.join(get_task(t).summary for t in takes)}"
        )
    return replace(started, task=task.name), parent


def _denoiser_task(
    run: DenoiserRun, device, progress: bool, world: World, parent: LdmFile | None = None
) -> tuple[DenoiserRun, DenoiserTask]:
    """Load the autoencoder, encode (or load the cached) latents, build the backbone (from the --init model's
    weights when given): (resolved run, task). Rank 0 builds the image and latent caches; the other ranks wait for
    it, then read them."""
    ae, ae_run = load_autoencoder(run.autoencoder, device)
    f_ae, f_unet, net = ae_run.model.factor, run.backbone.factor, backbone_name(run)
    check_multiple(
        "data.resolution",
        run.data.resolution,
        f_ae * f_unet,
        f"the autoencoder downsamples by {f_ae}, then the {net} by {f_unet}",
    )  # before the slow encoding
    get_task(run.task).check_run(run, f_ae, f_unet, net)
    if run.data.channels != ae_run.model.in_channels:
        run = replace(run, data=replace(run.data, channels=ae_run.model.in_channels))
    train_set, _ = _datasets(run.data, 0)
    with world.main_first(), autocast(run.train.mixed_precision, device):
        _prepare(train_set, run.train.num_workers, progress)
        latents = encode_dataset(ae, run.autoencoder, train_set, run.data, device, progress=progress)
    latents, weights = _dreambooth(run, ae, latents, device, world, progress)
    torch.manual_seed(run.train.seed)  # the cache build (first run on a folder only) may draw from the global RNG
    text, text_cache = text_setup(run, latents.captions, device, parent)
    if run.dreambooth.instance_prompt and text is None:
        raise InputError(f"--init {run.init} is not text-conditional; DreamBooth needs a text-to-image model")
    tokens = _new_tokens(run, text)
    if tokens is not None:  # every caption names the new word; its embeddings are computed each step
        latents.captions, text_cache = [with_token(c, run.textual_inversion.token) for c in latents.captions], None
    run = resolve_run(run, ae_run.model, latents, text_dim=getattr(text, "dim", 0))
    torch.manual_seed(run.train.seed)
    unet = build_backbone(run)
    if parent is not None:
        load_parent_weights(parent, unet, None, run.init)
    unet = unet.to(device)
    adapter, text_adapter = _lora_adapter(run, unet), _text_lora_adapter(run, text)
    if tokens is not None:
        unet.requires_grad_(False)
    ldm = LatentDiffusion(ae, ae_run.model, unet, run, text)
    images = train_set if get_task(run.task).trains_on_images else None  # encoded each step (mask, degradation)
    task = DenoiserTask(
        run, ldm, latents, device, text_cache, images=images, adapter=adapter, tokens=tokens, text_adapter=text_adapter
    )
    task.weights = weights
    if run.distill.steps and adapter is None:  # a full student: the teacher is a frozen copy of the model
        task.teacher = make_denoiser(copy.deepcopy(unet).requires_grad_(False).eval(), run.diffusion)
    return run, task


def check_lora_run(run: DenoiserRun) -> None:
    """InputError for a LoRA run (lora.rank > 0) that has no model to adapt or asks to train more."""
    if not run.lora.rank:
        if run.lora.text_encoder:
            raise InputError("--lora-text adds LoRAs to the text encoder too; give their rank with --lora-rank R")
        return
    if not run.init:
        raise InputError("--lora-rank trains adapters on an existing model; pass --init MODEL (or drop --lora-rank)")
    if run.train.trainable == "backbone+text":
        raise InputError("--lora-rank trains the adapters alone; drop train.trainable=backbone+text")
    if get_task(run.task).base_model:
        raise InputError(f"--lora-rank adapts the model itself; drop --task {run.task} (or --lora-rank)")
    if run.lora.text_encoder and run.distill.steps:
        raise InputError(
            "an LCM-LoRA adapts the backbone alone (its teacher reads the same text encoding); drop --lora-text"
        )


def check_lora_text(run: DenoiserRun) -> None:
    """InputError for a --lora-text run whose --init model has no text encoder to adapt, or a frozen package one."""
    if not run.lora.text_encoder:
        return
    if not run.text_encoder:
        raise InputError(f"--init {run.init} has no text encoder (it takes labels or nothing); drop --lora-text")
    if run.text_encoder == "minilm":
        raise InputError(
            f"--init {run.init} reads prompts with the minilm text encoder, a frozen package model whose sentence "
            f"embeddings the denoiser learned as they are; drop --lora-text (text LoRAs need clip or trainable)"
        )


def check_textual_inversion_run(run: DenoiserRun) -> None:
    """InputError for a textual-inversion run that has no model to start from or asks to train more."""
    if not run.textual_inversion.token:
        return
    if not run.init:
        raise InputError("--textual-inversion learns a word for an existing model; pass --init MODEL")
    if run.lora.rank or run.train.trainable == "backbone+text" or get_task(run.task).base_model:
        raise InputError(
            "--textual-inversion trains the new word's embedding alone; drop --lora-rank, --task and "
            "train.trainable=backbone+text (or --textual-inversion)"
        )


def check_dreambooth_run(run: DenoiserRun) -> None:
    """InputError for a DreamBooth run without a model, or with a class prompt but no class images."""
    db = run.dreambooth
    if not db.instance_prompt:
        if db.class_prompt or db.class_data:
            raise InputError("a class prompt or class images without an instance prompt; give --instance-prompt")
        return
    if not run.init:
        raise InputError("--dreambooth fine-tunes an existing model; pass --init MODEL")
    if run.textual_inversion.token or get_task(run.task).base_model:
        raise InputError("--dreambooth trains the model (or its LoRAs); drop --textual-inversion and --task")
    if bool(db.class_prompt) != bool(db.class_data):
        raise InputError(
            "dreambooth.class_prompt and dreambooth.class_data go together: `ldmkit train --dreambooth "
            "--class-prompt ...` draws the class images and sets both"
        )


def check_distill_run(run: DenoiserRun) -> None:
    """InputError for a distillation run without a model to distil, or one that asks for another kind of training
    at once."""
    d = run.distill
    if not d.steps:
        return
    if not run.init:
        raise InputError("distillation makes a few-step student of an existing model; pass --init MODEL")
    if d.steps > d.grid:
        raise InputError(
            f"distill.steps={d.steps} is more than the teacher's grid of distill.grid={d.grid} steps; the student "
            f"takes at most the grid's steps (LCM: 1 to 8 of 50)"
        )
    other = [
        name
        for name, on in (
            ("--textual-inversion", run.textual_inversion.token),
            ("--dreambooth", run.dreambooth.instance_prompt),
            (f"--task {run.task}", get_task(run.task).base_model or run.task != DenoiserRun().task),
        )
        if on
    ]
    if other:
        raise InputError(f"distillation trains the model (or its LoRAs) alone; drop {', '.join(other)}")


def _dreambooth(run: DenoiserRun, ae, latents: LatentCache, device, world: World, progress: bool):
    """For a DreamBooth run: (the instance latents captioned with the instance prompt, followed by the class
    images' captioned with the class prompt; each item's loss weight: the two halves weigh 1 and prior_weight,
    whatever their sizes), or (latents, None) for any other run."""
    db = run.dreambooth
    if not db.instance_prompt:
        return latents, None
    inst = replace(latents, captions=[db.instance_prompt] * len(latents))
    if not db.class_data:
        return inst, None
    data = replace(run.data, dataset=db.class_data, limit=0)
    class_set = build_dataset(data)
    with world.main_first(), autocast(run.train.mixed_precision, device):
        _prepare(class_set, run.train.num_workers, progress)
        cls = encode_dataset(ae, run.autoencoder, class_set, data, device, progress=progress)
    n_i, n_c = len(inst), len(cls)
    merged = replace(
        inst,
        mean=torch.cat([inst.mean, cls.mean]),
        std=None if inst.std is None else torch.cat([inst.std, cls.std]),
        labels=torch.cat([inst.labels, cls.labels]),
        captions=inst.captions + [db.class_prompt] * n_c,
    )
    total = n_i + n_c  # mean weight 1 at prior_weight 1: a batch's loss is (instance + w class) / 2 on average
    weights = torch.cat(
        [torch.full((n_i,), total / (2 * n_i)), torch.full((n_c,), db.prior_weight * total / (2 * n_c))]
    )
    return merged, weights


def with_token(caption: str, token: str) -> str:
    """A training caption that names the new word: as it is when it does, else the word before it."""
    return caption if token in caption else f"{token}, {caption}" if caption else token


def _new_tokens(run: DenoiserRun, text) -> torch.nn.Module | None:
    """For a textual-inversion run: freeze the text encoder, add the word (vectors from textual_inversion.init) and
    return the module holding its rows, all that trains; None otherwise."""
    ti = run.textual_inversion
    if not ti.token:
        return None
    if text is None:
        raise InputError(f"--init {run.init} is not text-conditional; textual inversion needs a text-to-image model")
    text.requires_grad_(False)
    new = add_embedding(text, ti.token, initial_vectors(text, ti.vectors, ti.init))
    text.trainable = True  # its forward builds a graph: the gradient reaches the new rows, and only them
    holder = torch.nn.Module()
    holder.rows = new.rows  # the same Parameter: checkpoints and the EMA hold the rows alone, not the whole table
    return holder


def _lora_adapter(run: DenoiserRun, unet: torch.nn.Module) -> LoRASet | None:
    """For lora.rank > 0: freeze the backbone and hook fresh LoRAs into the layers lora.targets names (B = 0, so
    training starts from the model unchanged); None otherwise."""
    if not run.lora.rank:
        return None
    unet.requires_grad_(False)
    lora = LoRASet.for_modules(unet, target_paths(unet, run.lora.targets), run.lora.rank, run.lora.alpha or None)
    lora = lora.to(next(unet.parameters()).device)
    attach(unet, lora)
    return lora


def _text_lora_adapter(run: DenoiserRun, text) -> LoRASet | None:
    """For lora.text_encoder: freeze the text encoder and hook fresh LoRAs (lora.rank, lora.alpha) into every one
    of its linear layers; its forward then builds a graph, so the captions are encoded each step; None otherwise."""
    if not run.lora.text_encoder:
        return None
    text.requires_grad_(False)
    lora = LoRASet.for_modules(text, list(targetable(text, kernels=False)), run.lora.rank, run.lora.alpha or None)
    lora = lora.to(text.device)
    attach(text, lora)
    text.trainable = True  # its forward builds a graph: the gradient reaches the LoRAs, and only them
    return lora
