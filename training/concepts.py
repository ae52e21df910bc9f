"""Noun-modifier groups of a prompt and their rows in the segment conditioning (CoMat's attribute
concentration, SPEC §6).

CoMat parses the prompt with spaCy ``en_core_web_trf`` and keeps, for every noun, the noun and its
modifiers (dependencies amod, nmod, compound, npadvmod, advmod, acomp and their conj), dropping
groups of 4 or more words. No spaCy model can be downloaded at run time here, and prompts for
text-to-image models are mostly flat noun phrases ("a fluffy white cat on a red wooden chair"), so
we use a **rule-based chunker** instead:

* a prompt is split into words and punctuation; closed-class words (determiners, numerals,
  pronouns, prepositions, conjunctions, auxiliaries and a short list of common verbs) and
  punctuation end a noun phrase;
* a noun phrase is a maximal run of the remaining (content) words; its last word is the head noun
  and the words before it are its modifiers (adjectives, colours, adverbs such as "very", compound
  nouns: spaCy's amod / advmod / compound); a run-final ``-ing`` / ``-ed`` word after another word is
  a verb or participle ("a dog running", "a man dressed") and is left out;
* colour/adjective runs joined by "and" / "or" to the next phrase are its conjoined modifiers
  ("a red and blue car" -> red, blue, car: spaCy's conj);
* groups of :data:`MAX_GROUP_WORDS` + 1 = 4 or more words are dropped, as the reference does; a
  bare noun is kept as a group of one (its attention map is concentrated on itself, as the
  reference's "single object" groups).

Not covered (a parser would be): predicative attributes across a verb ("the car is red"), of-phrases
(nmod, "a cup of coffee" gives two groups), numerals (the reference does not treat nummod as a
modifier either). Words are mapped to the CLIP token rows of the **segment conditioning**
(:func:`.encode.segment_rows`: every segment keeps its BOS row, EOS and padding are dropped, the
segments are concatenated), so a group's positions index the context the UNet attends to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .encode import SegmentOptions, TextEncoderBackend, segment_rows

MAX_GROUP_WORDS = 3
"""Groups of more words than this are dropped (reference: 4+ tokens)."""

DETERMINERS = frozenset(
    "a an the this that these those some any each every either neither no his her its their my your our "
    "another other such what which whose all both few many much several most more less one two three four five "
    "six seven eight nine ten eleven twelve dozen hundreds thousands".split())
PREPOSITIONS = frozenset(
    "in on at of with by under over behind beside besides near next to from into onto above below across "
    "through between among around inside outside against along for without like during beneath underneath "
    "toward towards upon within up down off out about after before past via atop amid".split())
CONJUNCTIONS = frozenset("and or but nor while as than so yet then".split())
PRONOUNS = frozenset("i me you he him she it we us they them who whom there here someone something".split())
VERBS = frozenset(
    "is are was were be been being am has have had do does did can could will would shall should may might "
    "must sits sit stands stand lies lie holds hold wears wear eats eat looks look walks walk runs run plays "
    "play rides ride flies fly jumps jump shows show features feature depicts depict contains contain made "
    "covered filled surrounded".split())
CLOSED_CLASS = DETERMINERS | PREPOSITIONS | CONJUNCTIONS | PRONOUNS | VERBS
COLOURS = frozenset(
    "red blue green yellow purple orange white black brown pink grey gray golden silver beige cyan magenta "
    "violet turquoise teal navy maroon crimson".split())
ADJECTIVES = COLOURS | frozenset(
    "big small large tiny huge little tall short long wide round square wooden metal metallic plastic glass "
    "old young new bright dark shiny fluffy furry soft hard striped spotted".split())
"""Words a conjunction may join as modifiers of the next phrase."""
ING_ED_NOUNS = frozenset(
    "building painting ceiling clothing wedding ring king wing thing string swing spring evening morning "
    "pudding stocking bed shed sled seed bread head thread reed weed steed".split())
"""Nouns that end like a verb form (-ing, -ed) and may end a phrase."""

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


@dataclass(frozen=True)
class ConceptGroup:
    """A head noun and its modifiers, as words in prompt order (the noun last)."""

    words: tuple[str, ...]

    @property
    def noun(self) -> str:
        return self.words[-1]


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (hyphenated words stay whole)."""
    return _WORD.findall(text.lower())


