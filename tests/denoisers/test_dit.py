"""The DiT backbone: paper sizes, adaLN-Zero start, any latent size, text cross-attention, diffusers parity, and
`ldmkit train` / `ldmkit sample` end to end with denoiser.kind = dit."""

import json
from pathlib import Path

import pytest
import torch

from ldmkit.cli import main
from ldmkit.conditioning.types import Conditioning
from ldmkit.config import DenoiserRun, DiTConfig, load_run
from ldmkit.denoisers import build_backbone
from ldmkit.denoisers.dit import DiT
from ldmkit.errors import ConfigError, InputError
from ldmkit.interop.diffusers_dit import (
    dit_config_from_diffusers,
    dit_config_to_diffusers,
    dit_from_diffusers,
    dit_to_diffusers,
    write_diffusers_dit,
)
from ldmkit.ldm import LatentDiffusion
from ldmkit.pipelines.generate import generate
from ldmkit.pipelines.request import SampleRequest
from tests.tiny_sd import randomize, rel_err

TINY = dict(preset="", depth=2, hidden_size=32, num_heads=2, patch_size=2)


# --- the architecture -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_presets_have_the_papers_parameter_counts(name, millions):
    """Peebles & Xie 2023, Table 1 (class-conditional ImageNet 256, 4 latent channels, learned variance)."""
    with torch.device("meta"):
        dit = DiT(DiTConfig(preset=f"{name}/2", num_classes=1000, learned_sigma=True))
    count = sum(p.numel() for p in dit.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)


def test_presets_are_selected_from_the_command_line_and_fields_override_them():
    run = load_run(DenoiserRun, None, ["denoiser.kind=dit", "dit.preset=B/4", "dit.depth=3"])
    assert run.backbone is run.dit and run.dit.size() == (3, 768, 12, 4) and run.backbone.factor == 4
    assert load_run(DenoiserRun, None, []).backbone is not None and load_run(DenoiserRun).denoiser.kind == "unet"
    with pytest.raises(ConfigError, match=r"dit\.preset = 'M/2' is not a DiT preset; use one of S/2, S/4"):
        load_run(DenoiserRun, None, ["dit.preset=M/2"])
    with pytest.raises(ConfigError, match=r"dit\.hidden_size = 30 is not divisible by dit\.num_heads = 4"):
        load_run(DenoiserRun, None, ["dit.hidden_size=30", "dit.num_heads=4"])
    with pytest.raises(ConfigError, match=r"dit\.depth, dit\.patch_size must be set"):
        load_run(DenoiserRun, None, ["dit.preset=", "dit.hidden_size=32", "dit.num_heads=2"])
    with pytest.raises(ConfigError, match=r"denoiser\.kind = 'vit' is not a backbone; use unet or dit"):
        load_run(DenoiserRun, None, ["denoiser.kind=vit"])


def test_untrained_dit_predicts_zero_and_takes_any_multiple_of_the_patch():
    dit = DiT(DiTConfig(**TINY, num_classes=3))
    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    out = dit(x, torch.tensor([1.0, 900.0]), Conditioning(labels=torch.tensor([0, 3])))
    assert out.shape == (2, 4, 8, 6) and out.abs().max() == 0  # adaLN-Zero: every block starts as the identity
    randomize(dit)
    wide = dit(torch.randn(1, 4, 4, 10), torch.tensor(5.0))  # no labels: the null label
    assert wide.shape == (1, 4, 4, 10) and wide.abs().mean() > 0.1
    with pytest.raises(InputError, match="latent size 5x6 is not a multiple of the DiT's patch size 2"):
        dit(torch.randn(1, 4, 5, 6), torch.tensor(5.0))


def test_each_sample_is_its_own_in_a_batch_and_the_label_matters():
    dit = randomize(DiT(DiTConfig(**TINY, num_classes=3)))
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        batch = dit(x, t, Conditioning(labels=y))
        alone = dit(x[1:2], t[1:2], Conditioning(labels=y[1:2]))
        other = dit(x[1:2], t[1:2], Conditioning(labels=y[:1]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    assert rel_err(alone, other) > 1e-2


def test_text_dit_cross_attends_to_the_unmasked_tokens_only():
    dit = randomize(DiT(DiTConfig(**TINY, context_dim=8)))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 5, 8, generator=g)
    mask = torch.tensor([[True, True, True, False, False]])
    changed = ctx.clone()
    changed[:, 3:] = torch.randn(1, 2, 8, generator=g)  # only the masked tokens differ
    with torch.no_grad():
        a = dit(x, torch.tensor([300.0]), Conditioning(context=ctx, context_mask=mask))
        b = dit(x, torch.tensor([300.0]), Conditioning(context=changed, context_mask=mask))
        c = dit(x, torch.tensor([300.0]), Conditioning(context=changed))
    torch.testing.assert_close(a, b)
    assert rel_err(a, c) > 1e-3
    with pytest.raises(InputError, match="cross-attends to text but got no context"):
        dit(x, torch.tensor([300.0]))


def test_the_registry_builds_the_kind_the_run_names():
    run = load_run(DenoiserRun, None, ["denoiser.kind=dit", "dit.preset=S/8", "dit.depth=1"])
    assert isinstance(build_backbone(run), DiT) and build_backbone(run).patch == 8
    assert type(build_backbone(DenoiserRun())).__name__ == "UNet"


# --- diffusers parity -----------------------------------------------------------------------------------------------

BASE_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=3,
)
DIT_CONFIGS = {
    "base": {},
    "learned-sigma": dict(out_channels=8),  # as the original DiT-XL/2 checkpoints
    "patch-4": dict(patch_size=4, sample_size=16, num_layers=3),
    "paper-eps": dict(norm_eps=1e-6, num_attention_heads=4, attention_head_dim=8),
}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def make_dit(diffusers, name):
    """A random DiTTransformer2DModel whose blocks share one embedder copy, as converted DiT checkpoints do."""
    ref = randomize(diffusers.DiTTransformer2DModel(**{**BASE_DIT, **DIT_CONFIGS[name]}))
    state = ref.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if ".norm1.emb." in key and not key.startswith("transformer_blocks.0."):
                value.copy_(state["transformer_blocks.0." + key.split(".", 2)[2]])
    return ref


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_forward_matches_diffusers(diffusers, name, scale):
    """At the model's sample_size and at twice it (where both spread the positions over the trained grid)."""
    ref = make_dit(diffusers, name)
    ours = dit_from_diffusers(ref)
    side = ref.config.sample_size * scale
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=g)
    t, y = torch.tensor([3.0, 801.0]), torch.tensor([0, 3])  # 3: the null label
    with torch.no_grad():
        expected = ref(x, t, class_labels=y).sample[:, :4]  # a learned variance's channels are dropped here
        got = ours(x, t, Conditioning(labels=y))
    assert expected.abs().mean() > 0.1  # not trivially zero
    assert rel_err(expected, got) < 1e-5


