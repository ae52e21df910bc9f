"""The canvas search's words as a real server serves them in ``/object_info``: display names that hold
the main words on every version, and, from ComfyUI 0.30 (``search_aliases``), each node's aliases."""
from __future__ import annotations

import pytest

from comfy_matrix import comfyui_version
from conftest import comfyui_dir
from test_node_library import front_end_finds

pytestmark = pytest.mark.server
WORDS = {"long prompt": "LongAlignTextEncode", "best of": "LongAlignRankByReward", "reward": "LongAlignRankByReward",
         "LongAlign": "LongAlignLongSDLoader"}
ALIAS_WORDS = {"best of n": "LongAlignRankByReward", "long clip": "LongAlignTextEncode"}


def _served_aliases() -> bool:
    """Whether this ComfyUI serves ``search_aliases`` (0.30 and later)."""
    major, minor = (int(x) for x in comfyui_version(comfyui_dir()).split(".")[:2])
    return (major, minor) >= (0, 30)


def test_object_info_serves_the_search_words(comfy_server, pack):
    info = comfy_server.get("/object_info")
    for query, node_id in WORDS.items():
        assert front_end_finds(query, info[node_id]["name"], info[node_id]["display_name"]), query
    if not _served_aliases():
        assert all("search_aliases" not in info[k] for k in pack.nodes.SEARCH_ALIASES)
        return
    for node_id, words in pack.nodes.SEARCH_ALIASES.items():
        assert info[node_id]["search_aliases"] == words
    for query, node_id in ALIAS_WORDS.items():
        assert front_end_finds(query, node_id, info[node_id]["display_name"], tuple(info[node_id]["search_aliases"]))
