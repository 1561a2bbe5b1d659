"""Frozen dataclasses for every component, TOML presets and dotted command-line overrides.

A run's configuration is plain values only: it round-trips through `to_dict` / `from_dict` (and so through JSON in
a checkpoint's metadata) without loss. Overrides look like `train.steps=200` or `unet.channel_mult=1,2,2`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, MissingFileError

# --- bounds: the allowed values of each numeric setting, declared on its field -------------------------------------


@dataclass(frozen=True)
class Bound:
    """The allowed values of a numeric setting (of each entry, for a tuple setting). Every bound rejects nan / inf."""

    lo: float = -math.inf  # smallest allowed value
    hi: float = math.inf  # largest allowed value
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False  # True: hi itself is not allowed
    integer: bool = False  # describe the range as whole numbers (the setting is an int)
    choices: tuple = ()  # if given, only these values are allowed

    def admits(self, v) -> bool:
        if self.choices:
            return v in self.choices
        if not math.isfinite(v):
            return False
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.choices:
            return " or ".join(str(c) for c in self.choices)
        kind = "an integer" if self.integer else "a number"
        lo, hi = (f"{x:.0f}" if self.integer else f"{x:g}" for x in (self.lo, self.hi))
        if math.isinf(self.lo) and math.isinf(self.hi):
            return "any finite number"
        if math.isinf(self.hi):
            return f"{kind} {'>' if self.lo_open else '>='} {lo}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


COUNT = Bound(1, integer=True)  # how many of something, at least one
OPTIONAL_COUNT = Bound(0, integer=True)  # a count or interval where 0 means none / off
WEIGHT = Bound(0)  # a loss weight, rate or norm where 0 switches the term off
POSITIVE = Bound(0, lo_open=True)
PROBABILITY = Bound(0, 1)
DECAY = Bound(0, 1, hi_open=True)  # a fraction in [0, 1): EMA and Adam decays, dropout
OPEN_UNIT = Bound(0, 1, lo_open=True, hi_open=True)
FINITE = Bound()
SEED = Bound(0, 2**32 - 1, integer=True)


def bounded(default, bound: Bound):
    """A dataclass field with `default` whose allowed values are `bound` (validate() checks them)."""
    return field(default=default, metadata={"bound": bound})


# --- components ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str = "kl"  # "kl" (Gaussian posterior, KL term) or "vq" (codebook, commitment term)
    in_channels: int = bounded(3, COUNT)  # image channels (1 for grayscale data)
    base_channels: int = bounded(64, COUNT)  # channels of the first level; level i has base_channels * channel_mult[i]
    # one entry per level; downsampling factor is 2 ** (levels - 1)
    channel_mult: tuple[int, ...] = bounded((1, 2, 2), COUNT)
    num_res_blocks: int = bounded(1, COUNT)  # residual blocks per level in the encoder (the decoder uses one more)
    latent_channels: int = bounded(4, COUNT)  # channels of the latent z
    mid_attention: bool = True  # a self-attention block at the lowest resolution
    norm_groups: int = bounded(32, COUNT)  # GroupNorm groups; every level's channel count must be divisible by it
    codebook_size: int = bounded(512, COUNT)  # VQ only: number of code vectors
    commitment_beta: float = bounded(0.25, WEIGHT)  # VQ only: weight of the encoder-commitment term
    # latents are multiplied by this before diffusion; set to 1/std after training
    scaling_factor: float = bounded(1.0, POSITIVE)
    shift_factor: float = bounded(0.0, FINITE)  # subtracted from latents before scaling (0 for SD-style autoencoders)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class AutoencoderLossConfig:
    pixel_weight: float = bounded(1.0, WEIGHT)  # weight of the L1 reconstruction term
    perceptual_weight: float = bounded(1.0, WEIGHT)  # weight of the perceptual term (0 disables it)
    kl_weight: float = bounded(1e-6, WEIGHT)  # KL term weight (KL autoencoder)
    codebook_weight: float = bounded(1.0, WEIGHT)  # VQ term weight (VQ autoencoder)
    # optimizer step at which the patch-GAN discriminator starts to train and to count
    disc_start: int = bounded(2000, OPTIONAL_COUNT)
    disc_weight: float = bounded(0.5, WEIGHT)  # multiplier on the adaptive GAN weight
    disc_layers: int = bounded(3, COUNT)  # strided conv layers of the patch discriminator
    disc_channels: int = bounded(64, COUNT)  # channels of the discriminator's first layer
    disc_lr: float = bounded(0.0, WEIGHT)  # discriminator learning rate; 0 means "same as the autoencoder's"


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = bounded(4, COUNT)  # latent channels plus any concatenated conditioning channels
    out_channels: int = bounded(4, COUNT)  # latent channels
    model_channels: int = bounded(64, COUNT)  # channels of the first level
    channel_mult: tuple[int, ...] = bounded((1, 2, 2), COUNT)  # per level; the U-Net downsamples between levels
    num_res_blocks: int = bounded(2, COUNT)  # residual blocks per level on the way down (one more on the way up)
    # levels that get transformer blocks after each residual block
    attention_levels: tuple[int, ...] = bounded((1, 2), OPTIONAL_COUNT)
    # heads per level (one value broadcasts); ignored where head_dim is set
    num_heads: tuple[int, ...] = bounded((4,), COUNT)
    head_dim: int = bounded(0, OPTIONAL_COUNT)  # if > 0, heads = channels // head_dim at each level
    transformer_depth: int = bounded(1, COUNT)  # transformer blocks per attention site
    context_dim: int = bounded(0, OPTIONAL_COUNT)  # cross-attention context width; 0 means self-attention only
    # class-label embedding; 0 means unconditional. Label num_classes is the null label
    num_classes: int = bounded(0, OPTIONAL_COUNT)
    use_linear_projection: bool = False  # linear (SD 2.x) instead of 1x1 conv (SD 1.x) in/out of transformers
    upcast_attention: bool = False  # compute attention scores in float32 (SD 2.1 needs it in fp16)
    mid_attention: bool = True  # transformer in the middle block
    norm_groups: int = bounded(32, COUNT)  # GroupNorm groups
    # GroupNorm epsilon of the residual blocks and the output norm (diffusers' norm_eps)
    norm_eps: float = bounded(1e-5, POSITIVE)
    dropout: float = bounded(0.0, DECAY)  # dropout in residual blocks
    flip_sin_to_cos: bool = True  # sinusoidal embedding order (cos, sin), as Stable Diffusion
    freq_shift: float = bounded(0.0, FINITE)  # shift of the frequency denominator in the sinusoidal embedding
    # video (denoisers/temporal.py): heads of the temporal attention after every block; 0 = an image model
    temporal_heads: int = bounded(0, OPTIONAL_COUNT)
    temporal_depth: int = bounded(1, COUNT)  # temporal transformer blocks per site
    temporal_conv: bool = False  # a temporal 1-D convolution before each temporal attention (Video LDM)
    max_frames: int = bounded(32, COUNT)  # frames per clip at most (the temporal position table's length)

    @property
    def factor(self) -> int:
        """How many times the U-Net halves its input: latent sides must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads_at(self, level: int) -> int:
        ch = self.model_channels * self.channel_mult[level]
        if self.head_dim > 0:
            return max(1, ch // self.head_dim)
        return self.num_heads[level] if len(self.num_heads) > 1 else self.num_heads[0]


# DiT sizes (Peebles & Xie 2023, Table 1): name -> (depth, hidden_size, num_heads); a preset is "<name>/<patch>"
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCHES = (2, 4, 8)
DIT_PRESETS = tuple(f"{name}/{p}" for name in DIT_SIZES for p in DIT_PATCHES)


@dataclass(frozen=True)
class DiTConfig:
    """The Diffusion Transformer (denoiser.kind = "dit"): a preset names its size, and any of depth, hidden_size,
    num_heads, patch_size set above 0 overrides the preset's value (preset "" needs all four)."""

    preset: str = "S/2"  # "S", "B", "L" or "XL" / patch size 2, 4 or 8 (e.g. "B/4"); "" = only the four below
    depth: int = bounded(0, OPTIONAL_COUNT)  # transformer blocks; 0 = the preset's
    # token width; 0 = the preset's (a multiple of 4 for the 2-D sine-cosine positions)
    hidden_size: int = bounded(0, OPTIONAL_COUNT)
    num_heads: int = bounded(0, OPTIONAL_COUNT)  # attention heads, dividing hidden_size; 0 = the preset's
    # latent pixels per patch side; latent sides must be multiples of it; 0 = the preset's
    patch_size: int = bounded(0, OPTIONAL_COUNT)
    in_channels: int = bounded(4, COUNT)  # latent channels plus any concatenated conditioning channels
    out_channels: int = bounded(4, COUNT)  # latent channels
    mlp_ratio: float = bounded(4.0, POSITIVE)  # feed-forward width / hidden_size
    # text context width for cross-attention in every block; 0 = no cross-attention
    context_dim: int = bounded(0, OPTIONAL_COUNT)
    # class embedding added to the noise-level embedding; label num_classes is the null label
    num_classes: int = bounded(0, OPTIONAL_COUNT)
    learned_sigma: bool = False  # the last layer also predicts a variance (original DiT checkpoints); it is dropped
    # epsilon of the LayerNorm before each feed-forward (diffusers' norm_eps, 1e-5 there)
    norm_eps: float = bounded(1e-6, POSITIVE)
    # latent side whose patch grid the positions are spread over at every size (diffusers' sample_size); 0 =
    # positions are patch indices
    sample_size: int = bounded(0, OPTIONAL_COUNT)

    def size(self) -> tuple[int, int, int, int]:
        """(depth, hidden_size, num_heads, patch_size) after the preset."""
        depth, width, heads, patch = 0, 0, 0, 0
        if self.preset in DIT_PRESETS:
            name, p = self.preset.split("/")
            (depth, width, heads), patch = DIT_SIZES[name], int(p)
        return (self.depth or depth, self.hidden_size or width, self.num_heads or heads, self.patch_size or patch)

    @property
    def factor(self) -> int:
        """How many latent pixels one token covers per side: latent sides must be multiples of this."""
        return self.size()[3]


@dataclass(frozen=True)
class DenoiserConfig:
    kind: str = "unet"  # the backbone: "unet" (settings in [unet]) or "dit" (settings in [dit])


BACKBONE_KINDS = ("unet", "dit")  # the values of DenoiserConfig.kind


@dataclass(frozen=True)
class DiffusionConfig:
    parameterisation: str = "eps"  # "eps", "v" (both discrete-time, 1000 steps), "edm" (continuous sigma) or "flow"
    schedule: str = "scaled_linear"  # beta schedule: "linear", "scaled_linear" or "cosine"
    num_timesteps: int = bounded(1000, COUNT)  # discrete training timesteps (eps / v)
    beta_start: float = bounded(0.00085, OPEN_UNIT)  # first beta (linear / scaled_linear)
    beta_end: float = bounded(0.012, OPEN_UNIT)  # last beta (linear / scaled_linear)
    zero_terminal_snr: bool = False  # rescale betas so the last timestep is pure noise (use with v)
    sigma_data: float = bounded(1.0, POSITIVE)  # std of the (scaled) latents; EDM preconditioning
    min_snr_gamma: float = bounded(0.0, WEIGHT)  # min-SNR loss weighting with this gamma; 0 disables it
    p_mean: float = bounded(-1.2, FINITE)  # EDM training: log-sigma mean
    p_std: float = bounded(1.2, POSITIVE)  # EDM training: log-sigma std
    sigma_min: float = bounded(0.002, POSITIVE)  # EDM sampling range
    sigma_max: float = bounded(80.0, POSITIVE)
    # flow: sigma = t / (1 - t) is multiplied by this in training and sampling (Esser et al. 2024's resolution
    # shift; 3.0 for about 4x the pixels of the base resolution)
    flow_shift: float = bounded(1.0, POSITIVE)
    logit_mean: float = bounded(0.0, FINITE)  # flow training: logit(t) ~ N(logit_mean, logit_std^2) before the shift
    logit_std: float = bounded(1.0, POSITIVE)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"  # a built-in name ("fashion-mnist", "emoji") or a folder of images
    split: str = "train"  # built-in data sets: "train" or "test"
    resolution: int = bounded(32, COUNT)  # images are resized and cropped to resolution x resolution
    channels: int = bounded(3, Bound(choices=(1, 3)))  # 1 (grayscale) or 3 (RGB)
    crop: str = "center"  # "center" or "random"
    flip: bool = False  # random horizontal flips
    limit: int = bounded(0, OPTIONAL_COUNT)  # use only the first N images; 0 means all
    holdout: int = bounded(256, OPTIONAL_COUNT)  # images held out (from the end) for reconstruction metrics
    # probability of dropping the label / caption (classifier-free guidance)
    caption_dropout: float = bounded(0.1, PROBABILITY)
    # image folders: a file that decodes to more pixels is skipped; 0 = no limit
    max_pixels: int = bounded(200_000_000, OPTIONAL_COUNT)
    # clip data sets (moving-fashion, a folder of clips): frames per training clip (0: 8) and the rate they are
    # sampled at (frames per second of the source)
    frames: int = bounded(0, OPTIONAL_COUNT)
    fps: float = bounded(8.0, POSITIVE)
    # built-in clip sets (moving-fashion, emoji-motion): draw only these motions, e.g. ("zooming in",); (): all
    motions: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    steps: int = bounded(1000, COUNT)  # optimizer steps
    batch_size: int = bounded(32, COUNT)  # images per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = bounded(1, COUNT)  # micro-batches per optimizer step
    lr: float = bounded(2e-4, POSITIVE)  # AdamW learning rate
    warmup_steps: int = bounded(100, OPTIONAL_COUNT)  # linear warm-up
    weight_decay: float = bounded(0.0, WEIGHT)  # AdamW weight decay
    adam_betas: tuple[float, ...] = bounded((0.9, 0.999), DECAY)
    grad_clip: float = bounded(1.0, WEIGHT)  # max gradient norm; 0 disables clipping
    ema_decay: float = bounded(0.999, DECAY)  # EMA of weights; 0 disables it
    seed: int = bounded(0, SEED)
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, none on CPU), "bf16" or "no"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    log_every: int = bounded(10, COUNT)  # JSONL log interval (steps)
    sample_every: int = bounded(0, OPTIONAL_COUNT)  # sample grid interval (steps); 0 disables
    # checkpoint interval (steps); 0: only the final checkpoint, which is always written
    ckpt_every: int = bounded(500, OPTIONAL_COUNT)
    # data-loading processes; -1: one per available core for image folders, none for data sets already in memory;
    # 0: load in the training process. Never changes results, only speed
    num_workers: int = bounded(-1, Bound(-1, 256, integer=True))
    distributed: str = "auto"  # under torchrun: "auto" or "ddp" (a full model per rank), "fsdp" (parameters,
    # gradients, optimizer state and EMA sharded over the ranks; `ldmkit train` only), "none" (refuses several
    # ranks). Unused without torchrun
    gradient_checkpointing: bool = False  # recompute the backbone's block activations in the backward pass
    compile: bool = False  # torch.compile the backbone (the autoencoder in train-autoencoder)
    trainable: str = "auto"  # what a denoiser run trains: "backbone", "backbone+text" (a text encoder with weights
    # of its own too), "auto" (backbone+text from scratch, backbone alone from --init), "temporal" (a video model's
    # temporal layers alone, its image layers frozen). The autoencoder never trains


