"""Requests and folders built to freeze the server: ``/longalign/tokenize`` under abandoned large
requests, a full queue, a time limit, deeply nested JSON and brackets (in-process, with aiohttp's
test server and ComfyUI's real tokenizer), and model folders holding link loops (the listings
behind ``/object_info``)."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from training.folder_walk import walk_folder

ROUTE = "/longalign/tokenize"
SLOW_TEXT = "(red:1.1) word " * 16_000  # ~240 KB of weighted words, one sentence: tens of seconds of tokenizing
SLOW_SENTENCES = "(red:1.1) word. " * 15_000  # the same in short sentences: many short tokenizer calls
SMALL = {"text": "A cat."}


@pytest.fixture(scope="module")
def routes(pack):
    import importlib

    return importlib.import_module("comfyui_longalign.nodes.routes")


def _app(routes) -> web.Application:
    table = web.RouteTableDef()
    routes.register(table)
    app = web.Application(client_max_size=1024 * 1024)
    app.add_routes(table)
    return app


async def _abandon(port: int, body: bytes) -> None:
    """Send a whole request, then hang up without reading the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _post(session: aiohttp.ClientSession, server: TestServer, body: bytes) -> tuple[int, dict, float]:
    start = time.monotonic()
    async with session.post(server.make_url(ROUTE), data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(), time.monotonic() - start


async def _drained(lane, timeout: float) -> float:
    start = time.monotonic()
    while lane.admitted and time.monotonic() - start < timeout:
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _run(routes, scenario) -> None:
    async def main():
        async with TestServer(_app(routes)) as server, aiohttp.ClientSession() as session:
            await scenario(server, session)

    asyncio.run(main())


def test_small_requests_are_answered_promptly_while_four_abandoned_large_ones_run(routes):
    """Four ~240 KB requests whose clients hung up, then one whose client waits: the abandoned work is
    dropped (not run for minutes), and six-character requests sent meanwhile answer with p95 < 1 s."""
    large = routes.LANES["large"]
    dropped_before = large.dropped

    async def small_latencies(session, server, n: int) -> list[float]:
        out = []
        for _ in range(n):
            status, answer, seconds = await _post(session, server, json.dumps(SMALL).encode())
            assert status == 200 and answer["kept_tokens"] == 4, answer
            out.append(seconds)
        return out

    async def scenario(server, session):
        await small_latencies(session, server, 1)  # the small lane's tokenizer is built
        body = json.dumps({"text": SLOW_TEXT}).encode()
        await asyncio.gather(*(_abandon(server.port, body) for _ in range(4)))
        latencies = await small_latencies(session, server, 10)
        start = time.monotonic()
        while large.dropped - dropped_before < 4 and time.monotonic() - start < 10:
            await asyncio.sleep(0.05)
        assert large.dropped - dropped_before == 4  # the abandoned work, dropped instead of run to its end
        waiting = asyncio.ensure_future(_post(session, server, body))
        while not large.admitted:
            await asyncio.sleep(0.02)
        latencies += await small_latencies(session, server, 10)
        assert large.admitted == 1 and not waiting.done()  # the large count ran all along
        assert sorted(latencies)[18] < 1.0, latencies  # p95 of 20
        waiting.cancel()  # this client hangs up too: its work stops at the next tokenizer call
        assert await _drained(large, 10.0) < 10.0
        assert large.dropped - dropped_before == 5

    _run(routes, scenario)


def test_a_full_lane_answers_503_and_work_past_the_time_limit_is_dropped(routes, monkeypatch):
    large = routes.LANES["large"]
    monkeypatch.setattr(large, "capacity", 1)
    monkeypatch.setattr(routes, "TIME_LIMIT_S", 1.0)

    async def scenario(server, session):
        body = json.dumps({"text": SLOW_SENTENCES}).encode()
        first = asyncio.ensure_future(_post(session, server, body))
        while not large.admitted:
            await asyncio.sleep(0.02)
        status, answer, seconds = await _post(session, server, body)
        assert status == 503 and "busy" in answer["error"] and seconds < 1.0, answer
        status, answer, seconds = await first
        assert status == 503 and "took over 1 s" in answer["error"], answer
        assert seconds < 5.0  # dropped at the limit, not run to its end
        status, answer, _ = await _post(session, server, json.dumps(SMALL).encode())
        assert status == 200  # the small lane never waited

    _run(routes, scenario)


DEEP_BODIES = {
    "array": b"[" * 100_000 + b"]" * 100_000,
    "in-object": b'{"text": "a", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "objects": b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
}
DEEP_TEXTS = {
    "small": "(" * 40 + "a cat" + ")" * 40,  # the small lane
    "large": "(" * 5_000 + "a cat" + ")" * 5_000,  # the large lane
    "weights": "(a " * 60 + "cat:1.2)" * 60,
}


@pytest.mark.parametrize("name", list(DEEP_BODIES) + [f"text-{name}" for name in DEEP_TEXTS])
def test_deep_json_and_deep_brackets_get_400_with_a_message(routes, name):
    body = DEEP_BODIES.get(name) or json.dumps({"text": DEEP_TEXTS[name[5:]]}).encode()

    async def scenario(server, session):
        status, answer, _ = await _post(session, server, body)
        assert status == 400, (status, answer)
        expected = "nested" if name.startswith("text-") else "nests JSON"
        assert expected in answer["error"], answer
        status, answer, _ = await _post(session, server, json.dumps({"text": "(" * 32 + "a" + ")" * 32}).encode())
        assert status == 200  # 32 levels are still counted

    _run(routes, scenario)


def test_the_encode_node_refuses_deep_brackets_at_once(pack, tiny_clip_pair):
    """ComfyUI's weight parser recurses once per bracket level, copying the text each time: the node
    refuses a bracket bomb with a message before any tokenizing."""
    node = pack.NODE_CLASS_MAPPINGS["LongAlignTextEncode"]()
    for text in ("(" * 40 + "a cat" + ")" * 40, "(" * 100_000 + "a" + ")" * 100_000):
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"LongAlign Text Encode: text: brackets are nested \d+ deep; at most 32"):
            node.encode(tiny_clip_pair[1], text, "sentences", 240, "mean", True)
        assert time.monotonic() - start < 2.0
    (conditioning,) = node.encode(tiny_clip_pair[1], "(" * 32 + "a cat" + ")" * 32, "sentences", 240, "mean", True)
    assert conditioning[0][0].shape[1] == 240


