"""A real ComfyUI server on loopback with this pack in ``custom_nodes``, for integration tests.

Which front end it serves, and how, follow the test leg (``scripts/test.sh``): ``LONGALIGN_FRONT_END``
names a front end's ``static`` folder (passed as ``--front-end-root``; unset: ComfyUI's installed
package), and ``LONGALIGN_VUE_NODES=1`` turns on the front end's Vue node renderer ("Nodes 2.0")."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import numpy as np


def front_end_root() -> str | None:
    """The front end the servers serve (``LONGALIGN_FRONT_END``), or None for ComfyUI's default."""
    path = os.environ.get("LONGALIGN_FRONT_END") or None
    if path and not os.path.isfile(os.path.join(path, "index.html")):
        raise RuntimeError(f"LONGALIGN_FRONT_END={path!r} is not a front end's static folder (no index.html)")
    return path


def vue_nodes() -> bool:
    """Whether the servers' front end renders nodes with Vue (``LONGALIGN_VUE_NODES=1``)."""
    return os.environ.get("LONGALIGN_VUE_NODES", "0") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Starts ``main.py --cpu`` with ``base_dir`` as ComfyUI's base directory, serving this leg's front
    end in this leg's renderer; stop() always."""

    def __init__(self, comfyui_dir: str, base_dir: str, log_path: str):
        self.comfyui_dir, self.base_dir, self.log_path = comfyui_dir, base_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        log = open(self.log_path, "wb")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        if front_end_root():
            cmd += ["--front-end-root", front_end_root()]
        self.process = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/KSampler")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
                continue
            status, _ = self.request("/settings/Comfy.VueNodes.Enabled", vue_nodes())
            if status != 200:
                raise RuntimeError(f"the server refused the setting Comfy.VueNodes.Enabled: HTTP {status}")
            return self
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def request(self, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str) -> dict:
        status, body = self.request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body}")
        return body

    def queue(self, workflow: dict) -> tuple[int, dict]:
        """POST a prompt in API format; returns (HTTP status, body)."""
        return self.request("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})

    def model_folder(self, kind: str) -> str:
        """``models/<kind>`` (loras, text_encoders, ...) of the server's base directory, created."""
        path = os.path.join(self.base_dir, "models", kind)
        os.makedirs(path, exist_ok=True)
        return path

    def image(self, workflow: dict, node: str = "7") -> np.ndarray:
        """Run ``workflow``, which must succeed, and read the first image its SaveImage ``node`` wrote
        as an (H, W, 3) int16 array."""
        from PIL import Image

        entry = self.run(workflow)
        assert entry["status"]["status_str"] == "success", entry["status"]
        info = entry["outputs"][node]["images"][0]
        with Image.open(os.path.join(self.base_dir, "output", info.get("subfolder", ""), info["filename"])) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    def run(self, workflow: dict, timeout: float = 300.0) -> dict:
        """Queue ``workflow`` and wait for its history entry (whatever its status)."""
        status, body = self.queue(workflow)
        if status != 200:
            raise RuntimeError(f"prompt refused: HTTP {status}: {json.dumps(body)[:2000]}")
        prompt_id = body["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
