"""What a user meets in the node library and the canvas search, in-process: one category scheme,
prefixed ids (old ids still load), search words that find the right nodes, display-ready
descriptions, a tooltip on every input and output, and device choices that exist."""
from __future__ import annotations

import re

import pytest
import torch

NODE_IDS = {
    "LongAlignTextEncode", "LongAlignRewardModelLoader", "LongAlignDecomposedRewardScore", "LongAlignRankByReward",
    "LongAlignLongSDLoader", "LongAlignT5AdapterLoader", "LongAlignTextEmbeddingInterpolate", "LongAlignTrainLoRA",
}
OLD_IDS = {"LongSDLoader": "LongAlignLongSDLoader", "T5AdapterLoader": "LongAlignT5AdapterLoader"}
FUSE_THRESHOLD, FUSE_DISTANCE = 0.3, 100
"""The node search of ComfyUI's front end (1.32.9, ``NodeSearchService``): Fuse.js over the keys
``name`` (the node id) and ``display_name`` (category and search aliases are not searched there),
threshold 0.3, extended search (every word of the query must match the same field), location 0 and
distance 100 (a word found at index i scores i / 100)."""


FRONT_ENDS = ["1.32.9", "1.58.1"]
"""1.58.1 searches a third key, ``search_aliases`` (each alias a value of its own), which ComfyUI 0.30
serves from a node's ``SEARCH_ALIASES``."""


def front_end_finds(query: str, node_id: str, display_name: str, aliases: tuple[str, ...] = ()) -> bool:
    """The exact-substring part of that search: every word of ``query`` occurs in one field,
    case-insensitive, early enough to score within the threshold. Deprecated nodes are hidden."""
    words = query.lower().split()
    for field in (node_id, display_name, *aliases):
        field = field.lower()
        if all(0 <= field.find(w) <= FUSE_THRESHOLD * FUSE_DISTANCE for w in words):
            return True
    return False


def search(pack, query: str, front_end: str = "1.32.9") -> set[str]:
    def aliases(cls) -> tuple[str, ...]:
        return tuple(getattr(cls, "SEARCH_ALIASES", ())) if front_end != "1.32.9" else ()

    return {node_id for node_id, cls in pack.NODE_CLASS_MAPPINGS.items()
            if not getattr(cls, "DEPRECATED", False)
            and front_end_finds(query, node_id, pack.NODE_DISPLAY_NAME_MAPPINGS[node_id], aliases(cls))}


def test_every_node_id_carries_the_pack_prefix_and_one_category_scheme(pack):
    current = {k for k, cls in pack.NODE_CLASS_MAPPINGS.items() if not getattr(cls, "DEPRECATED", False)}
    assert current == NODE_IDS
    categories = {pack.NODE_CLASS_MAPPINGS[k].CATEGORY for k in NODE_IDS}
    assert categories == {"LongAlign/conditioning", "LongAlign/loaders", "LongAlign/reward", "LongAlign/training"}


@pytest.mark.parametrize("old, new", sorted(OLD_IDS.items()))
def test_old_ids_still_load_as_deprecated_aliases(pack, old, new):
    alias, current = pack.NODE_CLASS_MAPPINGS[old], pack.NODE_CLASS_MAPPINGS[new]
    assert issubclass(alias, current) and alias.DEPRECATED is True and not getattr(current, "DEPRECATED", False)
    assert alias.INPUT_TYPES() == current.INPUT_TYPES() and alias.FUNCTION == current.FUNCTION
    assert alias.RETURN_TYPES == current.RETURN_TYPES and new in alias.DESCRIPTION
    assert old in pack.NODE_DISPLAY_NAME_MAPPINGS


def test_the_search_helper_agrees_with_what_the_front_end_missed_before():
    # before: "LongAlign" did not find the LongSD nodes, "best of" and "long prompt" found nothing
    assert not front_end_finds("longalign", "LongSDLoader", "LongSD Loader")
    assert not front_end_finds("best of", "LongAlignRankByReward", "Rank By Reward")
    assert not front_end_finds("long prompt", "LongAlignTextEncode", "LongAlign Text Encode")
    assert front_end_finds("rank reward", "X", "Rank By Reward")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("query, expected", [
    ("LongAlign", NODE_IDS),
    ("long prompt", {"LongAlignTextEncode", "LongAlignLongSDLoader"}),
    ("best of", {"LongAlignRankByReward"}),
    ("reward", {"LongAlignRewardModelLoader", "LongAlignDecomposedRewardScore", "LongAlignRankByReward"}),
    ("LongSD", {"LongAlignLongSDLoader", "LongAlignT5AdapterLoader"}),
])
def test_canvas_search_words_find_the_right_nodes(pack, query, expected, front_end):
    assert expected <= search(pack, query, front_end), (query, search(pack, query, front_end))
    if query != "LongAlign":
        assert search(pack, query, front_end) <= NODE_IDS


@pytest.mark.parametrize("query, expected", [
    ("best of n", {"LongAlignRankByReward"}),
    ("long clip", {"LongAlignTextEncode"}),
    ("pickscore", {"LongAlignRewardModelLoader"}),
    ("t5", {"LongAlignT5AdapterLoader"}),
    ("blend", {"LongAlignTextEmbeddingInterpolate"}),
])
def test_search_aliases_find_more_words_where_the_front_end_reads_them(pack, query, expected):
    assert search(pack, query, "1.58.1") == expected
    for node_id in NODE_IDS:  # what ComfyUI 0.30's /object_info serves as search_aliases
        words = pack.NODE_CLASS_MAPPINGS[node_id].SEARCH_ALIASES
        assert isinstance(words, list) and words and all(isinstance(w, str) and w.strip() for w in words)


def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.parametrize("node_id", sorted(NODE_IDS))
def test_description_is_written_for_display(pack, node_id):
    text = pack.NODE_CLASS_MAPPINGS[node_id].DESCRIPTION
    assert isinstance(text, str) and 80 <= len(text) <= 600
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    assert not re.search(r"\n[ \t]", text), "indented lines render as code blocks"
    assert text[0].isupper() and text.rstrip().endswith(".")


@pytest.mark.parametrize("node_id", sorted(NODE_IDS))
def test_every_input_and_output_has_a_tooltip(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    for name, spec in _inputs(cls).items():
        assert len(spec) > 1 and spec[1].get("tooltip", "").strip(), (node_id, name)
    tooltips = getattr(cls, "OUTPUT_TOOLTIPS", ())
    assert len(tooltips) == len(cls.RETURN_TYPES) and all(t.strip() for t in tooltips), node_id


def test_device_choices_are_the_devices_present(pack):
    devices = _inputs(pack.NODE_CLASS_MAPPINGS["LongAlignRewardModelLoader"])["device"][0]
    assert devices[:2] == ["auto", "cpu"]
    assert ("cuda" in devices) == torch.cuda.is_available()
    for device in devices[1:]:
        torch.empty(0, device=device)  # every choice is a device this machine has
