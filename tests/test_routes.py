"""``POST /longalign/tokenize`` in the real ComfyUI server: the counts are the library's (and the
rows the encoder really keeps); bad requests get 400/413 and the server keeps serving."""
from __future__ import annotations

import http.client
import json

import pytest

from training.encode import SegmentOptions, encode_long_prompts
from training.token_count import count_tokens
from workflows import load_example

pytestmark = pytest.mark.server
ROUTE = "/longalign/tokenize"
# weights, an escaped bracket, curly quotes, a dash, an accent, an emoji, a decimal and a sentence
# far longer than one 75-token window
TRICKY = ("A (red:1.3) fox “jumps” over the \\(lazy\\) dog — café 🦊 at 3.5 m. "
          + "Then " + ", ".join(f"a tiny stone number {i}" for i in range(30)) + "; done!")


def _post(server, body: bytes, chunked: bool = False) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if chunked:
            pieces = (body[i: i + 8192] for i in range(0, len(body), 8192))
            connection.request("POST", ROUTE, body=pieces, headers=headers, encode_chunked=True)
        else:
            connection.request("POST", ROUTE, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def tokenize(server, **body) -> dict:
    status, answer = _post(server, json.dumps(body).encode())
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def comfy_backend(pack, tiny_clip_pair):
    """The node's backend on a real ComfyUI CLIP object (ComfyUI's SD1 tokenizer, tiny weights)."""
    from comfyui_longalign.nodes.comfy_clip import ComfyClipBackend

    return ComfyClipBackend(tiny_clip_pair[1])


@pytest.mark.parametrize("options", [
    SegmentOptions(), SegmentOptions(token_length=0), SegmentOptions(keep_bos=False, token_length=300),
    SegmentOptions(split="native", token_length=77),
], ids=["default", "L0", "no-bos", "native"])
@pytest.mark.parametrize("prompt", ["long-example", "tricky", "empty"])
def test_counts_are_the_library_counts_and_the_encoded_rows(comfy_server, comfy_backend, options, prompt):
    text = {"long-example": load_example("long_prompt_sd15_api.json")["2"]["inputs"]["text"],
            "tricky": TRICKY, "empty": ""}[prompt]
    answer = tokenize(comfy_server, text=text, token_length=options.token_length, split=options.split,
                      keep_bos=options.keep_bos)
    assert answer == count_tokens(text, comfy_backend, options).as_dict()

    # the natural length the encoder produces (L = 0, no padding) is the route's kept_tokens
    natural = encode_long_prompts([text], comfy_backend, SegmentOptions(
        split=options.split, token_length=0, pad="none", keep_bos=options.keep_bos))
    assert natural.cond.shape[1] == answer["kept_tokens"] == sum(s["tokens"] for s in answer["segments"])
    assert [s["text"] for s in answer["segments"]] == natural.segments[0]
    assert answer["truncated"] == (options.token_length > 0 and answer["kept_tokens"] > options.token_length)


def test_a_400_token_prompt_is_truncated_at_240_and_split_into_sentences(comfy_server):
    text = load_example("long_prompt_sd15_api.json")["2"]["inputs"]["text"]
    answer = tokenize(comfy_server, text=text)  # the node's defaults: L = 240, sentences
    assert answer["token_length"] == 240 and answer["truncated"] is True
    assert answer["total_tokens"] > 350 and answer["kept_tokens"] > 240
    assert len(answer["segments"]) > 10 and all(0 < s["tokens"] <= 76 for s in answer["segments"])
    assert tokenize(comfy_server, text="A cat. A dog.")["segments"] == [
        {"text": "A cat.", "tokens": 4}, {"text": "A dog.", "tokens": 4}]  # BOS, "a", "cat", "." per segment


BAD_BODIES = {
    "not-json": b"text=hello",
    "not-utf8": b"\xff\xfe{",
    "array": b"[1, 2]",
    "no-text": b'{"token_length": 240}',
    "text-number": b'{"text": 5}',
    "length-string": b'{"text": "a", "token_length": "240"}',
    "length-bool": b'{"text": "a", "token_length": true}',
    "length-negative": b'{"text": "a", "token_length": -1}',
    "split-unknown": b'{"text": "a", "split": "words"}',
    "keep-bos-string": b'{"text": "a", "keep_bos": "yes"}',
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_get_400_with_an_error(comfy_server, name):
    status, answer = _post(comfy_server, BAD_BODIES[name])
    assert status == 400 and isinstance(answer["error"], str) and answer["error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_bodies_over_the_limit_get_413_and_the_server_keeps_serving(comfy_server, chunked):
    body = json.dumps({"text": "a cat. " * 40_000}).encode()  # ~280 KiB
    assert len(body) > 256 * 1024
    status, answer = _post(comfy_server, body, chunked=chunked)
    assert status == 413 and "KiB" in answer["error"]
    assert tokenize(comfy_server, text="A cat.")["kept_tokens"] == 4
    assert "LongAlignTextEncode" in comfy_server.get("/object_info/LongAlignTextEncode")


def test_a_body_just_under_the_limit_is_counted(comfy_server):
    text = "a cat sat. " * 20_000  # ~215 KiB: 20k segments through the real tokenizer
    answer = tokenize(comfy_server, text=text, token_length=0)
    assert len(answer["segments"]) == 20_000 and answer["kept_tokens"] == 20_000 * 5
