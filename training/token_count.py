"""How a prompt will be segmented and how many conditioning rows it gives, without encoding it.

Tokenisation only: the same :func:`.encode.segment_rows` the encoder runs, on any
:class:`.encode.TextEncoderBackend` (its ``encode`` is never called), so the counts are exactly the
rows :func:`.encode.encode_long_prompts` keeps before cutting or padding to ``L``. Used by the
pack's ``/longalign/tokenize`` route (the live counter in the front end).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .encode import SegmentOptions, TextEncoderBackend, segment_rows


@dataclass(frozen=True)
class SegmentCount:
    text: str
    tokens: int
    """Rows this segment adds to the conditioning: BOS (when kept) and its content tokens; for
    ``native`` split, whole 77-token windows."""


@dataclass(frozen=True)
class TokenCount:
    segments: list[SegmentCount]
    total_tokens: int
    """Content tokens of the prompt (no BOS, EOS or padding)."""
    kept_tokens: int
    """Rows the segments give before truncation or padding (the natural length)."""
    token_length: int
    truncated: bool
    """True when ``token_length`` > 0 and the segments give more rows than that: the end is cut."""
    window: int
    """Positions of the encoder's window, BOS and EOS included: 77 for CLIP, 248 for Long-CLIP; a
    sentence longer than ``window - 2`` tokens is split at word boundaries."""

    def summary(self) -> list[str]:
        """The counter's two lines: the tokens kept of how many, the segment count and whether the
        rest is cut; then the tokens each segment gives."""
        n = len(self.segments)
        segments = f"{n} segment{'' if n == 1 else 's'}"
        L, kept = self.token_length, self.kept_tokens
        if self.total_tokens == 0:
            what = "the start token" if kept == 1 else "one empty window"  # sentences / native split
            first = f"empty prompt: {_tokens(kept)} ({what})" + (f" · L = {L}" if L > 0 else "")
        elif L <= 0:
            first = f"{_tokens(kept)} · {segments} · L = 0: natural length, nothing cut"
        elif self.truncated:
            first = f"{L} of {kept} tokens kept · {segments} · the rest is cut"
        else:
            first = f"all {kept} tokens kept (L = {L}) · {segments}"
        return [first, "per segment: " + " + ".join(str(s.tokens) for s in self.segments)]

    def as_dict(self) -> dict:
        """The fields, and ``summary``: the lines the front end's counter shows."""
        return {**asdict(self), "summary": self.summary()}


def _tokens(n: int) -> str:
    return f"{n} token{'' if n == 1 else 's'}"


def count_tokens(text: str, backend: TextEncoderBackend, options: SegmentOptions = SegmentOptions()) -> TokenCount:
    """Segments of ``text`` with the rows each contributes, as :func:`.encode.encode_long_prompts`
    would build them for ``options`` (``pad`` changes no count)."""
    segments: list[SegmentCount] = []
    total = 0
    first_row = True
    for segment, rows in segment_rows(text, backend, options.split):
        total += sum(row.end - 1 for row in rows)
        if options.split == "native":
            kept = backend.window * len(rows)
        else:  # every row keeps BOS, or only the prompt's first row does (keep_bos off)
            kept = sum(row.end for row in rows) - (0 if options.keep_bos else len(rows) - first_row)
        first_row = False
        segments.append(SegmentCount(segment, kept))
    kept_total = sum(s.tokens for s in segments)
    L = options.token_length
    return TokenCount(segments, total, kept_total, L, bool(L) and kept_total > L, backend.window)
