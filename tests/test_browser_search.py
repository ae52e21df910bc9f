"""The canvas search as a user meets it: double-click the empty canvas, type a word, read the list the
front end offers (its own search over /object_info: ids, display names, and from 1.58 the aliases)."""
from __future__ import annotations

import pytest

from test_browser import page, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.server
QUERIES = {
    "LongAlign": ["LongAlign Text Encode (long prompt)", "LongSD Loader (long prompt LoRAs)", "Rank By Reward (best of N)"],
    "long prompt": ["LongAlign Text Encode (long prompt)", "LongSD Loader (long prompt LoRAs)"],
    "best of": ["Rank By Reward (best of N)"],
    "reward": ["Reward Model Loader (LongAlign)", "Decomposed Reward Score (LongAlign)", "Rank By Reward (best of N)"],
}
ALIAS_QUERIES = {"long clip": "LongAlign Text Encode (long prompt)", "pickscore": "Reward Model Loader (LongAlign)"}
"""Words only a node's search aliases hold: found where the server serves them (ComfyUI 0.30) and the
front end searches them (1.58)."""


def offered(page, query: str) -> list[str]:
    """The search list's entries for ``query`` typed into the search box opened on the empty canvas."""
    page.evaluate("app.graph.clear()")
    box = page.locator("canvas#graph-canvas")
    box.dblclick(position={"x": 700, "y": 500})
    field = page.locator(".comfy-vue-node-search-box input, [role='dialog'] input[type='text']").first
    field.wait_for(state="visible", timeout=10_000)
    field.fill(query)
    page.wait_for_timeout(600)  # the box's debounce and search
    texts = page.evaluate("[...document.querySelectorAll('[role=\"option\"]')].map(o => o.innerText)")
    page.keyboard.press("Escape")
    return texts


@pytest.mark.parametrize("query", list(QUERIES))
def test_the_canvas_search_lists_the_right_nodes(server, page, query):
    texts = offered(page, query)
    for name in QUERIES[query]:
        assert any(name in t for t in texts), (query, name, texts[:12])


def test_search_aliases_are_found_where_served_and_searched(server, page):
    version = tuple(int(x) for x in page.evaluate("window.__COMFYUI_FRONTEND_VERSION__").split(".")[:2])
    served = "search_aliases" in server.get("/object_info")["LongAlignTextEncode"]
    for query, name in ALIAS_QUERIES.items():
        found = any(name in t for t in offered(page, query))
        assert found == (served and version >= (1, 58)), (query, version, served)
