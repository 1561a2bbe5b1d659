import functools
import os
import tempfile

import pytest
import torch

from tests.factory import attention_unet, save_tiny_ldm, tiny_autoencoder_run, tiny_denoiser_run

# Keep caches of tests out of the user's home and make CPU runs deterministic and light.
os.environ.setdefault("LDMKIT_CACHE", tempfile.mkdtemp(prefix="ldmkit-test-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


class TensorDataset(torch.utils.data.Dataset):
    """Items in ldmkit's data set format from a tensor of images in [-1, 1]."""

    def __init__(self, images, labels=None, captions=None, class_names=()):
        self.images, self.labels, self.caps = images, labels, captions
        self.class_names = list(class_names)
        self.captions = captions

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {
            "image": self.images[i],
            "label": int(self.labels[i]) if self.labels is not None else -1,
            "caption": self.caps[i] if self.caps else "",
            "index": i,
        }


@pytest.fixture
def blobs():
    """64 tiny 16x16 grayscale images of two classes (a bright square top-left or bottom-right)."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(64, 1, 16, 16)
    labels = torch.arange(64) % 2
    for i in range(64):
        o = int(torch.randint(0, 3, (1,), generator=g))
        if labels[i] == 0:
            x[i, :, 1 + o : 7 + o, 1 + o : 7 + o] = 1
        else:
            x[i, :, 8 - o : 14 - o, 8 - o : 14 - o] = 1
    return TensorDataset(x, labels, class_names=["top-left", "bottom-right"])


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory):
    """A 2-step trained f=2 KL autoencoder checkpoint for 16x16 grayscale images."""
    from ldmkit.autoencoder import build_autoencoder
    from ldmkit.autoencoder.files import save_autoencoder

    run = tiny_autoencoder_run()
    torch.manual_seed(0)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    path = tmp_path_factory.mktemp("ae") / "autoencoder.safetensors"
    return save_autoencoder(path, build_autoencoder(run.model), run, TensorDataset(images), 0)


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory, tiny_ae):
    """An untrained but complete class-conditional model (2 classes) on the tiny autoencoder."""
    run = tiny_denoiser_run(
        tiny_ae,
        unet=attention_unet(in_channels=2, out_channels=2, num_classes=2),
        class_names=("top-left", "bottom-right"),
    )
    return save_tiny_ldm(tmp_path_factory.mktemp("ldm") / "model.safetensors", run)


@pytest.fixture(scope="session")
def tiny_text_ldm(tmp_path_factory, tiny_ae):
    """An untrained text-conditional model (small trainable text encoder) on the tiny autoencoder."""
    from ldmkit.conditioning.text import build_text_encoder

    run = tiny_denoiser_run(
        tiny_ae, unet=attention_unet(in_channels=2, out_channels=2, context_dim=32), text_encoder="trainable"
    )
    text = functools.partial(build_text_encoder, "trainable", dim=32, layers=1, heads=2, max_length=16)
    return save_tiny_ldm(tmp_path_factory.mktemp("t") / "model.safetensors", run, text=text)
