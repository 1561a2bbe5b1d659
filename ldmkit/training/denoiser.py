"""Second-stage training: the denoiser on cached latents, with label or text conditioning and caption dropout.

What the denoiser takes beside the noisy latent, and how a step builds it, is the model's task (ldmkit/tasks/): a
plain model draws its latents from the cache, an inpainting model and an upscaler encode the step's images with the
frozen autoencoder themselves (masks, degradations), the cache then supplying only labels and captions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..adapters import save_lora
from ..adapters.embeddings import write_embedding
from ..conditioning.types import Conditioning
from ..config import AutoencoderConfig, DenoiserRun, to_dict
from ..data.images import save_grid
from ..data.latents import LatentCache
from ..diffusion.sample import sample_latents
from ..errors import InputError
from ..ldm import LatentDiffusion
from ..nn.invariant import plain_kernels
from ..nn.lora import LoRASet
from ..nn.lora import scales as lora_scales
from ..noise import generators_from_seed, randn
from ..tasks import get_task
from .consistency import consistency_loss
from .parallel import Parallel


def resolve_run(run: DenoiserRun, ae_cfg: AutoencoderConfig, latents: LatentCache, text_dim: int = 0) -> DenoiserRun:
    """Fill in what the data, the autoencoder and the task decide: the backbone's (U-Net's or DiT's) channels,
    classes and context width, and the class names."""
    task, net = get_task(run.task), run.backbone
    concat = task.concat_channels(run, ae_cfg, max(net.in_channels - net.out_channels, 0))
    net = replace(net, in_channels=ae_cfg.latent_channels + concat, out_channels=ae_cfg.latent_channels)
    net, names = task.resolve(run, net, text_dim, tuple(run.class_names or latents.class_names))
    return replace(run.with_backbone(net), class_names=names)


class DenoiserTask:
    """One micro-step: draw latents from the cache (inpaint: encode the images, each under a random mask), drop
    conditions for guidance, loss from the parameterisation."""

    def __init__(
        self,
        run: DenoiserRun,
        model: LatentDiffusion,
        latents: LatentCache,
        device: torch.device,
        text_cache=None,
        images=None,
        adapter: LoRASet | None = None,
        tokens: nn.Module | None = None,
        text_adapter: LoRASet | None = None,
    ):
        """run: the resolved configuration; model: the bundle whose U-Net (and trainable text encoder) is trained;
        latents: the encoded training set; text_cache: embeddings of every caption for a frozen text encoder;
        images: the training set itself (items with an "image" (C, H, W) in [-1, 1]), needed by the tasks that encode
        each step's images (inpaint, upscale); adapter: LoRAs hooked into the frozen backbone (run.lora), which then
        are all that trains, is averaged and is exported (lora.safetensors); tokens: the rows of a textual-inversion
        word (run.textual_inversion), likewise all that trains (embedding.safetensors, learned_embeds.safetensors);
        text_adapter: LoRAs hooked into the frozen text encoder (run.lora.text_encoder), trained and written with
        `adapter`'s."""
        self.task = get_task(run.task)
        if self.task.trains_on_images and images is None:
            raise InputError(
                f"the {run.task} task needs the training images: pass images= (the data set) to DenoiserTask"
            )
        self.run, self.ldm, self.latents, self.device = run, model, latents, device
        self.text_cache, self.images = text_cache, images
        self.size = len(latents)
        trainable_text = model.text_encoder is not None and getattr(model.text_encoder, "trainable", False)
        self.adapter, self.tokens, self.text_adapter = adapter, tokens, text_adapter
        self.weights: torch.Tensor | None = None  # (N,) each item's loss weight (DreamBooth's prior), or None
        self.teacher: nn.Module | None = None  # a distillation's frozen denoiser (None: the backbone without LoRAs)
        trained = {"lora": adapter} if adapter is not None else {"embedding": tokens} if tokens is not None else None
        if text_adapter is not None:
            trained = (trained or {}) | {"text_lora": text_adapter}
        trained = trained or self.task.trained_modules(self)  # or a ControlNet
        self.model = nn.ModuleDict(
            trained
            if trained is not None
            else {"unet": model.unet} | ({"text_encoder": model.text_encoder} if trainable_text else {})
        )
        t = run.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.optimizers = {"denoiser": (opt, params)}
        self._loss_module = _LossModule(self)
        self.loss_fn = self._loss_module  # what micro_step calls; distribute() may wrap it (DDP) or shard it (FSDP)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def distribute(self, parallel: Parallel) -> None:
        parallel.backbone(self.ldm.unet)
        self.loss_fn = parallel.data_parallel(self._loss_module)

    def condition(self, idx: torch.Tensor, gens: Sequence[torch.Generator]) -> Conditioning:
        """Conditioning of a batch; each item's condition is dropped with probability data.caption_dropout."""
        drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < self.run.data.caption_dropout  # (B,)
        if self.ldm.text_encoder is not None:
            caps = ["" if d else self.latents.captions[int(i)] for i, d in zip(idx, drop)]
            if self.text_cache is not None:
                return self.text_cache.get(caps).map(lambda t: t.to(self.device))
            return self.ldm.text_encoder.encode(caps).map(lambda t: t.to(self.device))
        if self.ldm.num_classes:
            labels = self.latents.labels[idx].clone()
            labels[drop | (labels < 0)] = self.run.backbone.num_classes  # the null class
            return Conditioning(labels=labels.to(self.device))
        return Conditioning()

    def batch_images(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.images[int(i)]["image"] for i in idx]).to(self.device)  # (B, C, H, W)

    def draw_latents(self, idx: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """Cached latents of items idx (B, c, h, w), each sampled from its stored posterior with its generator."""
        z = self.latents.mean[idx]
        if self.latents.std is not None:
            z = z + self.latents.std[idx] * randn(z.shape, list(gens))
        return z

    @torch.no_grad()
    def encode_sample(self, x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """Scaled training latents of images x (B, C, H, W): z ~ q(z | x) for a KL autoencoder (as the latent cache
        draws them, each item's noise from its generator), the pre-quantisation latents for a VQ one."""
        ae = self.ldm.autoencoder
        if hasattr(ae, "encode"):
            post = ae.encode(x)
            eps = randn(post.mean.shape, list(gens)).to(post.mean)
            return self.ldm.to_latent((post.mean + post.std * eps).float())
        return self.ldm.to_latent(ae.latents(x).float())

    def loss(self, idx: torch.Tensor, gens: Sequence[torch.Generator], x: torch.Tensor | None) -> torch.Tensor:
        """The mean loss of items idx (their images x for a task that encodes them), every draw from the items' own
        generators."""
        z, cond = self.task.training_inputs(self, idx, gens, x)
        if self.run.distill.steps:
            loss = self.consistency(z, cond, list(gens))
        else:
            loss = self.ldm.denoiser.loss(z, cond, generator=list(gens))  # (B,)
        return (loss * self.weights[idx].to(loss)).mean() if self.weights is not None else loss.mean()

    def consistency(self, z: torch.Tensor, cond: Conditioning, gens: list[torch.Generator]) -> torch.Tensor:
        """The latent consistency distillation loss (B,) of clean latents z: the student is the model being trained
        (its LoRAs, when it has them), the teacher the frozen model (the same backbone with its LoRAs at scale 0,
        or the copy `teacher`), under the guidance distill.guidance folds in."""
        d, den, teacher = self.run.distill, self.ldm.denoiser, self.teacher
        if teacher is None:

            def teacher(x, sigma, c):
                with lora_scales({self.adapter: 0.0}):
                    return den(x, sigma, c)

        uncond = self.ldm.null_conditioning(len(z)).map(lambda t: t.to(self.device)) if d.guidance != 1 else None
        with plain_kernels():  # training needs no batch invariance; the loss's draws are per item already
            return consistency_loss(den, teacher, z, cond, uncond, den.sigmas(d.grid), d.guidance, gens)

    def micro_step(
        self, step: int, idx: torch.Tensor, gens: Sequence[torch.Generator], scale: float, x: torch.Tensor | None
    ) -> dict[str, float]:
        self.model.train()
        if self.adapter is not None or self.tokens is not None:
            self.ldm.unet.train()  # the frozen backbone runs as in training, its adapters inside it
        loss = self.loss_fn(idx, gens, x)
        (loss * scale).backward()
        return {"loss": loss.item()}

    def export(self, out_dir: Path, weights: nn.Module, step: int) -> Path:
        if self.adapter is not None:  # the adapters alone, in the layout asked for
            lora, about = self.run.lora, {"base": self.run.init, "base_sha256": self.run.init_sha256, "step": step}
            about |= {"rank": lora.rank, "alpha": lora.alpha or lora.rank, "targets": lora.targets}
            if self.run.distill.steps:  # applied, it makes its base a few-step model (ldm.with_distill)
                about["distill"] = to_dict(self.run.distill)
            text = (weights["text_lora"], self.ldm.text_encoder) if "text_lora" in weights else None
            if text is not None:
                about["text_encoder"] = self.run.text_encoder
            path = out_dir / "lora.safetensors"
            return save_lora(path, weights["lora"], self.ldm.unet, lora.layout, about, text)
        if self.tokens is not None:  # the new word's vectors, in both layouts
            ti = self.run.textual_inversion
            about = {"base": self.run.init, "base_sha256": self.run.init_sha256, "step": step}
            about |= {"text_encoder": self.run.text_encoder, "vectors": ti.vectors}
            rows = weights["embedding"].rows
            write_embedding(out_dir / "learned_embeds.safetensors", ti.token, rows, "diffusers", about)
            return write_embedding(out_dir / "embedding.safetensors", ti.token, rows, "a1111", about)
        own = self.task.export(self, out_dir, weights, step)  # e.g. a ControlNet file
        if own is not None:
            return own
        state = weights.state_dict()
        unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
        return self.ldm.save(out_dir / "model.safetensors", unet, text or None, step=step)

    def sample(self, out_dir: Path, weights: nn.Module, step: int) -> Path | None:
        if self.adapter is None and self.tokens is None:
            return self._grid(out_dir, self.task.preview_backbone(self, weights), weights, step)
        live = {k: v.clone() for k, v in self.model.state_dict().items()}  # the adapters (backbone, text) or word
        self.model.load_state_dict(weights.state_dict())  # the grid shows the weights given (the EMA's)
        try:
            with torch.no_grad():
                return self._grid(out_dir, self.ldm.unet.eval(), weights, step)
        finally:
            self.model.load_state_dict(live)  # copied back: training goes on bit for bit

    def _grid(self, out_dir: Path, unet: nn.Module, weights: nn.Module, step: int) -> Path | None:
        text = weights["text_encoder"] if "text_encoder" in weights else self.ldm.text_encoder
        ldm = LatentDiffusion(self.ldm.autoencoder, self.ldm.ae_config, unet, self.run, text)
        cond, uncond, names = grid_conditions(ldm, self.latents)
        n = len(names)
        h, w = self.latents.mean.shape[-2:]
        cond, uncond, composite = self.task.preview_inputs(self, n, cond, uncond, (h, w))
        z = sample_latents(
            ldm.denoiser,
            (n, ldm.latent_channels, h, w),
            cond,
            uncond,
            steps=20,
            cfg_scale=3.0 if (ldm.num_classes or ldm.text_encoder is not None) else 1.0,
            generator=generators_from_seed(0, n),
        )
        images = ldm.decode(z)  # (n, C, H, W)
        if composite is not None:
            images = composite(images)  # e.g. the kept pixels of an inpainting preview are the input's
        return save_grid(images.cpu(), out_dir / f"samples-{step:07d}.png", nrow=min(n, 8), labels=names)


class _LossModule(nn.Module):
    """The trained modules (backbone, a trainable text encoder) with the task's loss as forward: what DDP wraps, so
    that every trainable parameter has its gradients averaged over the ranks, and FSDP's root unit."""

    def __init__(self, task: DenoiserTask):
        super().__init__()
        self.model = task.model
        self._loss = task.loss  # a bound method, not a submodule

    def forward(self, idx: torch.Tensor, gens: Sequence[torch.Generator], x: torch.Tensor | None) -> torch.Tensor:
        return self._loss(idx.cpu(), gens, x)  # DDP and FSDP move inputs to a CUDA device; idx indexes CPU data


def grid_conditions(ldm: LatentDiffusion, latents: LatentCache, per_class: int = 1):
    """Conditions for a progress grid: every class (up to 10) or the first distinct captions (up to 8)."""
    if ldm.num_classes:
        labels = [c for c in range(min(ldm.num_classes, 10)) for _ in range(per_class)]
        return ldm.conditioning(labels=labels), ldm.null_conditioning(len(labels)), [ldm.class_names[c] for c in labels]
    if ldm.text_encoder is not None:
        caps = list(dict.fromkeys(c for c in latents.captions if c))[:8] or [""]
        return ldm.conditioning(prompts=caps), ldm.null_conditioning(len(caps)), caps
    return Conditioning(), None, [""] * 8