def _is_content(word: str) -> bool:
    return word[0].isalpha() and word not in CLOSED_CLASS


def _is_verb_form(word: str) -> bool:
    return len(word) > 4 and word.endswith(("ing", "ed")) and word not in ING_ED_NOUNS


def _runs(words: list[str]) -> list[tuple[list[int], bool]]:
    """Maximal runs of content-word indices, each with whether "and"/"or" joins it to the next run."""
    runs: list[tuple[list[int], bool]] = []
    current: list[int] = []
    for i, word in enumerate(words):
        if _is_content(word):
            current.append(i)
            continue
        if current:
            joined = word in ("and", "or") and i + 1 < len(words) and _is_content(words[i + 1])
            runs.append((current, joined))
            current = []
    if current:
        runs.append((current, False))
    return runs


def parse_groups(text: str, max_words: int = MAX_GROUP_WORDS) -> list[ConceptGroup]:
    """The noun-modifier groups of ``text`` (see the module docstring), as word tuples."""
    words = split_words(text)
    groups: list[ConceptGroup] = []
    pending: list[str] = []  # conjoined modifiers waiting for their head ("red and" blue car)
    for indices, joined in _runs(words):
        run = [words[i] for i in indices]
        while len(run) > 1 and _is_verb_form(run[-1]):
            run.pop()  # a verb or participle after the noun
        if joined and all(w in ADJECTIVES for w in run):
            pending.extend(run)
            continue
        group = pending + run
        pending = []
        if len(group) <= max_words:
            groups.append(ConceptGroup(tuple(group)))
    return groups


@dataclass(frozen=True)
class TokenGroup:
    """A :class:`ConceptGroup` located in the conditioning: ``positions[k]`` are the context rows of
    ``group.words[k]`` (a word may be several BPE pieces)."""

    group: ConceptGroup
    positions: tuple[tuple[int, ...], ...]

    @property
    def noun_positions(self) -> tuple[int, ...]:
        return self.positions[-1]

    @property
    def all_positions(self) -> tuple[int, ...]:
        return tuple(p for word in self.positions for p in word)


def _word_ids(backend: TextEncoderBackend, word: str) -> list[int]:
    row = backend.tokenize(word)[0]
    return list(row.payload[1: row.end])


def _locate(ids: list[int], piece: list[int], start: int) -> int:
    """First index >= ``start`` where ``piece`` occurs in ``ids``, or -1."""
    for i in range(start, len(ids) - len(piece) + 1):
        if ids[i: i + len(piece)] == piece:
            return i
    return -1


def token_groups(text: str, backend: TextEncoderBackend, options: SegmentOptions = SegmentOptions(),
                 max_words: int = MAX_GROUP_WORDS) -> list[TokenGroup]:
    """The groups of every segment of ``text`` with their rows in the conditioning that
    :func:`.encode.encode_long_prompts` builds with ``options`` (rows past ``token_length`` are cut,
    a group that loses a word to the cut is dropped). A word is found by its own BPE pieces, in
    order from the previous match (CLIP's BPE never merges across words, so a word's pieces are the
    same alone and in context)."""
    if options.split != "sentences":
        raise ValueError(f"concept groups need the 'sentences' split, got {options.split!r}")
    out: list[TokenGroup] = []
    offset = 0
    for segment, rows in segment_rows(text, backend, options.split):
        ids: list[int] = []
        positions: list[int] = []
        for row in rows:
            start = 0 if (offset == 0 or options.keep_bos) else 1
            ids.extend(row.payload[1: row.end])
            positions.extend(range(offset + 1 - start, offset + row.end - start))
            offset += row.end - start
        cursor = 0
        for group in parse_groups(segment, max_words):
            located = []
            for word in group.words:
                piece = _word_ids(backend, word)
                at = _locate(ids, piece, cursor) if piece else -1
                if at < 0:
                    break
                located.append(tuple(positions[at: at + len(piece)]))
                cursor = at + len(piece)
            limit = options.token_length or offset
            if len(located) == len(group.words) and all(p < limit for word in located for p in word):
                out.append(TokenGroup(group, tuple(located)))
    return out