@dataclass(frozen=True)
class UpscaleConfig:
    """Latent super-resolution (task "upscale"; Rombach et al. 2022, sec. 4.4, as Stable Diffusion's x4 upscaler):
    the U-Net takes the low-resolution image, resized to the latent's size, concatenated to the latent, after
    noise augmentation; the augmentation's level enters as a class-style embedding (one row per level)."""

    factor: int = bounded(4, Bound(2, 16, integer=True))  # output side / input side
    # training draws augmentation levels 0..max_noise_level uniformly
    max_noise_level: int = bounded(350, Bound(0, 999, integer=True))
    # the level `ldmkit upscale` adds by default (--noise-level)
    noise_level: int = bounded(20, Bound(0, 999, integer=True))
    schedule: str = "scaled_linear"  # the augmentation's beta schedule over 1000 levels (SD x4's low_res_scheduler)
    beta_start: float = bounded(0.0001, OPEN_UNIT)
    beta_end: float = bounded(0.02, OPEN_UNIT)


CONDITIONS = ("canny", "mask", "colour", "folder")  # the values of ControlConfig.condition


@dataclass(frozen=True)
class ControlConfig:
    """A ControlNet (task "control"; Zhang et al. 2023): a trainable copy of the base model's U-Net encoder, fed the
    condition image through a small hint encoder, whose residuals enter the frozen U-Net. `condition` says where
    training takes each image's condition from: a built-in detector run on the image (canny, mask, colour) or the
    folder's metadata.jsonl (`conditioning_image` beside `file_name`)."""

    condition: str = "canny"
    canny_low: int = bounded(100, Bound(0, 255, integer=True))  # Canny's hysteresis thresholds on 0..255 grey
    canny_high: int = bounded(200, Bound(0, 255, integer=True))
    colour_cells: int = bounded(8, Bound(1, 64, integer=True))  # the colour layout's grid: cells per side
    hint_width: int = bounded(16, Bound(1, 256, integer=True))  # the hint encoder's first width (doubles per halving)
    # > 0: a low-rank ControlNet (Control-LoRA): the copy stays the base model's, plus a LoRA of this rank on each of
    # its layers; the file holds the LoRAs, the hint encoder and the zero convolutions, and loads with its model
    rank: int = bounded(0, Bound(0, 4096, integer=True))
    alpha: float = bounded(0.0, WEIGHT)  # the LoRAs' alpha (0: the rank, a factor 1)


