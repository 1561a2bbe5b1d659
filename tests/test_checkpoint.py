import pytest
import torch

from ldmkit import checkpoint
from ldmkit.autoencoder import build_autoencoder
from ldmkit.conditioning.types import Conditioning
from ldmkit.denoisers.unet import UNet
from tests.factory import attention_unet, tiny_autoencoder


def test_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = attention_unet(context_dim=8, num_classes=3)
    unet = UNet(cfg)
    for p in unet.parameters():  # zero-initialised layers would hide a loading bug
        torch.nn.init.normal_(p, std=0.05)
    path = checkpoint.save(tmp_path / "u.safetensors", unet.state_dict(), "unet", {"a": 1}, step=5)
    tensors, meta = checkpoint.load(path, "unet")
    assert meta["config"] == {"a": 1} and meta["step"] == 5
    other = UNet(cfg)
    checkpoint.load_state(other, tensors, path, "U-Net")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    cond = Conditioning(context=torch.randn(2, 5, 8), labels=torch.tensor([0, 3]))
    assert torch.equal(unet(x, t, cond), other(x, t, cond))
    assert unet(x, t, cond).abs().sum() > 0


def test_wrong_kind_missing_file_and_truncation(tmp_path):
    path = checkpoint.save(tmp_path / "a.safetensors", {"w": torch.ones(3)}, "autoencoder")
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'autoencoder' checkpoint, but a 'ldm'"):
        checkpoint.load(path, "ldm")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="cut.safetensors"):
        checkpoint.load(bad)


def test_mismatched_weights_name_the_keys(tmp_path):
    ae = build_autoencoder(tiny_autoencoder())
    state = ae.state_dict()
    state.pop("decoder.conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"missing keys: decoder.conv_out.bias.*unexpected keys: "
        r"extra.weight",
    ):
        checkpoint.load_state(ae, state, "x.safetensors", "autoencoder")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = checkpoint.save(tmp_path / "c.safetensors", {"w": torch.ones(2)}, "k")

    def boom(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(path, boom)
    assert torch.equal(checkpoint.load(path)[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_written_files_get_the_umask_permissions_not_the_temporary_files(tmp_path):
    """Checkpoints and PNGs are shared between users (a serving account reads what a training account wrote)."""
    import os

    from ldmkit.data.images import save_grid

    old = os.umask(0o022)
    try:
        ckpt = checkpoint.save(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, "unet")
        png = save_grid(torch.zeros(1, 1, 8, 8), tmp_path / "g.png")
        assert checkpoint.file_mode() == 0o644
        for path in (ckpt, png):
            assert os.stat(path).st_mode & 0o777 == 0o644, path
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    finally:
        os.umask(old)


def test_atomic_write_removes_stale_temporary_files_of_its_target_only(tmp_path):
    import os
    import time

    from ldmkit.checkpoint import STALE_TMP_AGE_S

    target = tmp_path / "c.safetensors"
    old = time.time() - STALE_TMP_AGE_S - 5
    orphan = tmp_path / ".c.safetensors.ab12cd34.tmp"  # left by a writer that crashed
    busy = tmp_path / ".c.safetensors.ef56gh78.tmp"  # a concurrent writer of the same target, still writing
    other = tmp_path / ".c.safetensors.x.ij90kl12.tmp"  # an old orphan of another target (c.safetensors.x)
    for p in (orphan, busy, other):
        p.write_bytes(b"partial")
    for p in (orphan, other):
        os.utime(p, (old, old))
    checkpoint.save(target, {"w": torch.ones(1)}, "k")
    assert not orphan.exists() and busy.exists() and other.exists()


def test_metadata_that_is_not_json_names_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "crafted.safetensors"
    save_file({"w": torch.ones(1)}, str(path), metadata={"format": "ldmkit", "kind": "ldm", "config": "{not json"})
    with pytest.raises(checkpoint.CheckpointError, match=r"crafted.safetensors.*config.*not valid JSON"):
        checkpoint.read_metadata(path)
