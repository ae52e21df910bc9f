"""The LongAlign Text Encode node in-process in ComfyUI: equal to the library, equal to the stock
node in native mode, robust to bad input."""
import pytest
import torch

from training.encode import SegmentOptions, encode_long_prompts

pytestmark = pytest.mark.comfyui  # the node on ComfyUI's CLIP in-process: rerun on every ComfyUI version

LONG = (
    "A “weathered” lighthouse stands on a cliff above a stormy sea. Waves crash against black rocks — "
    "spray rising high! Seagulls circle the lamp; its beam cuts through fog. A small red fishing boat, "
    "café lights and naïve paintings 🐟 line the harbour below. The sky is purple and grey at dusk."
)


@pytest.fixture(scope="module")
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()


def stock_encode(clip, text):
    import nodes as comfy_nodes

    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.mark.parametrize("text", ["a photo of a cat", LONG, "(red:1.3) car. blue sky"])
def test_native_split_with_no_length_equals_stock_clip_text_encode(node, tiny_clip_pair, text):
    _, clip = tiny_clip_pair
    (ours,) = node.encode(clip, text, "native", 0, "none", True)
    stock = stock_encode(clip, text)
    assert ours[0][0].shape == stock[0][0].shape
    torch.testing.assert_close(ours[0][0], stock[0][0])
    torch.testing.assert_close(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])


@pytest.mark.parametrize("options", [
    SegmentOptions(),
    SegmentOptions(token_length=0, pad="none"),
    SegmentOptions(token_length=60, keep_bos=False),
])
def test_node_equals_library_on_the_same_weights(node, tiny_clip_pair, options):
    hf_backend, clip = tiny_clip_pair
    (ours,) = node.encode(clip, LONG, options.split, options.token_length, options.pad, options.keep_bos)
    with torch.no_grad():
        library = encode_long_prompts([LONG], hf_backend, options)
    assert ours[0][0].shape == library.cond.shape
    torch.testing.assert_close(ours[0][0], library.cond, atol=1e-4, rtol=1e-4)


def test_weighting_syntax_keeps_its_comfyui_meaning(node, tiny_clip_pair):
    _, clip = tiny_clip_pair
    (plain,) = node.encode(clip, "a red car. a blue sky.", "sentences", 0, "none", True)
    (weighted,) = node.encode(clip, "a (red:1.5) car. a blue sky.", "sentences", 0, "none", True)
    assert plain[0][0].shape == weighted[0][0].shape
    diff = (plain[0][0] - weighted[0][0]).abs().amax(dim=-1)[0]
    assert diff[:4].amax() > 1e-3  # "a red car." segment changed
    assert diff[5:].amax() < 1e-5  # second segment untouched


@pytest.mark.parametrize("text", [
    "", "   \n\t  ", "x" * 20000, " ".join(["word"] * 400), " ".join(f"tok{i}" for i in range(300)) + ".",
    "Emoji 🐱🔥🌈 and ünïcödé — “quotes”.", "unbalanced ((brackets:1.2 here. and) more)) stuff",
    "(((((", "embedding:missing_name.pt and text.",
])
def test_bad_or_odd_input_gives_a_valid_conditioning(node, tiny_clip_pair, text):
    _, clip = tiny_clip_pair
    (cond,) = node.encode(clip, text, "sentences", 240, "mean", True)
    tensor = cond[0][0]
    assert tensor.shape == (1, 240, 768)
    assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_non_finite_prompt_weights_are_a_clear_error(node, tiny_clip_pair, weight):
    _, clip = tiny_clip_pair
    with pytest.raises(ValueError, match="non-finite"):
        node.encode(clip, f"a (red:{weight}) car.", "sentences", 240, "mean", True)


def test_missing_clip_is_a_clear_error(node):
    with pytest.raises(ValueError, match="clip input is None"):
        node.encode(None, "text", "sentences", 240, "mean", True)


def _position_modules(clip):
    return {id(m): m.position_embedding for m in clip.cond_stage_model.modules() if type(m).__name__ == "CLIPEmbeddings"}


def test_short_rows_leave_comfyui_clip_as_it_was_even_on_error(pack, tiny_clip_pair):
    _, clip = tiny_clip_pair
    backend_cls = pack.nodes.comfy_clip.ComfyClipBackend
    before = _position_modules(clip)
    backend = backend_cls(clip)
    rows = backend.tokenize("a cat.")
    hidden, _ = backend.encode(rows, rows[0].end + 1)
    assert hidden.shape[1] == rows[0].end + 1
    assert _position_modules(clip) == before

    class Boom(Exception):
        pass

    original = clip.encode_from_tokens
    clip.encode_from_tokens = lambda *a, **k: (_ for _ in ()).throw(Boom())
    try:
        with pytest.raises(Boom):
            backend.encode(rows, rows[0].end + 1)
    finally:
        del clip.encode_from_tokens
    assert clip.encode_from_tokens == original
    assert _position_modules(clip) == before


