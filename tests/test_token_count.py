"""The token counter's wording (``TokenCount.summary``, the lines the front end shows): it cannot be
misread, an empty prompt included; and the window it counted with."""
from __future__ import annotations

import pytest

from training.clip_text import TransformersClipBackend, clip_tokenizer
from training.encode import SegmentOptions
from training.token_count import count_tokens


@pytest.fixture(scope="module")
def backend():
    return TransformersClipBackend(clip_tokenizer(), text_encoder=None)  # tokenising only


@pytest.mark.parametrize("options, first", [
    (SegmentOptions(), "empty prompt: 1 token (the start token) · L = 240"),
    (SegmentOptions(token_length=0), "empty prompt: 1 token (the start token)"),
    (SegmentOptions(split="native", token_length=77), "empty prompt: 77 tokens (one empty window) · L = 77"),
], ids=["sentences", "L0", "native"])
def test_an_empty_prompt_reads_right(backend, options, first):
    count = count_tokens("", backend, options)
    assert count.summary()[0] == first
    assert "all 1 tokens" not in " ".join(count.summary())


def test_the_lines_say_what_is_kept_of_how_many_the_segments_and_the_cut(backend):
    two = count_tokens("A cat. A dog.", backend, SegmentOptions(token_length=0))
    assert two.summary() == ["8 tokens · 2 segments · L = 0: natural length, nothing cut", "per segment: 4 + 4"]
    assert count_tokens("A cat. A dog.", backend).summary()[0] == "all 8 tokens kept (L = 240) · 2 segments"
    cut = count_tokens("A cat. A dog.", backend, SegmentOptions(token_length=5))
    assert cut.summary()[0] == "5 of 8 tokens kept · 2 segments · the rest is cut"
    one = count_tokens("cat", backend, SegmentOptions(token_length=0))  # "cat." : BOS, "cat", "."
    assert one.summary()[0] == "3 tokens · 1 segment · L = 0: natural length, nothing cut"


def test_the_answer_carries_the_lines_and_the_window(backend):
    answer = count_tokens("A cat.", backend).as_dict()
    assert answer["summary"] == ["all 4 tokens kept (L = 240) · 1 segment", "per segment: 4"]
    assert answer["window"] == 77
