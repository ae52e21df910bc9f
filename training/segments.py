"""Sentence segmentation of long prompts (LongAlign, SPEC §1 step 1).

A caption is split into sentences on ``. ? ! ;``; empty pieces are dropped and every piece gets a
trailing ``.`` back, as the reference does. Two deliberate differences from the reference:

* it splits on all four marks (the reference's regex only matches ``.`` and ``?``), and only where
  the mark ends a word (followed by whitespace, another mark or the end), so ``3.5``, ``e.g.`` and
  ``embedding:name.pt`` stay whole; marks inside ComfyUI weighting brackets ``( )`` never split;
* a sentence longer than the encoder's window (75 tokens for CLIP, 246 for Long-CLIP) is split at
  word boundaries instead of being truncated (:func:`pack_words`).
"""
from __future__ import annotations

import html
import re
from typing import Callable, Iterator

import ftfy

SENTENCE_MARKS = ".?!;"
_WHITESPACE = re.compile(r"\s+")
_PLAIN_ASCII = re.compile(r"[ -%'-~\t\n\r]*")
"""Printable ASCII without ``&`` and the usual whitespace: text that ``ftfy.fix_text`` leaves as it is
(beyond line breaks, which become spaces here anyway), so it is skipped."""


def normalize_prompt(text: str) -> str:
    """The one text normalisation applied before any tokenizer sees a prompt.

    Tokenizers disagree on typographic characters (open_clip's ftfy path straightens curly quotes,
    transformers' CLIPTokenizer may not), so node and trainer both normalise here first:
    HTML entities resolved, ``ftfy.fix_text`` (quotes, dashes, mojibake, NFC), whitespace collapsed.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    text = html.unescape(html.unescape(text))
    if not _PLAIN_ASCII.fullmatch(text):
        text = ftfy.fix_text(text)
    return _WHITESPACE.sub(" ", text).strip()


def _scanner(separator: str) -> re.Pattern:
    """A pattern matching an escaped character (ComfyUI's ``\\(`` literal-bracket syntax: never a
    separator or bracket), a bracket, or ``separator``."""
    return re.compile(r"\\.|[()]|" + separator, re.DOTALL)


_SENTENCE_ENDS = _scanner("[" + re.escape(SENTENCE_MARKS) + r"](?=\s|[" + re.escape(SENTENCE_MARKS) + r"]|$)")
"""A sentence mark that ends a word."""
_SPACES = _scanner(" ")


def _top_level(text: str, scanner: re.Pattern) -> Iterator[re.Match]:
    """The separators ``scanner`` finds in ``text`` outside ``( )`` weighting groups."""
    depth = 0
    for match in scanner.finditer(text):
        found = match.group()
        if found == "(":
            depth += 1
        elif found == ")":
            depth = max(depth - 1, 0)
        elif not found.startswith("\\") and depth == 0:
            yield match


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentence segments, each ending in ``.``.

    Text with no sentence mark is one segment; empty text gives ``[""]`` (the empty prompt, which
    the encoder turns into a lone BOS, as the reference does for a dropped caption).
    """
    text = normalize_prompt(text)
    pieces: list[str] = []
    start = 0
    for match in _top_level(text, _SENTENCE_ENDS):
        pieces.append(text[start:match.start()])
        start = match.end()
    pieces.append(text[start:])
    segments = [p.strip() + "." for p in pieces if p.strip(" " + SENTENCE_MARKS)]
    return segments or [text]


def _words(segment: str) -> list[str]:
    """Whitespace-separated words, with a bracketed weighting group kept as one word."""
    words: list[str] = []
    start = 0
    for match in _top_level(segment, _SPACES):
        if match.start() > start:
            words.append(segment[start:match.start()])
        start = match.end()
    if start < len(segment):
        words.append(segment[start:])
    return words


def pack_words(segment: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """Split a segment longer than ``max_tokens`` tokens greedily at word boundaries.

    Each piece holds as many whole words as fit in ``max_tokens``; a single word (or weighting
    group) longer than that stays one piece and is windowed by the encoder backend.
    """
    if count_tokens(segment) <= max_tokens:
        return [segment]
    pieces: list[str] = []
    current: list[str] = []
    used = 0
    for word in _words(segment):
        n = count_tokens(word)
        if current and used + n > max_tokens:
            pieces.append(" ".join(current))
            current, used = [], 0
        current.append(word)
        used += n
    if current:
        pieces.append(" ".join(current))
    return pieces
