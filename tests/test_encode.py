"""Segment-level encoding in the library, on a tiny transformers CLIPTextModel (SPEC §1 steps 2-4)."""
import pytest
import torch

from tiny_models import tiny_clip_text_model
from training.clip_text import TransformersClipBackend, clip_tokenizer
from training.encode import TOKENIZE_CHARS, SegmentOptions, encode_long_prompts, pad_embedding, segment_rows


class CountingBackend(TransformersClipBackend):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []
        self.tokenized = []

    def tokenize_batch(self, texts):  # tokenize(text) comes here too
        self.tokenized.extend(texts)
        return super().tokenize_batch(texts)

    def encode(self, rows, length):
        self.calls.append((len(rows), length))
        return super().encode(rows, length)


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    return CountingBackend(clip_tokenizer(), tiny_clip_text_model(num_layers=2))


def sentences(n):
    return " ".join(f"Sentence number {i} shows a small red house." for i in range(n))


@pytest.mark.parametrize("n", [1, 3, 12])
def test_shapes_for_1_3_and_12_segments(backend, n):
    result = encode_long_prompts([sentences(n)], backend, SegmentOptions(token_length=240))
    assert result.cond.shape == (1, 240, 768)
    assert len(result.segments[0]) == n
    assert torch.isfinite(result.cond).all()


def test_kept_rows_are_bos_and_content_of_each_segment_then_mean_pad(backend):
    text = "A cat sits. A dog runs far away."
    tok = backend.tokenizer
    segs = ["A cat sits.", "A dog runs far away."]
    ids = [tok(s)["input_ids"] for s in segs]  # [BOS, ..., EOS]
    with torch.no_grad():
        per_segment = [backend.text_encoder(torch.tensor([i])).last_hidden_state[0] for i in ids]
        empty = tok("", padding="max_length", max_length=77)["input_ids"]
        pad = backend.text_encoder(torch.tensor([empty])).last_hidden_state[0, -60:].mean(0)
        result = encode_long_prompts([text], backend, SegmentOptions(token_length=40))
    expected = torch.cat([h[:-1] for h in per_segment])  # drop each segment's EOS
    n = expected.shape[0]
    assert result.kept_tokens == [n]
    torch.testing.assert_close(result.cond[0, :n], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.cond[0, n:], pad.expand(40 - n, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pad_embedding(backend), pad, atol=1e-5, rtol=1e-5)


def test_all_segments_and_the_empty_prompt_go_through_one_forward(backend):
    backend.calls.clear()
    encode_long_prompts([sentences(5), sentences(2)], backend, SegmentOptions(token_length=240))
    assert backend.calls == [(5 + 2 + 1, 77)]
    backend.calls.clear()
    pad = pad_embedding(backend)
    backend.calls.clear()
    encode_long_prompts([sentences(5)], backend, SegmentOptions(token_length=240), pad=pad)
    assert len(backend.calls) == 1 and backend.calls[0][0] == 5 and backend.calls[0][1] < 77


def test_rows_past_L_are_not_encoded_and_output_is_cut_to_L(backend):
    backend.calls.clear()
    result = encode_long_prompts([sentences(40)], backend, SegmentOptions(token_length=30, pad="none"))
    assert result.cond.shape == (1, 30, 768)
    assert backend.calls[0][0] < 40


def test_keep_bos_off_drops_later_segments_bos(backend):
    text = "A cat sits. A dog runs."
    on = encode_long_prompts([text], backend, SegmentOptions(token_length=0, pad="none"))
    off = encode_long_prompts([text], backend, SegmentOptions(token_length=0, pad="none", keep_bos=False))
    assert on.kept_tokens[0] == off.kept_tokens[0] + 1


def test_zero_length_keeps_natural_length(backend):
    result = encode_long_prompts([sentences(3)], backend, SegmentOptions(token_length=0))
    assert result.cond.shape[1] == result.kept_tokens[0]


def test_native_split_keeps_whole_77_windows(backend):
    text = " ".join(["word"] * 100)
    result = encode_long_prompts([text], backend, SegmentOptions(split="native", token_length=0))
    assert result.cond.shape == (1, 154, 768)


def test_a_300_token_sentence_is_split_at_word_boundaries(backend):
    text = " ".join(f"tok{i % 10}" for i in range(150)) + "."  # one sentence, ~300 tokens
    pairs = list(segment_rows(text, backend))
    assert len(pairs) > 1 and all(len(rows) == 1 for _, rows in pairs)
    assert " ".join(seg for seg, _ in pairs).split() == text.split()


def test_sentences_past_L_are_neither_tokenised_nor_encoded(backend):
    """A 1000-token prompt at L = 77 costs the sentences that fill L (tokenised TOKENIZE_CHARS
    characters at a time), not the whole prompt (host time dominates the node on a GPU:
    bench/RESULTS.md)."""
    text = sentences(80)  # about 12 tokens each
    full = encode_long_prompts([text], backend, SegmentOptions(token_length=0, pad="none"))
    backend.tokenized.clear()
    cut = encode_long_prompts([text], backend, SegmentOptions(token_length=77))
    assert len(full.segments[0]) == 80
    n = len(cut.segments[0])
    assert cut.segments[0] == full.segments[0][:n] and n < 10  # ~10 rows a segment: L = 77 is full after 8
    # one tokenizer batch of about TOKENIZE_CHARS characters of sentences, and the empty prompt
    batch = [s for s in backend.tokenized if s]
    assert batch == full.segments[0][: len(batch)] and n < len(batch) < 80
    assert len(" ".join(batch)) <= TOKENIZE_CHARS + len(batch[-1])
    assert backend.tokenized.count("") == 1
    torch.testing.assert_close(cut.cond[0], full.cond[0, :77], rtol=1e-4, atol=1e-5)  # another batch shape


def test_batch_of_different_lengths_is_padded_to_L(backend):
    result = encode_long_prompts(["", "one.", sentences(20)], backend, SegmentOptions(token_length=77))
    assert result.cond.shape == (3, 77, 768)
    assert result.kept_tokens[0] == 1  # the empty prompt keeps its BOS only


def test_bad_arguments_give_clear_errors(backend):
    with pytest.raises(TypeError, match="sequence of prompts"):
        encode_long_prompts("a prompt", backend)
    with pytest.raises(ValueError, match="texts is empty"):
        encode_long_prompts([], backend)
    with pytest.raises(ValueError, match="token_length"):
        SegmentOptions(token_length=-1)
    with pytest.raises(ValueError, match="split"):
        SegmentOptions(split="words")
    with pytest.raises(ValueError, match="different lengths"):
        encode_long_prompts(["a.", sentences(3)], backend, SegmentOptions(token_length=0, pad="none"))
