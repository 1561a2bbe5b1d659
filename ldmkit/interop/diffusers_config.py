"""Configuration translation between diffusers' `config.json` files and ldmkit's dataclasses.

Covers `UNet2DConditionModel` (every option Stable Diffusion 1.x / 2.x and their inpainting variants use),
`AutoencoderKL`, and the noise-schedule part of a scheduler config. An option ldmkit's networks cannot express
raises ValueError naming the option and its value. Plain dicts in, plain dicts out: diffusers is never imported.
"""

from __future__ import annotations

from typing import Any

from ..config import AutoencoderConfig, DiffusionConfig, UNetConfig, UpscaleConfig
from ..diffusion.lowres import LEVELS as LOW_RES_LEVELS
from ..errors import InputError

# diffusers' defaults, for configs written by older versions that omit newer keys.
UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "num_class_embeds": None,
    "upcast_attention": False,
    "sample_size": None,
}
# Options ldmkit's U-Net does not implement, with the only value it accepts.
UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
UNET_IGNORED = {"addition_embed_type_num_heads"}  # only read when an unsupported option above is set

VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "mid_block_add_attention": True,
}
VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
VAE_IGNORED = {"force_upcast"}  # ldmkit always decodes in float32

PREDICTION = {"epsilon": "eps", "v_prediction": "v"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


# what each converter accepts, for its error messages
SCOPE = {
    "": "only models built like Stable Diffusion 1.x / 2.x can be converted",
    "DiTTransformer2DModel": "only DiTs built as Peebles & Xie's (adaLN-Zero, tanh GELU) can be converted",
}


def _unsupported(model: str, key: str, value, hint: str = "") -> ValueError:
    return InputError(
        f"{model} option {key}={value!r} is not supported by ldmkit"
        + (f"; {hint}" if hint else "")
        + f"; {SCOPE.get(model, SCOPE[''])}"
    )


def _check_options(model: str, cfg: dict, defaults: dict, fixed: dict, ignored: set):
    """Every key must be known; every unsupported option must hold its one accepted value."""
    for key, value in cfg.items():
        if key.startswith("_") or key in ignored or key in defaults:
            continue
        if key not in fixed:
            if value in (None, False):
                continue
            raise InputError(
                f"{model} option {key}={value!r} is unknown to ldmkit; it cannot tell whether the "
                f"weights still mean the same; remove the option if it is inert"
            )
        accepted = fixed[key]
        if isinstance(value, (list, tuple)) and not isinstance(accepted, (list, tuple)):
            if any(v != accepted for v in value):
                raise _unsupported(model, key, value, f"every entry must be {accepted!r}")
        elif value != accepted and not (accepted is None and value is False and key.endswith("only_cross_attention")):
            raise _unsupported(model, key, value, f"it must be {accepted!r}")


def _uniform(model: str, key: str, value, n: int):
    """An int, or a per-block list whose entries are all equal."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(map(str, value))) != 1:
            raise _unsupported(model, key, list(value), f"ldmkit needs one value for all {n} blocks")
        value = value[0]
    if isinstance(value, (list, tuple)):  # e.g. nested transformer_layers_per_block
        raise _unsupported(model, key, value, "ldmkit needs one int")
    return value


def _mult(model: str, channels: list[int]) -> tuple[int, ...]:
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported(
            model, "block_out_channels", list(channels), f"every entry must be a multiple of the first ({base})"
        )
    return tuple(c // base for c in channels)


# --- U-Net ----------------------------------------------------------------------------------------------------------


def unet_config_from_diffusers(raw: dict[str, Any]) -> UNetConfig:
    """A `UNet2DConditionModel` config dict -> UNetConfig (ValueError naming any option ldmkit cannot express).

    diffusers' `attention_head_dim` is, for these models, the number of heads (a historical misnomer); an int
    applies to every block, a list gives one count per down block (the middle block uses the last).
    """
    m = "UNet2DConditionModel"
    _check_options(m, raw, UNET_DEFAULTS, UNET_FIXED, UNET_IGNORED)
    c = {**UNET_DEFAULTS, **{k: v for k, v in raw.items() if k in UNET_DEFAULTS}}
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    n = len(down)
    for key, kinds, types in (
        ("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"), down),
        ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"), up),
    ):
        bad = [t for t in types if t not in kinds]
        if bad or len(types) != n:
            raise _unsupported(m, key, types, f"use {' / '.join(kinds)}, one per level")
    attn = tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    if tuple(n - 1 - i for i, t in enumerate(up) if t.startswith("CrossAttn"))[::-1] != attn:
        raise _unsupported(
            m,
            "up_block_types",
            up,
            f"ldmkit needs attention at the same levels on the way up as on the way down ({down})",
        )
    if c["mid_block_type"] != "UNetMidBlock2DCrossAttn":  # UNetMidBlock2D has one residual block here, not two
        raise _unsupported(m, "mid_block_type", c["mid_block_type"], "use UNetMidBlock2DCrossAttn")
    heads = c["attention_head_dim"]
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,)
    if len(heads) not in (1, n):
        raise _unsupported(m, "attention_head_dim", list(heads), f"give one value or one per down block ({n})")
    if c["norm_num_groups"] is None:
        raise _unsupported(m, "norm_num_groups", None, "ldmkit's U-Net uses GroupNorm")
    num_classes = c["num_class_embeds"] or 0
    if num_classes == 1:
        raise _unsupported(m, "num_class_embeds", 1, "ldmkit reserves one embedding as the null label, so it needs 2+")
    context = _uniform(m, "cross_attention_dim", c["cross_attention_dim"], n)
    return UNetConfig(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        model_channels=c["block_out_channels"][0],
        channel_mult=_mult(m, list(c["block_out_channels"])),
        num_res_blocks=_uniform(m, "layers_per_block", c["layers_per_block"], n),
        attention_levels=attn,
        num_heads=heads,
        head_dim=0,
        transformer_depth=_uniform(m, "transformer_layers_per_block", c["transformer_layers_per_block"], n),
        context_dim=context or 0,
        num_classes=max(num_classes - 1, 0),
        use_linear_projection=bool(c["use_linear_projection"]),
        upcast_attention=bool(c["upcast_attention"]),
        mid_attention=True,
        norm_groups=c["norm_num_groups"],
        norm_eps=float(c["norm_eps"]),
        dropout=float(c["dropout"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]),
    )


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """UNetConfig -> a `UNet2DConditionModel` config dict (ValueError if diffusers cannot express it)."""
    n = len(cfg.channel_mult)
    if cfg.channel_mult[0] != 1:
        raise InputError(
            f"channel_mult={cfg.channel_mult} starts with {cfg.channel_mult[0]}; diffusers' U-Net "
            f"needs the first level at model_channels, so set channel_mult[0] = 1"
        )
    attn = set(cfg.attention_levels)
    if not cfg.mid_attention:
        raise InputError(
            "this U-Net has no transformer in its middle block (mid_attention=False); diffusers' "
            "UNet2DConditionModel has no middle block of two residual blocks alone"
        )
    if not cfg.context_dim:
        raise InputError(
            "this U-Net has self-attention only (context_dim=0); diffusers' UNet2DConditionModel always "
            "adds cross-attention to its attention blocks, so it cannot hold these weights"
        )
    heads = [cfg.heads_at(i) for i in range(n)]
    out = {"_class_name": "UNet2DConditionModel", **UNET_DEFAULTS, **UNET_FIXED}
    out.update(
        sample_size=sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=_plain_number(cfg.freq_shift),
        down_block_types=["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))],
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        dropout=cfg.dropout,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )
    return out


def _plain_number(x: float):
    return int(x) if float(x).is_integer() else x


# --- autoencoder ----------------------------------------------------------------------------------------------------


def vae_config_from_diffusers(raw: dict[str, Any]) -> AutoencoderConfig:
    """An `AutoencoderKL` config dict -> AutoencoderConfig (kind "kl"); force_upcast is ignored (ldmkit always
    decodes in float32)."""
    m = "AutoencoderKL"
    _check_options(m, raw, VAE_DEFAULTS, VAE_FIXED, VAE_IGNORED)
    c = {**VAE_DEFAULTS, **{k: v for k, v in raw.items() if k in VAE_DEFAULTS}}
    n = len(c["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(c[key]) != [kind] * n:
            raise _unsupported(m, key, list(c[key]), f"use {kind} for each of the {n} levels")
    if c["out_channels"] != c["in_channels"]:
        raise _unsupported(m, "out_channels", c["out_channels"], f"ldmkit decodes to in_channels ({c['in_channels']})")
    return AutoencoderConfig(
        kind="kl",
        in_channels=c["in_channels"],
        base_channels=c["block_out_channels"][0],
        channel_mult=_mult(m, list(c["block_out_channels"])),
        num_res_blocks=c["layers_per_block"],
        latent_channels=c["latent_channels"],
        mid_attention=bool(c["mid_block_add_attention"]),
        norm_groups=c["norm_num_groups"],
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=float(c["shift_factor"] or 0.0),
    )


def vae_config_to_diffusers(cfg: AutoencoderConfig, sample_size: int | None = None) -> dict[str, Any]:
    """AutoencoderConfig (kind "kl") -> an `AutoencoderKL` config dict."""
    if cfg.kind != "kl":
        raise InputError(
            f"a {cfg.kind!r} autoencoder has no diffusers AutoencoderKL equivalent; only KL "
            f"autoencoders (kind='kl') can be exported"
        )
    n = len(cfg.channel_mult)
    out = {"_class_name": "AutoencoderKL", **VAE_DEFAULTS, **VAE_FIXED, "force_upcast": False}
    out.update(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=sample_size or VAE_DEFAULTS["sample_size"],
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor or None,
        mid_block_add_attention=cfg.mid_attention,
    )
    return out


# --- scheduler ------------------------------------------------------------------------------------------------------


def diffusion_config_from_scheduler(raw: dict[str, Any], prediction: str | None = None) -> DiffusionConfig:
    """The training noise schedule in a diffusers scheduler config -> DiffusionConfig (eps or v)."""
    name = raw.get("_class_name", "scheduler")
    if raw.get("trained_betas") is not None:
        raise _unsupported(name, "trained_betas", "[...]", "ldmkit builds betas from beta_schedule")
    pred = raw.get("prediction_type", "epsilon")
    if pred not in PREDICTION:
        raise _unsupported(name, "prediction_type", pred, "use epsilon or v_prediction")
    sched = raw.get("beta_schedule", "linear")
    if sched not in BETA_SCHEDULES:
        raise _unsupported(name, "beta_schedule", sched, f"use one of {', '.join(BETA_SCHEDULES)}")
    return DiffusionConfig(
        parameterisation=prediction or PREDICTION[pred],
        schedule=BETA_SCHEDULES[sched],
        num_timesteps=int(raw.get("num_train_timesteps", 1000)),
        beta_start=float(raw.get("beta_start", 0.0001)),
        beta_end=float(raw.get("beta_end", 0.02)),
        zero_terminal_snr=bool(raw.get("rescale_betas_zero_snr", False)),
    )


def diffusion_config_to_scheduler(cfg: DiffusionConfig) -> dict[str, Any]:
    """DiffusionConfig (eps or v) -> a DDIMScheduler config with Stable Diffusion's inference settings."""
    pred = {v: k for k, v in PREDICTION.items()}
    if cfg.parameterisation not in pred:
        raise InputError(
            f"parameterisation {cfg.parameterisation!r} has no diffusers scheduler equivalent; only "
            f"discrete-time eps and v models can be exported"
        )
    sched = {v: k for k, v in BETA_SCHEDULES.items()}[cfg.schedule]
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": sched,
        "num_train_timesteps": cfg.num_timesteps,
        "prediction_type": pred[cfg.parameterisation],
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


# --- an upscaler's noise augmentation ---------------------------------------------------------------------------------


def upscale_config_from_scheduler(raw: dict[str, Any], max_noise_level: int, factor: int) -> UpscaleConfig:
    """An upscale pipeline's low_res_scheduler config and max_noise_level -> UpscaleConfig (default noise level 20,
    diffusers' default, or less when the model allows less)."""
    d = diffusion_config_from_scheduler(raw)
    if d.num_timesteps != LOW_RES_LEVELS:
        name = raw.get("_class_name", "low_res_scheduler")
        raise _unsupported(
            name, "num_train_timesteps", d.num_timesteps, f"ldmkit augments over {LOW_RES_LEVELS} levels"
        )
    level = int(max_noise_level)
    return UpscaleConfig(
        factor=factor,
        max_noise_level=level,
        noise_level=min(20, level),
        schedule=d.schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
    )


def upscale_config_to_scheduler(up: UpscaleConfig) -> dict[str, Any]:
    """UpscaleConfig -> the DDPMScheduler config diffusers' upscale pipeline noises its input with."""
    sched = {v: k for k, v in BETA_SCHEDULES.items()}[up.schedule]
    return {
        "_class_name": "DDPMScheduler",
        "beta_start": up.beta_start,
        "beta_end": up.beta_end,
        "beta_schedule": sched,
        "num_train_timesteps": LOW_RES_LEVELS,
        "clip_sample": False,
        "prediction_type": "epsilon",
        "trained_betas": None,
        "variance_type": "fixed_small",
    }