def test_node_loads_the_clip_as_often_as_the_stock_node(node, tiny_clip_pair, monkeypatch):
    """Counted at the CLIP object's own ``load_model`` (patch and place the weights), which every
    ComfyUI version's ``encode_from_tokens`` calls, whatever model-management function it uses."""
    _, clip = tiny_clip_pair
    node.encode(clip, LONG, "sentences", 240, "mean", True)  # the pad embedding: once per CLIP patch set
    loads = []
    original = clip.load_model
    monkeypatch.setattr(clip, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    stock_encode(clip, LONG)
    stock_loads = len(loads)
    loads.clear()
    node.encode(clip, LONG, "sentences", 240, "mean", True)
    assert stock_loads >= 1
    assert len(loads) == stock_loads


def test_short_rows_use_comfyui_patched_position_table(pack, tiny_clip_pair):
    """The table is cut inside the forward, after ComfyUI has applied the patches: a patch on the
    position table moves the short rows exactly as it moves full windows."""
    _, clip = tiny_clip_pair
    patched = clip.clone()
    key = "clip_l.transformer.text_model.embeddings.position_embedding.weight"
    patched.add_patches({key: (torch.randn(77, 768, generator=torch.Generator().manual_seed(1)),)}, 1.0)
    backend_cls = pack.nodes.comfy_clip.ComfyClipBackend
    results = []
    for c in (clip, patched):
        backend = backend_cls(c)
        rows = backend.tokenize("a red fox in the snow.")
        end = rows[0].end
        short, _ = backend.encode(rows, end + 1)
        full, _ = backend.encode(rows, backend.window)
        torch.testing.assert_close(short[:, :end], full[:, :end], atol=1e-5, rtol=1e-5)
        results.append(short[:, :end])
    assert (results[0] - results[1]).abs().max() > 1e-2


def test_pad_embedding_cache_follows_the_clip_weights(pack, tiny_clip_pair):
    from training.encode import pad_embedding

    _, clip = tiny_clip_pair
    backend_cls = pack.nodes.comfy_clip.ComfyClipBackend
    cached = backend_cls(clip).cached_pad_embedding()
    torch.testing.assert_close(cached, pad_embedding(backend_cls(clip)))
    patched = clip.clone()
    key = "clip_l.transformer.text_model.final_layer_norm.bias"
    patched.add_patches({key: (torch.full((768,), 0.5),)}, 1.0)
    moved = backend_cls(patched).cached_pad_embedding()
    assert (moved - cached).abs().max() > 0.1
    torch.testing.assert_close(backend_cls(clip).cached_pad_embedding(), cached)


def _random_comfy_clip(tokenizer_cls, model_cls, options):
    """A ComfyUI CLIP of the given family with 3-layer encoders and seeded random weights."""
    import comfy.sd
    import comfy.supported_models_base

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer_cls, model_cls),
                         model_options={**options, "dtype": torch.float32})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name or "norm" in name.split(".")[-2]:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("logit_scale"):
                continue
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return clip


_FAMILIES: dict = {}


def family(name: str):
    """``(name, clip, width, pooled width)`` of a small random SD2 or SDXL CLIP, built once."""
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip as sd2

    if name not in _FAMILIES:
        small = {"num_hidden_layers": 3}  # the penultimate layer must exist
        if name == "sd2":
            _FAMILIES[name] = name, _random_comfy_clip(sd2.SD2Tokenizer, sd2.SD2ClipModel, {"clip_h_model_config": small}), 1024, None
        else:
            clip = _random_comfy_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                                      {"clip_l_model_config": small, "clip_g_model_config": small})
            _FAMILIES[name] = name, clip, 768 + 1280, 1280
    return _FAMILIES[name]


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def family_clip(request, comfy):
    return family(request.param)


def test_sd2_and_sdxl_clips_encode_segments_and_match_stock_in_native_mode(node, family_clip):
    name, clip, width, pooled_width = family_clip
    (ours,) = node.encode(clip, LONG, "sentences", 240, "mean", True)
    cond, extras = ours[0]
    assert cond.shape == (1, 240, width) and torch.isfinite(cond).all()
    if pooled_width:
        assert extras["pooled_output"].shape == (1, pooled_width)
    (native,) = node.encode(clip, LONG, "native", 0, "none", True)
    stock = stock_encode(clip, LONG)
    torch.testing.assert_close(native[0][0], stock[0][0])
    # full windows and short rows give the same kept rows (CLIP is causal): compare against a
    # window-by-window encoding of the first sentence
    first = "A small red fishing boat rocks beside the old pier."
    (one,) = node.encode(clip, first, "sentences", 0, "none", True)
    full = clip.encode_from_tokens(clip.tokenize(first))
    n = one[0][0].shape[1]
    torch.testing.assert_close(one[0][0], full[:, :n], atol=1e-5, rtol=1e-5)


BATCH_TEXTS = [
    "A small red fishing boat rocks beside the old pier.",
    "The café’s naïve sign glows 🐟 at dusk.",
    "A (weathered:1.3) lighthouse on a cliff.",
    "Seagulls \\(three of them\\) circle the lamp.",
    "",
    " ".join(["A long list of harbour things: ropes, nets, buoys, crates, lanterns and old anchors."] * 7),
    "Fog rolls in.",
]


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_tokenize_batch_gives_what_clip_tokenize_gives_for_each_text(pack, tiny_clip_pair, name):
    """Plain sentences are tokenised together with ComfyUI's own tokenizers (one call per encoder);
    each row must equal ``clip.tokenize(sentence)`` token for token and weight for weight, with weighted,
    escaped, empty and over-long texts among them, and with a tokenizer option set."""
    clip = tiny_clip_pair[1] if name == "sd1" else family(name)[1]
    def check(backend, texts, alone):
        expected = [backend.tokenize(t) for t in texts]
        original, calls = backend.tokenize, []
        backend.tokenize = lambda t: calls.append(t) or original(t)
        assert backend.tokenize_batch(texts) == expected
        assert len(calls) == alone  # texts tokenised on their own, not together

    cls = pack.nodes.comfy_clip.ComfyClipBackend
    check(cls(clip), BATCH_TEXTS, 3)  # the weighted, the escaped and the over-long text
    check(cls(clip), BATCH_TEXTS[:2], 0)
    padded = clip.clone()
    padded.set_tokenizer_option("min_padding", 5)
    check(cls(padded), BATCH_TEXTS, len(BATCH_TEXTS))
