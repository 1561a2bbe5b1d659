"""LoRA and embedding files are written in one rename, readable as any file the process writes: safetensors'
save_file creates its files private (0o600), so a server running as another user could not read a LoRA that
training wrote, and a kill during the write left a truncated file in place of the last good one."""

import os

import pytest
import torch
from torch import nn

from ldmkit import checkpoint
from ldmkit.adapters import read_lora, save_lora
from ldmkit.adapters.embeddings import read_embedding, write_embedding
from ldmkit.nn.lora import LoRASet


def _lora():
    net = nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 6, 3))
    return LoRASet.for_modules(net, ["0", "1"], 2), net


def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_lora_file_gets_the_usual_permissions(tmp_path, layout):
    lora, net = _lora()
    path = save_lora(tmp_path / "l.safetensors", lora, net, layout)
    assert _mode(path) == checkpoint.file_mode()
    assert read_lora(path).layout == layout


def test_an_embedding_file_gets_the_usual_permissions(tmp_path):
    path = write_embedding(tmp_path / "e.safetensors", "<x>", torch.randn(2, 8))
    assert _mode(path) == checkpoint.file_mode() and read_embedding(path)[0] == "<x>"


def test_a_failed_write_leaves_the_last_good_lora(tmp_path, monkeypatch):
    lora, net = _lora()
    path = save_lora(tmp_path / "l.safetensors", lora, net)
    before = path.read_bytes()

    def dies(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x08\x00\x00")  # a partial file, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr("ldmkit.adapters.files.save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_lora(path, lora, net)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]
