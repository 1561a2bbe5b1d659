import os
import tempfile

import pytest
import torch

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
        return {"image": self.images[i], "label": int(self.labels[i]) if self.labels is not None else -1,
                "caption": self.caps[i] if self.caps else "", "index": i}


@pytest.fixture
def blobs():
    """64 tiny 16x16 grayscale images of two classes (a bright square top-left or bottom-right)."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(64, 1, 16, 16)
    labels = torch.arange(64) % 2
    for i in range(64):
        o = int(torch.randint(0, 3, (1,), generator=g))
        if labels[i] == 0:
            x[i, :, 1 + o:7 + o, 1 + o:7 + o] = 1
        else:
            x[i, :, 8 - o:14 - o, 8 - o:14 - o] = 1
    return TensorDataset(x, labels, class_names=["top-left", "bottom-right"])