@dataclass(frozen=True)
class VideoConfig:
    """The temporal layers the video task adds to an image model's U-Net (task "video"; a video model keeps the
    ones in its [unet] settings)."""

    # heads of the temporal attention; 0: 8, fewer where a head would get under 4 channels
    temporal_heads: int = bounded(0, OPTIONAL_COUNT)
    temporal_depth: int = bounded(1, COUNT)  # temporal transformer blocks after each U-Net block
    # a temporal convolution before each temporal attention (Video LDM); false: AnimateDiff's layout alone, which
    # converts to a diffusers MotionAdapter
    temporal_conv: bool = True
    max_frames: int = bounded(32, COUNT)  # frames per clip at most


# serve.precision's values: runtime.SAMPLING_PRECISIONS, which config (below torch) cannot import; a test compares them
SAMPLING_PRECISIONS = ("fp32", "bf16", "auto")
BACKENDS = ("torch", "openvino")  # serve.backend's values: runtime.BACKENDS (the same test compares them)
LORA_TARGETS = ("attn", "attn+ff", "all", "all+conv")  # the values of LoRAConfig.targets
LORA_LAYOUTS = ("peft", "kohya")  # the values of LoRAConfig.layout


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) trained on the frozen backbone of an --init model: W + (alpha / r) B A
    on the layers `targets` names (and, with text_encoder, on the text encoder's). A run with rank > 0 trains and
    writes only the adapters (lora.safetensors)."""

    rank: int = bounded(0, Bound(0, 4096, integer=True))  # r; 0: no LoRA (the backbone itself trains)
    alpha: float = bounded(0.0, WEIGHT)  # the update's numerator; 0: the rank (a factor alpha / r of 1)
    # "attn": the attention projections (to_q, to_k, to_v, to_out); "attn+ff": and the feed-forward layers;
    # "all": every linear layer and 1x1 convolution of the backbone; "all+conv": and its other convolutions (LoCon:
    # a k x k down convolution, a 1x1 up)
    targets: str = bounded("attn", Bound(choices=LORA_TARGETS))
    # the written file's keys: "peft" (diffusers' load_lora_weights) or "kohya" (AUTOMATIC1111, ComfyUI)
    layout: str = bounded("peft", Bound(choices=LORA_LAYOUTS))
    # also adapt every linear layer of the text encoder (a clip or trainable one, frozen beside its LoRAs); the
    # captions are then encoded each step instead of once
    text_encoder: bool = False


@dataclass(frozen=True)
class TextualInversionConfig:
    """Textual inversion (Gal et al. 2022) on an --init model with a clip or trainable text encoder: a new prompt
    word whose embedding vectors are all that trains. A run with a token writes embedding.safetensors
    (AUTOMATIC1111) and learned_embeds.safetensors (diffusers' load_textual_inversion)."""

    token: str = ""  # the new word, e.g. "<sks>"; "" = no textual inversion
    vectors: int = bounded(1, Bound(1, 64, integer=True))  # embedding vectors the word stands for
    init: str = ""  # a word whose embedding the vectors start from; "" = the mean of the token table


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2023) on an --init text-to-image model: the instance images (data.dataset), each
    captioned `instance_prompt`, fine-tune the model (or LoRAs, with lora.rank); with class images (`class_data`,
    drawn by the base model for the class prompt), the loss is the instance loss + prior_weight x the class loss."""

    instance_prompt: str = ""  # the prompt that names the instance, e.g. "a photo of sks toy"; "" = no DreamBooth
    class_prompt: str = ""  # the prompt the class images were drawn for; "" = no prior preservation
    class_data: str = ""  # their folder (`ldmkit train --dreambooth` draws and caches them)
    class_images: int = bounded(100, COUNT)  # how many the base model draws
    prior_weight: float = bounded(1.0, WEIGHT)  # the class loss's weight


@dataclass(frozen=True)
class DistillConfig:
    """Latent consistency distillation (Luo et al. 2023) of the --init model into a few-step student
    (training/consistency.py): the student, the model itself or its LoRAs (lora.rank), learns to jump from any point
    of the teacher's guided `grid`-step trajectory to its end. The written model (or LoRA) samples with the LCM
    sampler in `steps` steps and no further guidance, unless a command says otherwise."""

    steps: int = bounded(0, Bound(0, 64, integer=True))  # the student's sampling steps; 0 = no distillation
    # the teacher's sampling grid the student learns along: 16, not LCM's 50, since consistency spreads from the data
    # end one grid step at a time and small budgets reach the top of a short grid sooner (RESULTS.md, distillation)
    grid: int = bounded(16, Bound(2, 1000, integer=True))
    guidance: float = bounded(3.0, Bound(1))  # the guidance scale folded into the student (1: none)


# --- runs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderRun:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class DenoiserRun:
    autoencoder: str = ""  # path of the trained autoencoder checkpoint
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text_encoder: str = ""  # "" for label / unconditional models, else a text-encoder name
    class_names: tuple[str, ...] = ()  # label names, for grids and `ldmkit info`
    task: str = "generate"  # a registered task (ldmkit/tasks/): "generate", "inpaint", "upscale", ...
    init: str = ""  # start from this model (`--init`: a shipped name, ldm file, diffusers folder or SD file)
    init_sha256: str = ""  # the SHA-256 of that model, recorded when the run starts
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)  # task "upscale" only
    control: ControlConfig = field(default_factory=ControlConfig)  # task "control" only
    video: VideoConfig = field(default_factory=VideoConfig)  # task "video" only
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # [lora] rank > 0: train adapters on the --init model
    # [textual_inversion] a token: learn its embedding on the --init model
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)  # [dreambooth] an instance prompt: on
    distill: DistillConfig = field(default_factory=DistillConfig)  # [distill] steps > 0: a consistency student
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)  # which backbone: [unet] or [dit]
    dit: DiTConfig = field(default_factory=DiTConfig)  # denoiser.kind = "dit" only

    @property
    def backbone(self) -> UNetConfig | DiTConfig:
        """The configuration of the backbone denoiser.kind names (both have in/out channels, num_classes,
        context_dim and factor)."""
        return self.dit if self.denoiser.kind == "dit" else self.unet

    def with_backbone(self, cfg: UNetConfig | DiTConfig) -> "DenoiserRun":
        """This run with `cfg` as its backbone's configuration."""
        return dataclasses.replace(self, **{"dit" if isinstance(cfg, DiTConfig) else "unet": cfg})


DISTRIBUTED = ("auto", "ddp", "fsdp", "none")  # the values of TrainConfig.distributed
TRAINABLE = ("auto", "backbone", "backbone+text", "temporal")  # the values of TrainConfig.trainable
TASK_NAMES: list[str] = []  # the values of DenoiserRun.task: filled by the task registry (ldmkit/tasks/) as it loads


# --- serving ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # the address to listen on; anything but loopback needs keys (no --no-auth)
    port: int = bounded(8000, Bound(0, 65535, integer=True))
    models: tuple[str, ...] = ()  # shipped model names or model files; () = every shipped generation model
    database: str = ""  # keys and audit: a SQLite path or postgresql:// URL; "" = $LDMKIT_HOME/ldmkit.db
    device: str = "auto"
    max_batch: int = bounded(16, Bound(1, 256, integer=True))  # images per forward pass, from one request or several
    # how long the oldest queued request waits for others to share its pass
    max_wait_ms: float = bounded(25.0, Bound(0, 10_000))
    queue_images: int = bounded(64, COUNT)  # images that may wait; more gets 429 with Retry-After
    timeout_s: float = bounded(300.0, POSITIVE)  # a request still unanswered after this gets 504
    jobs_kept: int = bounded(200, COUNT)  # finished native jobs kept in memory for GET /v1/jobs/{id}
    policy: str = ""  # a policy.toml whose rules refuse prompts (read at start); "" = no content policy
    watermark: bool = True  # hide each request's id in its images' pixels (a policy's [provenance] overrides it)
    # outputs per model in the rolling Frechet distance of /metrics; 0 = no monitor
    monitor_window: int = bounded(256, OPTIONAL_COUNT)
    c2pa_cert: str = ""  # a PEM certificate chain: sign every output PNG with C2PA content credentials; "" = none
    c2pa_key: str = ""  # the PEM private key of c2pa_cert's first certificate
    loras: str = ""  # the folder of the LoRAs requests may name (and nothing outside it); "" = no LoRAs
    # "ROLE:PATTERN" entries: a role named here may use only the LoRAs matching its patterns (e.g. "user:styles/*");
    # a role not named may use every LoRA of the folder
    lora_roles: tuple[str, ...] = ()
    # the folder of the ControlNets requests may name (A1111's alwayson_scripts.controlnet); "" = no ControlNets
    controlnets: str = ""
    # what every request's sampling steps compute in, as the image commands' --precision (runtime.sampling_dtype):
    # fp32; bf16 (autocast; refused at start where the device has no native bf16); auto (bf16 where native)
    precision: str = bounded("fp32", Bound(choices=SAMPLING_PRECISIONS))
    # what runs plain generations' denoiser on the CPU, as generate's --backend: torch, or openvino (exported and
    # compiled at start; requests with LoRAs or ControlNets, and edits, still run in torch, never batched with these)
    backend: str = bounded("torch", Bound(choices=BACKENDS))


@dataclass(frozen=True)
class ServeLimits:
    max_n: int = bounded(8, Bound(1, 256, integer=True))  # images per request
    max_steps: int = bounded(100, Bound(1, 10_000, integer=True))  # sampling steps
    max_side: int = bounded(1024, COUNT)  # pixels per side of a generated image
    max_pixels: int = bounded(512 * 512, COUNT)  # pixels of one generated image (width x height)
    max_prompt_chars: int = bounded(2000, COUNT)  # characters of a prompt or negative prompt
    max_upload_bytes: int = bounded(8 * 2**20, COUNT)  # a request body (uploaded images in base64 included)
    max_cfg: float = bounded(30.0, POSITIVE)  # guidance scale; larger values overflow float32 in some models
    max_frames: int = bounded(32, Bound(1, 256, integer=True))  # frames of a clip; each counts as an image


@dataclass(frozen=True)
class ServeRun:
    """`ldmkit serve --config serve.toml`: a [serve] table and a [limits] table."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    limits: ServeLimits = field(default_factory=ServeLimits)


# --- validation ---------------------------------------------------------------------------------------------------


def bounds(cls: type) -> dict[str, Bound]:
    """{numeric setting -> its allowed values} of a config dataclass, read from its fields (each declared once, where
    the field is); tests check that every int and float setting has one."""
    return {f.name: f.metadata["bound"] for f in dataclasses.fields(cls) if "bound" in f.metadata}


# settings that no longer exist: still accepted (and ignored) so that files written before their removal load.
# (train.num_workers was here while nothing read it; it is back, and the files that carry it load as they are.)
RETIRED: dict[type, set[str]] = {}


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check_bounds(cfg, where: str):
    for name, bound in bounds(type(cfg)).items():
        value = getattr(cfg, name)
        items = value if isinstance(value, tuple) else (value,)
        if all(bound.admits(v) for v in items):
            continue
        if not all(bound.choices or math.isfinite(v) for v in items):
            raise ConfigError(f"{_key(where, name)} = {value!r} is not a finite number; use {bound.describe()}")
        every = "every entry must be" if isinstance(value, tuple) else "use"
        raise ConfigError(f"{_key(where, name)} = {value!r} is out of range; {every} {bound.describe()}")


def _check_levels(cfg, where: str):
    """Autoencoder and U-Net: at least one level; U-Net attention levels and per-level heads match the levels."""
    if not cfg.channel_mult:
        raise ConfigError(f"{_key(where, 'channel_mult')} = () is empty; give at least one level, e.g. 1,2,2")
    if not isinstance(cfg, UNetConfig):
        return
    n = len(cfg.channel_mult)
    if any(level >= n for level in cfg.attention_levels):
        raise ConfigError(
            f"{_key(where, 'attention_levels')} = {cfg.attention_levels!r} names a level the U-Net "
            f"does not have; with {n} entries in channel_mult use levels 0 to {n - 1}"
        )
    if len(cfg.num_heads) not in (1, n):
        raise ConfigError(f"{_key(where, 'num_heads')} = {cfg.num_heads!r} must be one value or one per level ({n})")


def _check_dit(cfg: DiTConfig, where: str):
    """A known preset (or all four sizes given), heads that divide the width, a width the positions can use."""
    if cfg.preset and cfg.preset not in DIT_PRESETS:
        raise ConfigError(
            f"{_key(where, 'preset')} = {cfg.preset!r} is not a DiT preset; use one of {', '.join(DIT_PRESETS)} "
            f'(or "" and set depth, hidden_size, num_heads and patch_size)'
        )
    missing = [n for n, v in zip(("depth", "hidden_size", "num_heads", "patch_size"), cfg.size()) if not v]
    if missing:
        raise ConfigError(
            f"{_key(where, 'preset')} is empty, so {', '.join(_key(where, n) for n in missing)} must be set "
            f"(above 0); or pick a preset such as S/2"
        )
    _, width, heads, _ = cfg.size()
    if width % heads:
        raise ConfigError(
            f"{_key(where, 'hidden_size')} = {width} is not divisible by {_key(where, 'num_heads')} = {heads}; "
            f"change one of them (e.g. hidden_size {width // heads * heads or heads})"
        )
    if width % 4:
        raise ConfigError(
            f"{_key(where, 'hidden_size')} = {width} is not a multiple of 4, which the 2-D sine-cosine positions "
            f"need; use {width // 4 * 4 or 4} or {width // 4 * 4 + 4}"
        )


def _check_diffusion(cfg: DiffusionConfig, where: str):
    if cfg.sigma_max <= cfg.sigma_min:
        raise ConfigError(
            f"{_key(where, 'sigma_max')} = {cfg.sigma_max!r} must be larger than "
            f"{_key(where, 'sigma_min')} = {cfg.sigma_min!r}"
        )


def _check_train(cfg: TrainConfig, where: str):
    if len(cfg.adam_betas) != 2:
        raise ConfigError(
            f"{_key(where, 'adam_betas')} = {cfg.adam_betas!r} must be two values (beta1, beta2), e.g. 0.9,0.999"
        )
    if cfg.trainable not in TRAINABLE:
        raise ConfigError(
            f"{_key(where, 'trainable')} = {cfg.trainable!r} is not known; use one of {', '.join(TRAINABLE)}"
        )
    if cfg.distributed not in DISTRIBUTED:
        raise ConfigError(
            f"{_key(where, 'distributed')} = {cfg.distributed!r} is not known; use one of {', '.join(DISTRIBUTED)}"
        )
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"{_key(where, 'batch_size')} = {cfg.batch_size} is not a multiple of "
            f"{_key(where, 'grad_accum')} = {cfg.grad_accum}; make the batch size a multiple of it, "
            f"e.g. {cfg.batch_size // cfg.grad_accum * cfg.grad_accum or cfg.grad_accum}"
        )


def _check_denoiser_run(cfg: DenoiserRun, where: str):
    """The backbone and the task are known (the task registry, ldmkit/tasks/, names the tasks once loaded), and an
    upscaler's schedule and default noise level are ones it can use."""
    if cfg.control.condition not in CONDITIONS:
        raise ConfigError(
            f"{_key(where, 'control.condition')} = {cfg.control.condition!r} is not a condition; use "
            f"{' or '.join(CONDITIONS)} (e.g. --condition canny)"
        )
    if cfg.control.canny_low > cfg.control.canny_high:
        raise ConfigError(
            f"{_key(where, 'control.canny_low')} = {cfg.control.canny_low} is above {_key(where, 'control.canny_high')}"
            f" = {cfg.control.canny_high}; the low threshold must not exceed the high one"
        )
    if cfg.denoiser.kind not in BACKBONE_KINDS:
        raise ConfigError(
            f"{_key(where, 'denoiser.kind')} = {cfg.denoiser.kind!r} is not a backbone; use "
            f"{' or '.join(BACKBONE_KINDS)} (e.g. --set denoiser.kind=dit --set dit.preset=S/2)"
        )
    if TASK_NAMES and cfg.task not in TASK_NAMES:
        raise ConfigError(
            f"{_key(where, 'task')} = {cfg.task!r} is not a task; use {' or '.join(TASK_NAMES)} (e.g. --task inpaint)"
        )
    up = cfg.upscale
    if up.schedule not in ("linear", "scaled_linear", "cosine"):
        raise ConfigError(
            f"{_key(where, 'upscale.schedule')} = {up.schedule!r} is not a schedule; use linear, scaled_linear "
            f"or cosine"
        )
    if up.noise_level > up.max_noise_level:
        raise ConfigError(
            f"{_key(where, 'upscale.noise_level')} = {up.noise_level} is above {_key(where, 'upscale.max_noise_level')}"
            f" = {up.max_noise_level}, a level the model never saw in training; use at most {up.max_noise_level}"
        )


# checks across the settings of one dataclass, after each setting passed its own bound
CROSS_CHECKS = {
    DenoiserRun: _check_denoiser_run,
    AutoencoderConfig: _check_levels,
    UNetConfig: _check_levels,
    DiTConfig: _check_dit,
    DiffusionConfig: _check_diffusion,
    TrainConfig: _check_train,
}


def validate(cfg, where: str = ""):
    """Raise ConfigError (naming the dotted key, the value and the allowed range) for any out-of-range setting of
    `cfg` or of the dataclasses nested in it; `where` is cfg's own dotted name ("train" for a run's TrainConfig)."""
    _check_bounds(cfg, where)
    if type(cfg) in CROSS_CHECKS:
        CROSS_CHECKS[type(cfg)](cfg, where)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, _key(where, f.name))
    return cfg


