"""``POST /longalign/tokenize``: how LongAlign Text Encode will segment a prompt (the front end's
live counter).

Request: ``{"text": str, "token_length": int = 240, "split": "sentences" | "native",
"keep_bos": bool = true, "clip_name": str | null}``. Answer: :class:`training.token_count.TokenCount`
as JSON (``segments: [{text, tokens}]``, ``total_tokens``, ``kept_tokens``, ``token_length``,
``truncated``, ``window``, ``summary``: the counter's lines). Tokenisation is ComfyUI's own SD1 CLIP
tokenizer (the vocabulary SD1.x, SD2.x and SDXL share) driven through the node's backend, so
``(word:1.2)`` weights and ``embedding:`` names count as they encode. ``clip_name`` is the text
encoder file the node's CLIP comes from (a CLIP Loader's choice): its window is the file's CLIP-L
position count, as ComfyUI reads it (248 for Long-CLIP-L, 77 for CLIP; 77 without a file).
Bad requests get 400 (413 over :data:`MAX_BODY_BYTES`) with ``{"error": ...}``.

A request can neither freeze the server nor hold up the others: prompts up to :data:`SMALL_CHARS`
characters (what the counter sends while one types) and longer ones are counted in two lanes, each
one worker thread with its own tokenizer, so a short prompt never waits behind a long one. Each lane
admits a bounded number of requests (running + waiting); past that the answer is 503 with a
message. Work is dropped (checked before every tokenizer call) when its client has hung up or
after :data:`TIME_LIMIT_S` seconds (then 503). JSON nested too deeply and prompts that nest
brackets deeper than :data:`.comfy_clip.MAX_BRACKET_DEPTH` get 400.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from aiohttp import web
from safetensors import SafetensorError, safe_open

from ..training.encode import SegmentOptions
from ..training.token_count import count_tokens
from .comfy_clip import ComfyClipBackend, check_bracket_depth

ROUTE = "/longalign/tokenize"
MAX_BODY_BYTES = 256 * 1024
SMALL_CHARS = 4096
"""Prompts up to this length are counted in the small lane (a few ms each)."""
TIME_LIMIT_S = 30.0
"""Seconds a request may take, waiting included, before its work is dropped."""
POLL_S = 0.1
"""How often a waiting request checks that its client is still connected."""
CLIP_WINDOW = 77
MAX_WINDOW = 1024
"""Largest window a text encoder file may give the counter (Long-CLIP-L: 248)."""
POSITION_KEYS = ("clip_l.text_model.embeddings.position_embedding.weight",
                 "text_model.embeddings.position_embedding.weight")
"""Where ComfyUI reads a CLIP-L's position count (``comfy.text_encoders.long_clipl``)."""
BACKENDS_PER_LANE = 2
"""Tokenizers a lane keeps, one per window (CLIP and Long-CLIP)."""


class _TokenizerOnlyClip:
    """The part of ComfyUI's CLIP object :class:`ComfyClipBackend` reads to tokenise: no weights are
    loaded (an empty ``cond_stage_model``: nothing to encode or patch)."""

    cond_stage_model = torch.nn.Module()

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> dict:
        return self.tokenizer.tokenize_with_weights(text)


def _new_backend(window: int = CLIP_WINDOW) -> ComfyClipBackend:
    """ComfyUI's SD1 tokenizer with ``window`` positions, as ComfyUI builds it for a CLIP-L of that many."""
    import comfy.sd1_clip
    import folder_paths

    tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                            tokenizer_data={"clip_l_max_length": window})
    return ComfyClipBackend(_TokenizerOnlyClip(tokenizer))


def clip_window(clip_name: str | None) -> int:
    """The window of the text encoder file ``clip_name`` (one of ComfyUI's ``text_encoders``): its CLIP-L
    position rows from the safetensors header, as ComfyUI sizes the tokenizer on loading it; 77 for
    None, a file that is not safetensors or holds no CLIP-L. ValueError naming ``clip_name`` for a
    name not in that list or a window over :data:`MAX_WINDOW`."""
    if clip_name is None:
        return CLIP_WINDOW
    import folder_paths

    if clip_name not in folder_paths.get_filename_list("text_encoders"):
        raise ValueError(f"'clip_name': {clip_name!r} is not a file in ComfyUI's text_encoders folders")
    path = folder_paths.get_full_path("text_encoders", clip_name)
    if not path or not path.lower().endswith(".safetensors"):
        return CLIP_WINDOW
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            key = next((k for k in POSITION_KEYS if k in keys), None)
            rows = f.get_slice(key).get_shape()[0] if key else CLIP_WINDOW
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"'clip_name': {clip_name!r} is not a readable safetensors file ({e})") from None
    if not 3 <= rows <= MAX_WINDOW:
        raise ValueError(f"'clip_name': {clip_name!r} has {rows} positions; expected 3 to {MAX_WINDOW}")
    return rows


