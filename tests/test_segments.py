"""Sentence segmentation (SPEC §1 step 1)."""
from training.segments import normalize_prompt, pack_words, split_sentences


def test_splits_on_all_four_marks_and_gives_back_a_period():
    assert split_sentences("A red car. Is it fast? Yes! It is; very") == [
        "A red car.", "Is it fast.", "Yes.", "It is.", "very."
    ]


def test_no_punctuation_is_one_segment_and_empty_is_the_empty_prompt():
    assert split_sentences("a cat on a mat") == ["a cat on a mat."]
    assert split_sentences("") == [""]
    assert split_sentences("   \n\t ") == [""]


def test_marks_inside_words_numbers_and_weighting_do_not_split():
    text = "It is 3.5 m tall. (A dog. A cat:1.2) play. embedding:style.pt here... end"
    assert split_sentences(text) == ["It is 3.5 m tall.", "(A dog. A cat:1.2) play.", "embedding:style.pt here.", "end."]


def test_escaped_brackets_do_not_nest():
    assert split_sentences(r"a \(literal. b") == [r"a \(literal.", "b."]


def test_normalisation_straightens_quotes_and_collapses_whitespace():
    assert normalize_prompt("  “Hi”\n\n  there&amp;co ") == '"Hi" there&co'


def test_pack_words_keeps_whole_words_within_the_limit():
    count = lambda t: len(t.split())  # one token per word
    words = " ".join(f"w{i}" for i in range(200))
    pieces = pack_words(words, count, 75)
    assert [count(p) for p in pieces] == [75, 75, 50]
    assert " ".join(pieces) == words


def test_pack_words_keeps_a_weighting_group_whole():
    count = lambda t: len(t.split())
    text = "a b (c d e:1.2) f"
    assert pack_words(text, count, 3) == ["a b", "(c d e:1.2)", "f"]
