"""The caption reaches the image: a tiny text-conditional model learns which caption goes with which picture.

Two captions, two very different kinds of picture (a bright square in the top-left corner or in the bottom-right
one), written as an image folder with a metadata.jsonl. After a few hundred CPU steps, samples for each caption
must lie closer (in latent space, where the model works) to that caption's training latents than to the other
caption's; training again with the captions swapped must swap the outcome. An unconditional model, or one whose
cross-attention ignored the context, would give the same distances for both captions and fail both checks.
"""

import json

import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig, DenoiserRun, DiffusionConfig, TrainConfig, UNetConfig
from ldmkit.diffusion.sample import sample_latents
from ldmkit.ldm import LatentDiffusion
from ldmkit.noise import generators_from_seed
from ldmkit.training.runs import train_denoiser
from tests.factory import tiny_autoencoder_run

pytest.importorskip("sentence_transformers", reason="the minilm encoder needs `pip install '.[text]'`")
CAPTIONS = ("a red apple on a plate", "a snowy mountain at night")


def _folder(root, captions):
    """32 16x16 grayscale PNGs per caption: a bright 6x6 square near the top-left (caption 0) or bottom-right."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(64):
        kind = i % 2
        img = torch.zeros(16, 16, dtype=torch.uint8)
        o = int(torch.randint(0, 3, (1,), generator=g))
        if kind == 0:
            img[1 + o : 7 + o, 1 + o : 7 + o] = 255
        else:
            img[8 - o : 14 - o, 8 - o : 14 - o] = 255
        name = f"img{i:03d}.png"
        Image.fromarray(img.numpy(), "L").save(root / name)
        rows.append({"file_name": name, "text": captions[kind]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _autoencoder(path, data):
    """An untrained f=2 KL autoencoder with a (nearly) deterministic posterior, as a trained one has: the logvar
    half of its moments is pushed to the clamp, so latents carry the picture and not the posterior's noise."""
    from ldmkit.autoencoder import build_autoencoder
    from ldmkit.autoencoder.files import save_autoencoder
    from ldmkit.data import build_dataset

    run = tiny_autoencoder_run(data=dict(dataset=str(data), holdout=0))
    cfg = run.model
    torch.manual_seed(0)
    model = build_autoencoder(cfg)
    with torch.no_grad():
        model.quant_conv.weight[cfg.latent_channels :] = 0
        model.quant_conv.bias[cfg.latent_channels :] = -30.0
    return save_autoencoder(path, model, run, build_dataset(run.data), 0)


def _train(tmp_path, captions):
    (tmp_path / "data").mkdir()
    data = _folder(tmp_path / "data", captions)
    ae = _autoencoder(tmp_path / "autoencoder.safetensors", data)
    run = DenoiserRun(
        autoencoder=str(ae),
        text_encoder="minilm",
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_heads=(4,),
            norm_groups=8,
        ),
        diffusion=DiffusionConfig(parameterisation="v", schedule="cosine", min_snr_gamma=5.0),
        data=DataConfig(dataset=str(data), resolution=16, channels=1, holdout=0, caption_dropout=0.1),
        train=TrainConfig(
            steps=300,
            batch_size=32,
            lr=2e-3,
            warmup_steps=20,
            ema_decay=0.95,
            sample_every=0,
            ckpt_every=0,
            log_every=100,
            device="cpu",
        ),
    )
    out = train_denoiser(run, tmp_path / "run", progress=False)
    return LatentDiffusion.load(out["checkpoint"]), data


def _distances(ldm, data, captions):
    """d[i][j]: mean distance from samples for caption i to the mean training latent of caption j's images."""
    from ldmkit.data import build_dataset

    ds = build_dataset(DataConfig(dataset=str(data), resolution=16, channels=1, holdout=0))
    lat = {c: [] for c in captions}
    for i in range(len(ds)):
        item = ds[i]
        lat[item["caption"]].append(ldm.encode(item["image"][None])[0])
    centres = [torch.stack(lat[c]).mean(0) for c in captions]
    d = []
    for c in captions:
        z = sample_latents(
            ldm.denoiser,
            (8, *centres[0].shape),
            ldm.conditioning(prompts=[c] * 8),
            ldm.null_conditioning(8),
            sampler="dpmpp_2m",
            steps=20,
            cfg_scale=3.0,
            generator=generators_from_seed(1, 8),
        )
        d.append([float((z - m).flatten(1).norm(dim=1).mean()) for m in centres])
    return d


@pytest.mark.slow
def test_samples_follow_their_caption_and_swap_with_it(tmp_path_factory):
    for captions in (CAPTIONS, CAPTIONS[::-1]):
        ldm, data = _train(tmp_path_factory.mktemp("t2i"), captions)
        d = _distances(ldm, data, captions)
        # Each caption's samples must be measurably closer to its own images (margin 10% of the distance).
        assert d[0][0] < 0.9 * d[0][1], d
        assert d[1][1] < 0.9 * d[1][0], d