class Dropped(Exception):
    """A request's work was abandoned: its client hung up or it ran past :data:`TIME_LIMIT_S`."""


class _Job:
    """One request's work: dropped at the next tokenizer call once ``gone`` is set or past ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.gone = False

    def check(self) -> None:
        if self.gone:
            raise Dropped("the client hung up")
        if time.monotonic() > self.deadline:
            raise Dropped(f"counting this prompt took over {TIME_LIMIT_S:g} s; it was stopped (shorten the prompt)")


class _Watched:
    """A backend that checks its job before every tokenizer call (the only slow steps of counting)."""

    def __init__(self, backend: ComfyClipBackend, job: _Job) -> None:
        self._backend, self._job = backend, job
        self.window = backend.window

    def tokenize(self, text: str):
        self._job.check()
        return self._backend.tokenize(text)

    def tokenize_batch(self, texts):
        self._job.check()
        return self._backend.tokenize_batch(texts)


class Lane:
    """One worker thread with its own tokenizer (ComfyUI's tokenizer cache is not thread-safe), and
    at most ``capacity`` requests admitted (running + waiting); ``admitted`` is only touched on the
    event loop."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name, self.capacity, self.admitted = name, capacity, 0
        self.dropped = 0
        """Jobs abandoned so far (client gone, time limit)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"longalign-tokenize-{name}")
        self._backends: OrderedDict[int, ComfyClipBackend] = OrderedDict()
        """Per window, the latest :data:`BACKENDS_PER_LANE` used."""

    def _backend(self, window: int) -> ComfyClipBackend:
        if window not in self._backends:
            self._backends[window] = _new_backend(window)
            while len(self._backends) > BACKENDS_PER_LANE:
                self._backends.popitem(last=False)
        self._backends.move_to_end(window)
        return self._backends[window]

    def _count(self, job: _Job, text: str, options: SegmentOptions, clip_name: str | None = None) -> dict:
        try:
            job.check()  # hung up or timed out while waiting: nothing is done
            check_bracket_depth(text, "'text'")
            backend = self._backend(clip_window(clip_name))
            return count_tokens(text, _Watched(backend, job), options).as_dict()
        except Dropped:
            self.dropped += 1  # only this lane's one worker thread writes it
            raise

    async def count(self, request: web.Request, text: str, options: SegmentOptions,
                    clip_name: str | None = None) -> dict:
        """The count of ``text``, run in this lane while ``request``'s client stays connected. The
        request holds its place in the lane until the worker is done with it, even when aiohttp
        cancels the handler of a client that hung up: the lane never queues more than ``capacity``."""
        job = _Job(time.monotonic() + TIME_LIMIT_S)
        self.admitted += 1
        loop = asyncio.get_running_loop()
        future = self._executor.submit(self._count, job, text, options, clip_name)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        waiting = asyncio.wrap_future(future)
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=POLL_S)
                if request.transport is None or request.transport.is_closing():
                    job.gone = True
            return waiting.result()
        finally:
            job.gone = True  # nothing more is wanted from this job (also when aiohttp cancels the handler)
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no log

    def _release(self) -> None:
        self.admitted -= 1


LANES = {"small": Lane("small", capacity=32), "large": Lane("large", capacity=4)}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_request(body: bytes) -> tuple[str, SegmentOptions, str | None]:
    """The prompt, options and text encoder file of a request body; ValueError with a message for the user."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the body must be JSON: {e}") from None
    except RecursionError:
        raise ValueError("the body nests JSON arrays or objects too deeply: expected a flat JSON object") from None
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
    clip_name = data.get("clip_name")
    if clip_name is not None and not isinstance(clip_name, str):
        raise ValueError("'clip_name' must be a text encoder file name or null")
    options = SegmentOptions(split=data.get("split", "sentences"), token_length=token_length, keep_bos=keep_bos)
    return text, options, clip_name


async def _read_limited(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise OverflowError
    body = bytearray()
    while chunk := await request.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OverflowError
    return bytes(body)


async def tokenize(request: web.Request) -> web.Response:
    try:
        body = await _read_limited(request)
    except OverflowError:
        return _error(413, f"the body is over {MAX_BODY_BYTES // 1024} KiB")
    try:
        text, options, clip_name = parse_request(body)
    except ValueError as e:  # SegmentOptions' own checks (split, token_length >= 0) land here too
        return _error(400, str(e))
    lane = LANES["small" if len(text) <= SMALL_CHARS else "large"]
    if lane.admitted >= lane.capacity:
        return _error(503, f"busy: {lane.admitted} prompts of this size are being counted; try again in a moment")
    try:
        return web.json_response(await lane.count(request, text, options, clip_name))
    except Dropped as e:
        return _error(503, str(e))
    except ValueError as e:  # brackets nested too deeply, a clip_name that is no text encoder file
        return _error(400, str(e))


def register(routes: web.RouteTableDef) -> None:
    routes.post(ROUTE)(tokenize)
