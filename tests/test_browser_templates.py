"""Each template as the front end draws it: every node's title whole at the template's node sizes, not
cut short with an ellipsis (the front end cuts a title to the node's width less a title height on each
side; in the Vue renderer, the title element must not overflow)."""
from __future__ import annotations

import pytest

from test_browser import load, page, server  # noqa: F401  (fixtures)
from ui_workflows import UI_EXAMPLES, load_ui

pytestmark = pytest.mark.server

CUT_TITLES_JS = """() => {
    const ctx = document.createElement('canvas').getContext('2d');
    const cut = [];
    for (const node of app.graph.nodes) {
        const title = String(node.getTitle());
        ctx.font = node.titleFontStyle ?? `${LiteGraph.NODE_TEXT_SIZE}px ${LiteGraph.NODE_FONT}`;
        const width = ctx.measureText(title).width, room = node.size[0] - 2 * LiteGraph.NODE_TITLE_HEIGHT;
        if (width > room) cut.push(`${title}: ${Math.ceil(width)} px in ${room} px`);
        const element = document.querySelector(`[data-node-id="${node.id}"]`);  // Vue renderer
        for (const e of element ? element.querySelectorAll('*') : []) {
            if (e.children.length === 0 && e.textContent.trim() === title && e.scrollWidth > e.clientWidth + 1)
                cut.push(`${title}: its element overflows (${e.scrollWidth} px in ${e.clientWidth} px)`);
        }
    }
    return cut;
}"""


@pytest.mark.parametrize("name", list(UI_EXAMPLES))
def test_every_node_title_is_whole(server, page, name):
    load(page, load_ui(name))
    assert page.evaluate("app.graph.nodes.length") == len(load_ui(name)["nodes"])
    assert page.evaluate(CUT_TITLES_JS) == []
