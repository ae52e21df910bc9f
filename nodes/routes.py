"""``POST /longalign/tokenize``: how LongAlign Text Encode will segment a prompt (the front end's
live counter).

Request: ``{"text": str, "token_length": int = 240, "split": "sentences" | "native",
"keep_bos": bool = true}``. Answer: :class:`training.token_count.TokenCount` as JSON
(``segments: [{text, tokens}]``, ``total_tokens``, ``kept_tokens``, ``token_length``,
``truncated``). Tokenisation is ComfyUI's own SD1 CLIP tokenizer (the vocabulary SD1.x, SD2.x and
SDXL share) driven through the node's backend, so ``(word:1.2)`` weights and ``embedding:`` names
count as they encode. Bad requests get 400 (413 over :data:`MAX_BODY_BYTES`) with ``{"error": ...}``.
"""
from __future__ import annotations

import asyncio
import json
import threading
from functools import lru_cache

import torch
from aiohttp import web

from ..training.encode import SegmentOptions
from ..training.token_count import count_tokens
from .comfy_clip import ComfyClipBackend

ROUTE = "/longalign/tokenize"
MAX_BODY_BYTES = 256 * 1024
_LOCK = threading.Lock()  # one tokenisation at a time: the tokenizer's cache is not thread-safe


class _TokenizerOnlyClip:
    """The part of ComfyUI's CLIP object :class:`ComfyClipBackend` reads to tokenise: no weights are
    loaded (an empty ``cond_stage_model``: nothing to encode or patch)."""

    cond_stage_model = torch.nn.Module()

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> dict:
        return self.tokenizer.tokenize_with_weights(text)


@lru_cache(maxsize=1)
def _backend() -> ComfyClipBackend:
    import comfy.sd1_clip
    import folder_paths

    tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return ComfyClipBackend(_TokenizerOnlyClip(tokenizer))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_request(body: bytes) -> tuple[str, SegmentOptions]:
    """The prompt and options of a request body; ValueError with a message for the user."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the body must be JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object")
    text = data.get("text")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    token_length = data.get("token_length", 240)
    if isinstance(token_length, bool) or not isinstance(token_length, int):
        raise ValueError("'token_length' must be an integer")
    keep_bos = data.get("keep_bos", True)
    if not isinstance(keep_bos, bool):
        raise ValueError("'keep_bos' must be true or false")
    return text, SegmentOptions(split=data.get("split", "sentences"), token_length=token_length, keep_bos=keep_bos)


async def _read_limited(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise OverflowError
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OverflowError
    return bytes(body)


def _count(text: str, options: SegmentOptions) -> dict:
    with _LOCK:
        return count_tokens(text, _backend(), options).as_dict()


async def tokenize(request: web.Request) -> web.Response:
    try:
        body = await _read_limited(request)
    except OverflowError:
        return _error(413, f"the body is over {MAX_BODY_BYTES // 1024} KiB")
    try:
        text, options = parse_request(body)
    except ValueError as e:  # SegmentOptions' own checks (split, token_length >= 0) land here too
        return _error(400, str(e))
    result = await asyncio.get_running_loop().run_in_executor(None, _count, text, options)
    return web.json_response(result)


def register(routes: web.RouteTableDef) -> None:
    routes.post(ROUTE)(tokenize)