# --- checks shared by training and sampling -----------------------------------------------------------------------


def check_multiple(what: str, value: int, factor: int, why: str) -> None:
    """InputError unless `value` (a size in pixels or latents, named `what`) is a multiple of `factor`; the message
    gives the reason (`why`) and the two nearest sizes that work."""
    if value % factor:
        sizes = dict.fromkeys(v for v in (value // factor * factor, (value // factor + 1) * factor) if v > 0)
        raise InputError(f"{what} {value} is not a multiple of {factor} ({why}); use {' or '.join(map(str, sizes))}")


# --- conversion ---------------------------------------------------------------------------------------------------


def to_dict(cfg) -> dict[str, Any]:
    """A nested dict of plain values (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(_coerce(item, v, where) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: {value!r} is not a boolean; use true or false")
        return bool(value)
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a valid {tp.__name__}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: {value!r} is not a whole number")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass `cls` from a (partial) nested dict and validate it; unknown keys and out-of-range values are
    errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in RETIRED.get(cls, ())}
    unknown = set(data) - names
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown setting {where + '.' if where else ''}{key}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return validate(cls(**kwargs), where)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.steps=10", "unet.channel_mult=1,2"]` -> nested dict of strings (coerced later by type)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=200")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value.strip()
    return out


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def load_run(cls, preset: str | None = None, overrides: list[str] | None = None):
    """A run config from a TOML preset (a name in ldmkit/presets or a path) plus dotted overrides."""
    data: dict[str, Any] = {}
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
            raise MissingFileError(f"config {preset!r} not found; give a .toml path or one of: {known}")
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML ({e}); fix the file, see https://toml.io") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)
