"""Models read from files are built without drawing random weights first, in the loading thread only."""

import threading

import pytest
import torch

from ldmkit.nn.construct import without_init


def _net():
    return torch.nn.Sequential(
        torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 8, 3), torch.nn.LayerNorm(8)
    )


def test_building_inside_the_block_draws_no_random_numbers_and_outside_it_does():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with without_init():
        _net()
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn
    _net()
    assert not torch.equal(torch.get_rng_state(), before)


def test_another_thread_building_at_the_same_time_gets_its_random_weights():
    inside, done, weights = threading.Event(), threading.Event(), {}

    def loader():
        with without_init():
            inside.set()
            done.wait(10)

    t = threading.Thread(target=loader)
    t.start()
    assert inside.wait(10)
    torch.manual_seed(0)
    weights["other"] = torch.nn.Linear(64, 64).weight.detach().clone()
    done.set()
    t.join()
    torch.manual_seed(0)
    assert torch.equal(weights["other"], torch.nn.Linear(64, 64).weight)


def test_a_loaded_model_is_the_model_in_the_file_and_a_missing_weight_is_still_refused(tmp_path, tiny_ldm):
    from safetensors.torch import load_file, save_file

    from ldmkit.errors import CheckpointError
    from ldmkit.ldm import LatentDiffusion

    ldm = LatentDiffusion.load(tiny_ldm)
    state = load_file(str(tiny_ldm))
    for name, t in ldm.unet.state_dict().items():
        assert torch.equal(t, state[f"unet.{name}"].to(t.dtype)), name
    meta = __import__("safetensors").safe_open(str(tiny_ldm), "pt").metadata()
    first = next(k for k in state if k.startswith("unet."))
    del state[first]
    save_file(state, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=first.removeprefix("unet.")):
        LatentDiffusion.load(tmp_path / "cut.safetensors")
