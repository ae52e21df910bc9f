"""The counter on a Long-CLIP in the browser: LongAlign Text Encode fed by a CLIP Loader holding a
Long-CLIP-L file (through CLIP Set Last Layer) counts with the file's 248-position window, as the
node encodes; unlinked, with CLIP's 77."""
from __future__ import annotations

import os

import pytest

from test_browser import page, server, visible_text  # noqa: F401  (fixtures)
from test_long_clip import FILE, POSITIONS, TEXT, write_long_clip

pytestmark = pytest.mark.server
COUNTER = "app.graph.getNodeById(id).widgets.find(w => w.name === 'longalign_counter').element"


def test_the_counter_counts_with_the_clip_loaders_long_clip_window(server, page):
    folder = os.path.join(server.base_dir, "models", "text_encoders")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, FILE)
    write_long_clip(path)
    try:
        status, expected = server.request("/longalign/tokenize", {"text": TEXT, "token_length": 0, "clip_name": FILE})
        assert status == 200 and expected["window"] == POSITIONS
        node_id = page.evaluate("""([name, text]) => {
            app.graph.clear();
            const add = (type, x) => { const n = LiteGraph.createNode(type); n.pos = [x, 120]; app.graph.add(n); return n; };
            const loader = add('CLIPLoader', 40), skip = add('CLIPSetLastLayer', 380), encoder = add('LongAlignTextEncode', 700);
            loader.widgets.find(w => w.name === 'clip_name').value = name;
            loader.connect(0, skip, 0);
            skip.connect(0, encoder, 0);
            encoder.widgets.find(w => w.name === 'text').value = text;
            encoder.widgets.find(w => w.name === 'token_length').value = 0;
            encoder.longalignRefreshCounter();
            return encoder.id;
        }""", [FILE, TEXT])
        page.wait_for_function(f"(id) => {COUNTER}.dataset.window === '{POSITIONS}'", arg=node_id, timeout=15_000)
        shown = page.evaluate(f"(id) => ({{...{COUNTER}.dataset}})", node_id)
        assert shown["kept"] == str(expected["kept_tokens"]) and shown["segments"] == str(len(expected["segments"]))
        assert visible_text(page, node_id, "longalign_counter") == expected["summary"]

        page.evaluate("(id) => app.graph.getNodeById(id).disconnectInput(0)", node_id)  # no CLIP Loader: CLIP's window
        page.wait_for_function(f"(id) => {COUNTER}.dataset.window === '77'", arg=node_id, timeout=15_000)
        assert int(page.evaluate(f"(id) => {COUNTER}.dataset.segments", node_id)) > len(expected["segments"])
    finally:  # the server is shared: other tests list text_encoders
        os.remove(path)