# ---- model folders holding link loops --------------------------------------------------------

def _loop_tree(root) -> None:
    """``a`` and ``b`` link to each other and twice to their parent: an unbounded walk that follows
    links branches 2^depth times (the old listing never ended)."""
    os.makedirs(root / "a")
    os.makedirs(root / "b")
    os.symlink("../b", root / "a" / "to_b")
    os.symlink("../a", root / "b" / "to_a")
    for folder in ("a", "b"):
        os.symlink("..", root / folder / "up1")
        os.symlink("..", root / folder / "up2")


def _within(seconds: float, call):
    """``call()``'s result, failing (not hanging) when it takes longer than ``seconds``."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still listing after {seconds}s"
    return out["value"]


def test_walk_follows_links_but_never_a_loop_twice(tmp_path):
    root = tmp_path / "models"
    _loop_tree(root)
    (root / "a" / "m.safetensors").write_bytes(b"x")
    os.makedirs(tmp_path / "elsewhere" / "deep")
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a folder linked in from elsewhere is listed
    (tmp_path / "elsewhere" / "deep" / "n.safetensors").write_bytes(b"x")
    walked = _within(5, lambda: [(os.path.relpath(f, root), files) for f, _, files in walk_folder(str(root))])
    folders = [f for f, _ in walked]
    assert len(folders) == len({os.path.realpath(root / f) for f in folders}) == 5  # each real folder once
    assert ("a", ["m.safetensors"]) in walked and ("b", []) in walked  # shortest names (breadth first)
    assert (os.path.join("linked", "deep"), ["n.safetensors"]) in walked


def test_walk_stops_at_its_depth_entry_and_time_bounds(tmp_path, caplog):
    deep = tmp_path
    for i in range(12):
        deep = deep / f"d{i}"
    os.makedirs(deep)
    assert max(f.count(os.sep) for f, _, _ in walk_folder(str(tmp_path), max_depth=8)) - str(tmp_path).count(os.sep) == 8
    for i in range(50):
        (tmp_path / f"f{i}.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert sum(len(files) for _, _, files in walk_folder(str(tmp_path), max_entries=20)) < 20
        assert "stopped after 20 entries" in caplog.text
        assert list(walk_folder(str(tmp_path), max_seconds=0.0)) == []
        assert "stopped after 0 s" in caplog.text


def test_reward_and_t5_lists_end_despite_link_loops(pack, model_folder):
    rewards = model_folder("reward_models")
    _loop_tree(rewards)
    (rewards / "a" / "hps.safetensors").write_bytes(b"x")
    encoders = model_folder("text_encoders")
    _loop_tree(encoders)
    os.makedirs(encoders / "b" / "adapter")
    (encoders / "b" / "adapter" / "config.json").write_text(json.dumps({"in_dim": 8, "int_dim": 8, "out_dim": 8}))
    m = pack.NODE_CLASS_MAPPINGS
    listed = _within(5, m["LongAlignRewardModelLoader"].INPUT_TYPES)["required"]["model_name"][0]
    assert "a/hps.safetensors" in listed
    adapters = _within(5, m["T5AdapterLoader"].INPUT_TYPES)["required"]["adapter_name"][0]
    assert "b/adapter/" in adapters


def test_a_slow_listing_never_holds_the_caller_past_its_wait(pack):
    """INPUT_TYPES runs in ComfyUI's event loop: a listing that takes long (a slow or hung disk)
    answers with the last complete list after ``wait``, and the walk's result is used next time."""
    import importlib

    listing = importlib.import_module("comfyui_longalign.nodes.listing")
    assert listing.listed("test-slow", lambda: ["first"], []) == ["first"]
    gate = threading.Event()
    start = time.monotonic()
    assert listing.listed("test-slow", lambda: gate.wait(30) and ["second"], [], wait=0.2) == ["first"]
    assert listing.listed("test-slow", lambda: ["not started: one walk per list at a time"], [], wait=0.2) == ["first"]
    assert time.monotonic() - start < 1.0
    assert listing.listed("test-never", lambda: gate.wait(30) and ["x"], [], wait=0.2) == []  # nothing yet: empty
    gate.set()
    deadline = time.monotonic() + 5
    while listing.listed("test-slow", lambda: ["third"], []) != ["third"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listing.listed("test-slow", lambda: ["fourth"], []) == ["fourth"]


# ---- the real server ---------------------------------------------------------------------------

@pytest.mark.server
def test_object_info_answers_with_a_link_loop_in_reward_models(comfy_server):
    import pathlib

    folder = pathlib.Path(comfy_server.model_folder("reward_models")) / "loop"
    _loop_tree(folder)
    (folder / "a" / "looped.safetensors").write_bytes(b"x")
    try:
        start = time.monotonic()
        status, info = comfy_server.request("/object_info/LongAlignRewardModelLoader", timeout=30)
        assert status == 200 and time.monotonic() - start < 5
        assert "loop/a/looped.safetensors" in info["LongAlignRewardModelLoader"]["input"]["required"]["model_name"][0]
    finally:
        for sub in ("a", "b"):
            for name in os.listdir(folder / sub):
                os.unlink(folder / sub / name)
            os.rmdir(folder / sub)
        os.rmdir(folder)
