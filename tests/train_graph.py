"""Shared by the train-from-the-graph server and browser tests: the session server made ready to
train (the trainable tiny checkpoint and a tiny reward model in its model folders), the API prompt of
a LongAlign Train LoRA run, and a websocket listener that records what the server sends."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid

TRAIN_CKPT = "tiny_sd15_train.safetensors"
"""The name ``server_train_checkpoint`` (conftest) installs the trainable tiny checkpoint under."""
REWARD_MODEL = "tiny_denscore"
PROMPTS = ("A red circle on a blue table. The light is soft and warm.\n"
           "A green square beside a yellow cup. Morning light comes from the left.")
TRAIN = "2"
"""The training node's id in :func:`train_prompt`."""


def prepare(server) -> None:
    """A tiny Denscore model in the server's models/reward_models (the trainable checkpoint is the
    ``server_train_checkpoint`` fixture's); idempotent."""
    from tiny_models import build_tiny_clipmodel

    reward = os.path.join(server.model_folder("reward_models"), REWARD_MODEL)
    if not os.path.isdir(reward):
        build_tiny_clipmodel(reward)


def train_prompt(lora_name: str, steps: int = 3, **inputs) -> dict:
    """API prompt: a tiny Reward Model Loader feeding LongAlign Train LoRA on the CPU's cheapest settings
    (reward stage, 32 px, rank 4, batch 1, two sampling steps, one validation image at the end)."""
    train = {"ckpt_name": TRAIN_CKPT, "stage": "reward", "prompts": PROMPTS, "steps": steps, "rank": 4, "lr": 1e-3,
             "resolution": 32, "lora_name": lora_name, "resume": False, "overwrite": False, "seed": 0,
             "sampling_steps": 2, "batch_size": 1, "validate_every": steps, "reward_model": ["1", 0]}
    train.update(inputs)
    return {
        "1": {"class_type": "LongAlignRewardModelLoader",
              "inputs": {"model_name": REWARD_MODEL, "kind": "denscore", "device": "cpu", "dtype": "fp32"}},
        TRAIN: {"class_type": "LongAlignTrainLoRA", "inputs": train},
    }


class Listener:
    """The server's websocket messages for one client id, recorded by a background thread."""

    def __init__(self, server):
        self.client_id = uuid.uuid4().hex
        self.url = server.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.messages: list[dict] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    async def _listen(self) -> None:
        import aiohttp

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    message = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(message.data))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    self.messages.append({"type": "binary", "bytes": len(message.data)})
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def __enter__(self) -> "Listener":
        self._thread.start()
        assert self._ready.wait(30), "the websocket did not connect"
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m["type"] == kind
                and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)]

    def wait_for(self, test, timeout: float = 300.0, what: str = "a message"):
        """The first recorded message (``{"type", "data"}``) for which ``test`` is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if test(message):
                    return message
            time.sleep(0.05)
        raise TimeoutError(f"no {what} within {timeout}s; got {[m['type'] for m in self.messages][-40:]}")

    def queue(self, server, prompt: dict) -> str:
        status, body = server.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, body
        return body["prompt_id"]


def finished(server, prompt_id: str, timeout: float = 600.0) -> dict:
    """The history entry of ``prompt_id`` once it ran (success, error or interrupted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
