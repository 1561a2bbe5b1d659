"""What a model is trained for, as data plus small functions, and the registry that maps task names to them.

A task says which inputs its denoiser takes beside the noisy latent (nothing, a mask and a masked image, a
low-resolution image, ...), how training builds them from a step's items, how a training preview builds them, which
commands and API routes can use such a model, and what its class embedding holds. Everything else (the loop, the
samplers, checkpoints) is shared. Adding a task is one module with a `Task` subclass and one `register` call; the
rest of ldmkit asks the registry (`get_task(run.task)`) instead of comparing task names.

The trainer a task sees is duck-typed (training/denoiser.py's DenoiserTask): `run`, `ldm`, `device`,
`condition(idx, gens)`, `draw_latents(idx, gens)`, `encode_sample(x, gens)` and `images`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..conditioning.types import Conditioning
from ..config import TASK_NAMES
from ..errors import InputError

Composite = Callable[[torch.Tensor], torch.Tensor]  # decoded preview images -> what the grid shows


class Task:
    """A model task. Subclasses set the attributes and override what differs from plain generation."""

    name: str = ""
    summary: str = ""  # what such a model is, for messages: "an inpainting model"
    needs: str = ""  # what it takes beside a prompt, for messages: ": it needs an image and a mask"
    commands: tuple[str, ...] = ()  # the CLI commands that can use such a model
    routes: tuple[str, ...] = ()  # the HTTP routes that serve it
    user_labels: bool = True  # its class embedding holds labels a user picks (not, e.g., noise levels)
    trains_on_images: bool = False  # training encodes each step's images itself (masks, degradations)
    from_noise: bool = True  # it generates from noise and a prompt or label alone (generate, sample, img2img)
    base_model: bool = False  # it trains modules beside a frozen model that --init names, which keeps its own task
    extends: tuple[str, ...] = ()  # the tasks of --init models it grows from beside its own (video: generate)

    # --- the backbone's shape ----------------------------------------------------------------------------------
    def concat_channels(self, run, ae_cfg, current: int) -> int:
        """Channels concatenated to the noisy latent (current: what the configured backbone already takes)."""
        return current

    def resolve(self, run, net, text_dim: int, names: tuple[str, ...]):
        """(backbone config, class names) once the data and the text encoder are known: text models get a context
        width, labelled data a class embedding."""
        if run.text_encoder:
            net = replace(net, context_dim=text_dim, num_classes=0)
        elif names and not net.num_classes:
            net = replace(net, num_classes=len(names))
        if net.num_classes and not names:
            names = tuple(str(i) for i in range(net.num_classes))
        return net, names

    def check_run(self, run, ae_factor: int, backbone_factor: int, backbone: str) -> None:
        """Refuse a run this task cannot train (before any slow work); a subclass calls this one too."""
        if run.train.trainable == "temporal":
            raise InputError(
                f"train.trainable=temporal trains a video model's temporal layers; a model of task {self.name} has "
                f"none (use --task video, or train.trainable=backbone)"
            )

    # --- training ----------------------------------------------------------------------------------------------
    def training_inputs(self, trainer, idx: torch.Tensor, gens, x: torch.Tensor | None):
        """(clean latents (B, c, h, w), conditioning) of items idx, every draw from the items' own generators."""
        z = trainer.ldm.to_latent(trainer.draw_latents(idx, gens)).to(trainer.device)
        return z, trainer.condition(idx, gens)

    def trained_modules(self, trainer) -> dict | None:
        """The modules a run of this task trains instead of the backbone (and a trainable text encoder), by name; the
        trainer's model and data are set when it is asked. None: the backbone, as for every model task."""
        return None

    def export(self, trainer, out_dir, weights, step: int):
        """Write the checkpoint of `weights` (the trained modules, the EMA's where there is one) and return its path;
        None: the default, a self-contained model file."""
        return None

    def preview_backbone(self, trainer, weights):
        """The backbone a training preview samples with, from `weights` (see export)."""
        return weights["unet"].eval()

    def preview_inputs(self, trainer, n: int, cond: Conditioning, uncond, size: tuple[int, int]):
        """(cond, uncond, composite) for a progress grid of n images of latent size `size`; composite (or None)
        turns the decoded images into what the grid shows."""
        return cond, uncond, None

    # --- use ---------------------------------------------------------------------------------------------------
    def wrong_command(self, model: str, command: str) -> InputError:
        """The error for a model of this task given to a command that cannot use it, naming the commands that can."""
        uses = [f"`ldmkit {c}`" for c in self.commands]
        listed = " or ".join([", ".join(uses[:-1]), uses[-1]] if len(uses) > 2 else uses)
        return InputError(
            f"{model} is {self.summary} (task {self.name}{self.needs}), so `ldmkit {command}` cannot use it; use "
            f"{listed or 'the command it was trained for'}"
        )

    def require(self, ldm, command: str) -> None:
        """InputError unless `command` can use the model `ldm` of this task."""
        if command not in self.commands:
            raise self.wrong_command(ldm.source or "this model", command)

    def check_from_noise(self, ldm, command: str) -> None:
        """InputError unless the model generates from noise and a prompt or label alone (generate, sample, img2img,
        synth, the generation APIs)."""
        if not self.from_noise:
            raise self.wrong_command(ldm.source or "this model", command)

    def edit_latent_mask(self, mask: torch.Tensor, size: tuple[int, int], factor: int) -> torch.Tensor:
        """An edit's mask (1, 1, H, W) at the latent size, as this task's models saw masks in training: nearest
        neighbour, as diffusers resizes one for an imported Stable Diffusion inpainting model."""
        return F.interpolate(mask, size=tuple(size), mode="nearest")


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry (its name must be new)."""
    if not task.name or task.name in TASKS:
        raise ValueError(f"task name {task.name!r} is empty or taken")
    TASKS[task.name] = task
    TASK_NAMES.append(task.name)  # what a run's configuration may name
    return task


def unregister(name: str) -> None:
    """Remove a task from the registry (a test's own task, when the test ends)."""
    TASKS.pop(name, None)
    if name in TASK_NAMES:
        TASK_NAMES.remove(name)


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str, key: str = "task") -> Task:
    """The registered task `name` (InputError naming `key` and the choices otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"{key} = {name!r} is not a task; use {' or '.join(TASKS)} (e.g. --task inpaint)") from None


def with_concat(cond: Conditioning | None, concat: torch.Tensor, labels: torch.Tensor | None = None):
    """cond with `concat` (and `labels`, when given) replaced; None stays None."""
    if cond is None:
        return None
    return replace(cond, concat=concat) if labels is None else replace(cond, concat=concat, labels=labels)
