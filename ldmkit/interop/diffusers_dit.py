"""diffusers parity for the DiT: `DiTTransformer2DModel` <-> ldmkit's `DiT`, configuration and weights.

The two compute the same function block for block. Their layouts differ in one way: diffusers gives every block its
own copy of the noise-level and label embedders (`transformer_blocks.i.norm1.emb`), where the DiT paper and
ldmkit have one shared pair; converted DiT checkpoints hold the same copy in every block. Import takes block 0's
and refuses a model whose copies differ; export writes the shared pair into every block.

Calls correspond as `dit(x, t, class_labels=y).sample == ours(x, t, Conditioning(labels=y))` at the model's
sample_size (diffusers spreads the positions of other sizes over that grid; ldmkit does the same when
`DiTConfig.sample_size` is set, as on import). diffusers' DiT is class-conditional only, square and without text;
models outside that raise ValueError on export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_state
from ..config import DiTConfig, validate
from ..denoisers.dit import DiT
from ..errors import InputError
from .diffusers import WEIGHTS_STEM, _check_class, _config_and_state, _diffusers_model, versioned_config
from .diffusers_config import _check_options
from .files import write_model_folder
from .keymaps import Rule, translate

MODEL = "DiTTransformer2DModel"
DIT_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_eps": 1e-5,
}
# Options ldmkit's DiT does not implement, with the only value it accepts.
DIT_FIXED: dict[str, Any] = {
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
}
DIT_IGNORED = {"dropout", "norm_num_groups"}  # dropout is inactive at inference; norm_num_groups is unused there
EMB = "norm1.emb."  # each diffusers block's copy of the embedders, under transformer_blocks.i


def _unsupported(key: str, value, hint: str) -> ValueError:
    return InputError(f"{MODEL} option {key}={value!r} is not supported by ldmkit; {hint}")


# --- configuration --------------------------------------------------------------------------------------------------


def dit_config_from_diffusers(raw: dict[str, Any]) -> DiTConfig:
    """A `DiTTransformer2DModel` config dict -> DiTConfig (ValueError naming any option ldmkit cannot express).
    An out_channels of twice in_channels is the original DiT's learned variance (kept in the weights, dropped)."""
    _check_options(MODEL, raw, DIT_DEFAULTS, DIT_FIXED, DIT_IGNORED)
    c = {**DIT_DEFAULTS, **{k: v for k, v in raw.items() if k in DIT_DEFAULTS}}
    cin = c["in_channels"]
    cout = c["out_channels"] or cin
    if cout not in (cin, 2 * cin):
        raise _unsupported("out_channels", cout, f"use {cin} (in_channels) or {2 * cin} (with a learned variance)")
    classes = c["num_embeds_ada_norm"]
    if not classes:
        raise _unsupported("num_embeds_ada_norm", classes, "the DiT's adaLN-Zero needs a number of classes")
    cfg = DiTConfig(
        preset="",
        depth=c["num_layers"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        num_heads=c["num_attention_heads"],
        patch_size=c["patch_size"],
        in_channels=cin,
        out_channels=cin,
        num_classes=classes,
        learned_sigma=cout == 2 * cin,
        norm_eps=float(c["norm_eps"]),
        sample_size=c["sample_size"],
    )
    return validate(cfg, "dit")


def dit_config_to_diffusers(cfg: DiTConfig, sample_size: int | None = None) -> dict[str, Any]:
    """DiTConfig -> a `DiTTransformer2DModel` config dict (ValueError if diffusers cannot express the model).
    sample_size: the latent side written when cfg.sample_size is 0 (default 32, diffusers' own)."""
    depth, width, heads, patch = cfg.size()
    if not cfg.num_classes:
        raise InputError(
            "diffusers' DiTTransformer2DModel is class-conditional only; export a DiT with dit.num_classes > 0"
        )
    if cfg.context_dim:
        raise InputError(
            f"diffusers' DiTTransformer2DModel has no cross-attention; this DiT reads text (context_dim "
            f"{cfg.context_dim}); export a class-conditional DiT instead"
        )
    if cfg.mlp_ratio != 4:
        raise InputError(f"diffusers' DiT feed-forward is 4x wide; this one has mlp_ratio {cfg.mlp_ratio}")
    if cfg.sample_size and sample_size and sample_size != cfg.sample_size:
        raise InputError(
            f"sample_size {sample_size} differs from the DiT's own {cfg.sample_size}, on which its positions are "
            f"laid; leave sample_size out"
        )
    return {
        "_class_name": MODEL,
        **DIT_FIXED,
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels * (2 if cfg.learned_sigma else 1),
        "num_layers": depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "sample_size": cfg.sample_size or sample_size or 32,
        "patch_size": patch,
        "num_embeds_ada_norm": cfg.num_classes,
        "norm_eps": cfg.norm_eps,
    }


# --- weights --------------------------------------------------------------------------------------------------------


def dit_rules(cfg: DiTConfig) -> list[Rule]:
    """The block map of `DiT(cfg)` to diffusers' names (the embedders, shared here, are handled apart)."""
    block: tuple[tuple[str, str], ...] = (
        ("ada", "norm1.linear"),
        ("attn", "attn1"),
        ("to_out", "to_out.0"),
        ("ff_in", "ff.net.0.proj"),
        ("ff_out", "ff.net.2"),
    )
    rules = [("patch_embed", "pos_embed.proj", ()), ("final_ada", "proj_out_1", ()), ("final", "proj_out_2", ())]
    return rules + [(f"blocks.{i}", f"transformer_blocks.{i}", block) for i in range(cfg.size()[0])]


def _embedder_keys(cfg: DiTConfig) -> dict[str, str]:
    """Our shared embedder keys -> their names inside a block's `norm1.emb`."""
    layers = [f"{n}.{p}" for n in ("linear_1", "linear_2") for p in ("weight", "bias")]
    keys = {f"time_mlp.{k}": f"timestep_embedder.{k}" for k in layers}
    if cfg.num_classes:
        keys["class_emb.weight"] = "class_embedder.embedding_table.weight"
    return keys


def dit_to_layout(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> diffusers' names, the shared embedders copied into every block."""
    shared = _embedder_keys(cfg)
    out = translate({k: v for k, v in state.items() if k not in shared}, dit_rules(cfg), what="DiT")
    for i in range(cfg.size()[0]):
        out |= {f"transformer_blocks.{i}.{EMB}{theirs}": state[ours].clone() for ours, theirs in shared.items()}
    return out


def dit_from_layout(state: dict[str, torch.Tensor], cfg: DiTConfig, source: str = "") -> dict[str, torch.Tensor]:
    """diffusers' DiT state dict -> our names; CheckpointError when the blocks' embedder copies differ."""
    shared = _embedder_keys(cfg)
    first = {ours: f"transformer_blocks.0.{EMB}{theirs}" for ours, theirs in shared.items()}
    missing = [k for k in first.values() if k not in state]
    if missing:
        raise CheckpointError(f"{source or 'state dict'}: missing DiT embedder weights {', '.join(missing[:4])}")
    out = {ours: state[key] for ours, key in first.items()}
    for key, value in state.items():
        if f".{EMB}" not in key:
            continue
        block, rest = key.split(f".{EMB}", 1)
        ours = {theirs: o for o, theirs in shared.items()}.get(rest)
        if ours is None or not torch.equal(value, out[ours]):
            raise CheckpointError(
                f"{source or 'state dict'}: {key} differs from block 0's copy; ldmkit's DiT shares one noise-level "
                f"and label embedder between blocks (as the DiT paper), so it cannot hold this model"
            )
    rest = {k: v for k, v in state.items() if f".{EMB}" not in k}
    return out | translate(rest, dit_rules(cfg), reverse=True, source=source, what="DiT")


# --- models and folders ---------------------------------------------------------------------------------------------


def dit_state_from_diffusers(
    config: dict[str, Any], state: dict[str, torch.Tensor], source: str = ""
) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """A DiTTransformer2DModel's (config, state dict) -> (DiTConfig, our state dict)."""
    _check_class(config, MODEL, source or "config")
    cfg = dit_config_from_diffusers(config)
    return cfg, dit_from_layout(state, cfg, source)


def dit_from_diffusers(x, *, unsafe_pickle: bool = False) -> DiT:
    """diffusers DiTTransformer2DModel (object or save_pretrained folder) -> ldmkit DiT with the same weights, in
    eval mode. diffusers' class count N is ours (label N is the null label in both)."""
    config, state, source = _config_and_state(x, MODEL, unsafe_pickle)
    cfg, ours = dit_state_from_diffusers(config, state, source)
    dit = DiT(cfg)
    load_state(dit, ours, source, "DiT")
    return dit.eval()


def _dit_export(dit: DiT, sample_size: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return dit_config_to_diffusers(dit.cfg, sample_size), dit_to_layout(dit.state_dict(), dit.cfg)


def write_diffusers_dit(dit: DiT, path: str | Path, *, sample_size: int | None = None) -> Path:
    """ldmkit DiT -> a DiTTransformer2DModel save_pretrained folder at `path`; diffusers is not needed.
    sample_size: the latent side recorded when the DiT has none of its own (see `dit_config_to_diffusers`)."""
    config, state = _dit_export(dit, sample_size)
    return write_model_folder(path, WEIGHTS_STEM, versioned_config(config), state)


def dit_to_diffusers(dit: DiT, *, sample_size: int | None = None):
    """ldmkit DiT -> a diffusers `DiTTransformer2DModel` with the same weights (needs diffusers installed; to write
    the folder without it, use `write_diffusers_dit`)."""
    config, state = _dit_export(dit, sample_size)
    return _diffusers_model(MODEL, config, state)