@pytest.mark.parametrize("name", ["base", "learned-sigma"])
def test_dit_exports_to_diffusers_with_the_same_weights(diffusers, name, tmp_path):
    ref = make_dit(diffusers, name)
    ours = dit_from_diffusers(ref)
    back = dit_to_diffusers(ours)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    folder = write_diffusers_dit(ours, tmp_path / "dit")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    reread = diffusers.DiTTransformer2DModel.from_pretrained(folder).eval()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            reread(x, torch.tensor([40.0]), class_labels=torch.tensor([1])).sample[:, :4],
            ours(x, torch.tensor([40.0]), Conditioning(labels=torch.tensor([1]))),
        )
    assert torch.equal(dit_from_diffusers(folder).state_dict()["blocks.1.ada.weight"], ours.blocks[1].ada.weight)


def test_a_ldmkit_dit_goes_to_a_folder_and_back_without_diffusers(tmp_path):
    ours = randomize(DiT(DiTConfig(**TINY, num_classes=5, norm_eps=1e-6)))
    folder = write_diffusers_dit(ours, tmp_path / "dit", sample_size=8)
    again = dit_from_diffusers(folder)
    assert again.cfg.sample_size == 8 and again.cfg.num_classes == 5 and again.cfg.norm_eps == 1e-6
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # positions spread over 8 are the patch indices at size 8
        torch.testing.assert_close(again(x, torch.tensor([7.0, 70.0])), ours(x, torch.tensor([7.0, 70.0])))


def test_conversion_refuses_what_the_other_side_cannot_hold(diffusers):
    ref = randomize(diffusers.DiTTransformer2DModel(**BASE_DIT))  # each block its own embedder
    with pytest.raises(ValueError, match="transformer_blocks.1.norm1.emb.* differs from block 0's copy"):
        dit_from_diffusers(ref)
    with pytest.raises(ValueError, match="class-conditional only"):
        dit_config_to_diffusers(DiTConfig(**TINY))
    with pytest.raises(ValueError, match="no cross-attention"):
        dit_config_to_diffusers(DiTConfig(**TINY, num_classes=2, context_dim=8))
    with pytest.raises(ValueError, match="activation_fn='geglu' is not supported"):
        dit_config_from_diffusers({**BASE_DIT, "activation_fn": "geglu"})
    with pytest.raises(ValueError, match="out_channels=5 is not supported by ldmkit; use 4"):
        dit_config_from_diffusers({**BASE_DIT, "out_channels": 5})


# --- training and sampling end to end -------------------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs Debian's dataset-fashion-mnist (make test installs it)",
)
def test_ldmkit_train_and_sample_a_tiny_dit(capsys, tmp_path, tiny_ae):
    """A class-conditional flow DiT trained for a few steps by the CLI; the checkpoint reloads and samples."""
    out = tmp_path / "run"
    dit = ["dit.preset=S/2", "dit.depth=2", "dit.hidden_size=32", "dit.num_heads=2"]
    sets = ["denoiser.kind=dit", *dit, "diffusion.parameterisation=flow", "data.limit=48", "train.warmup_steps=1"]
    argv = ["train", "--autoencoder", str(tiny_ae), "--data", "fashion-mnist", "--resolution", "16", "--steps", "3"]
    argv += ["--batch-size", "8", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)

    ldm = LatentDiffusion.load(out / "model.safetensors")
    assert isinstance(ldm.unet, DiT) and ldm.num_classes == 10 and ldm.run.dit.in_channels == 2
    assert type(ldm.denoiser).__name__ == "FlowDenoiser"
    for sampler in ("flow_euler", "dpmpp_2m"):
        png = tmp_path / f"{sampler}.png"
        argv = ["sample", str(out / "model.safetensors"), "--n", "2", "--steps", "3", "--sampler", sampler]
        assert main(argv + ["--label", "3", "--out", str(png), "--quiet", "--device", "cpu"]) == 0
        assert png.is_file()
    with pytest.raises(InputError, match="--height 18 is not a multiple of 4 .*then the DiT by 2"):
        generate(ldm, SampleRequest(n=1, height=18))
