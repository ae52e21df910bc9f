"""Property tests: whatever text and option values a graph holds, the encoder (library and node) and
the reward nodes either answer with finite tensors of the documented shapes or raise one of our own
clear errors (ValueError and its subclasses; FileNotFoundError for a named file), never anything else."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tiny_models import build_tiny_clipmodel
from training.encode import SegmentOptions, encode_long_prompts
from training.reward_models import load_reward_model

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUR_ERRORS = (ValueError, FileNotFoundError)
WIDTH = 768
ODD_SYNTAX = ["((a:1.2) b:", "(:)", "\\(", "\\)", "(", ")", "((((", "))))", "(a:)", "(a:1.2:3)", "(a:-2)",
              "(a:1e30)", "[a|b]", "{a|b}", "\\", ":", ",", ".", "!?", "embedding:", "embedding:nope",
              "embedding:../../x", "(" * 40, "😀", "\u200b", "\x00", "“quoted”", "—", "naïve"]
WORDS = st.sampled_from(["cat", "a red car", "sky.", "sea;", "(blue:1.3)", "light!"])

texts = st.one_of(
    st.text(max_size=300),  # any unicode
    st.lists(st.one_of(st.sampled_from(ODD_SYNTAX), WORDS, st.text(max_size=8)), max_size=30).map(" ".join),
    st.sampled_from(["", " ", "\n\n\n", "...", "。。。", "\t", "\x00", "\ud7ff" * 3]),
    st.builds(lambda unit, n: unit * n, st.sampled_from(["cat. ", "word ", "(red:1.5) ", "a, b; ", "x"]),
              st.integers(60, 200)),  # huge: hundreds of sentences, one endless sentence, one endless word
)


def check_our_error(error: Exception) -> None:
    event(f"refused: {type(error).__name__}: {str(error)[:60]}")
    assert isinstance(error, OUR_ERRORS), f"{type(error).__name__}: {error}"
    assert len(str(error)) > 10, repr(error)


# -- the encoder ----------------------------------------------------------------------------------

options = st.builds(SegmentOptions, split=st.sampled_from(["sentences", "native"]),
                    token_length=st.integers(0, 2000), pad=st.sampled_from(["mean", "none"]),
                    keep_bos=st.booleans())


def check_conditioning(cond: torch.Tensor, opts: SegmentOptions) -> None:
    assert cond.ndim == 3 and cond.shape[0] == 1 and cond.shape[2] == WIDTH, tuple(cond.shape)
    assert bool(torch.isfinite(cond).all())
    n, L = cond.shape[1], opts.token_length
    if L and opts.pad == "mean":
        assert n == L
    elif L:
        assert 1 <= n <= L
    else:
        assert n >= 1
        if opts.split == "native":
            assert n % 77 == 0


@FUZZ
@given(text=texts, opts=options)
def test_library_encoder_on_any_text_and_options(tiny_clip_pair, text, opts):
    backend, _ = tiny_clip_pair
    try:
        with torch.no_grad():
            result = encode_long_prompts([text], backend, opts)
    except Exception as e:  # noqa: BLE001  (the property: only our errors)
        check_our_error(e)
        return
    check_conditioning(result.cond, opts)
    assert result.kept_tokens[0] >= 1
    if not opts.token_length:
        assert result.cond.shape[1] == result.kept_tokens[0]


@FUZZ
@given(text=texts, opts=options)
def test_encode_node_on_any_text_and_options(pack, tiny_clip_pair, text, opts):
    _, clip = tiny_clip_pair
    node = pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()
    try:
        with torch.inference_mode():  # as ComfyUI runs nodes
            (conditioning,) = node.encode(clip, text, opts.split, opts.token_length, opts.pad, opts.keep_bos)
    except Exception as e:  # noqa: BLE001
        check_our_error(e)
        return
    [[cond, extras]] = conditioning
    check_conditioning(cond, opts)
    pooled = extras["pooled_output"]
    assert tuple(pooled.shape) == (1, WIDTH) and bool(torch.isfinite(pooled).all())


@FUZZ
@given(split=st.text(max_size=12), token_length=st.integers(-10**6, 10**6), pad=st.text(max_size=12))
def test_out_of_range_options_are_refused_with_a_message(split, token_length, pad):
    valid = split in ("sentences", "native") and pad in ("mean", "none") and token_length >= 0
    try:
        SegmentOptions(split=split, token_length=token_length, pad=pad)
    except ValueError as e:
        assert not valid
        assert any(name in str(e) for name in ("split", "pad", "token_length")), str(e)
        return
    assert valid


# -- the reward nodes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_reward") / "tiny_denscore"
    build_tiny_clipmodel(str(folder))
    return load_reward_model(str(folder), "denscore")


@pytest.fixture(scope="module")
def reference_file(comfy, tmp_path_factory):
    """A prompt file in ComfyUI's input folder (a temporary one for this module): the only place,
    with the models folders, a node may read it from."""
    import folder_paths

    before = folder_paths.get_input_directory()
    folder = tmp_path_factory.mktemp("fuzz_input")
    (folder / "reference.txt").write_text("A cat on a mat.\nA dog in the fog. It rains.\n# a comment\n\nA red boat.\n",
                                          encoding="utf-8")
    folder_paths.set_input_directory(str(folder))
    yield "reference.txt"
    folder_paths.set_input_directory(before)


@st.composite
def comfy_images(draw):
    """ComfyUI IMAGE batches ``(B, H, W, C)`` in [0, 1], odd sizes and channel counts included."""
    b, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    c = draw(st.sampled_from([3, 3, 1, 4, 2]))
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))


def check_scores(values, batch: int) -> None:
    assert len(values) == batch and all(isinstance(v, float) and math.isfinite(v) for v in values), values


@settings(FUZZ, max_examples=60)
@given(images=comfy_images(), text=st.one_of(texts.filter(str.strip), texts), w=st.floats(0.0, 2.0),
       direction=st.sampled_from(["batch", "reference", "builtin"]),
       reference=st.sampled_from(["", "<file>", "<file>", "missing/prompts.txt", "../reference.txt", "/etc/passwd"])
       | st.text(max_size=20),
       score=st.sampled_from(["reweighted", "total", "text_relevant", "text_irrelevant"]), top_k=st.integers(1, 4096))
def test_reward_nodes_on_any_text_images_and_options(pack, reward_model, reference_file, images, text, w, direction,
                                                     reference, score, top_k):
    nodes = pack.NODE_CLASS_MAPPINGS
    reference = reference.replace("<file>", reference_file)
    try:
        with torch.inference_mode():
            out = nodes["LongAlignDecomposedRewardScore"]().score(images, reward_model, text, w, direction, reference)
            ranked = nodes["LongAlignRankByReward"]().rank(images, reward_model, text, w, direction, score, top_k, reference)
    except Exception as e:  # noqa: BLE001
        check_our_error(e)
        return
    total, relevant, irrelevant, reweighted, summary = out["result"]
    for values in (total, relevant, irrelevant, reweighted):
        check_scores(values, images.shape[0])
    for t, r, i, s in zip(total, relevant, irrelevant, reweighted):
        assert abs(t - (r + i)) < 1e-4 and abs(s - (r + w * i)) < 1e-4
    assert json.loads(summary)["w"] == w
    sorted_images, top, ranking, rejected, top_latent = ranked["result"]
    order = json.loads(ranking)["order"]
    assert sorted(order) == list(range(images.shape[0]))
    assert sorted_images.shape == images.shape and torch.equal(sorted_images, images[torch.tensor(order)])
    from comfy_execution.graph_utils import ExecutionBlocker

    kept = min(top_k, images.shape[0])
    assert top.shape == (kept, *images.shape[1:])
    if kept < images.shape[0]:
        assert rejected.shape == (images.shape[0] - kept, *images.shape[1:])
    else:
        assert isinstance(rejected, ExecutionBlocker)  # nothing rejected: the nodes after it are skipped
    assert isinstance(top_latent, ExecutionBlocker)  # no LATENT input: nothing to select
    check_scores(json.loads(ranking)["scores"], images.shape[0])
