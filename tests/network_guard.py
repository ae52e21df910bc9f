"""No test may touch the network: a guard on Python's sockets, installed by ``conftest.py`` for the
whole suite.

Loopback (``127.0.0.0/8``, ``::1``, ``localhost``) and Unix sockets stay allowed: the server tests
talk to a local ComfyUI. Any other ``connect``, ``connect_ex``, ``create_connection`` or host-name
lookup is recorded in :data:`attempts` and refused with :class:`NetworkBlocked`, which is not an
``OSError``, so no library retries it or quietly falls back. ``conftest.py`` fails the test that made
an attempt even when the code under test caught the error (a loader wrapping every exception in its
own error would otherwise look like a clean refusal). Processes the tests start (the trainer CLIs,
the ComfyUI server) install it too, through ``tests/netguard_site/sitecustomize.py``, and append each
attempt to the log file named by :data:`LOG_VARIABLE`, which :func:`take_attempts` reads.
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import tempfile
from typing import Any

attempts: list[str] = []
"""What was tried since the last check, e.g. ``"connect ('203.0.113.7', 443)"``."""
LOG_VARIABLE = "LONGALIGN_NETWORK_GUARD_LOG"
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard_site")
"""A folder holding only ``sitecustomize.py``: on ``PYTHONPATH``, it guards every Python subprocess."""
_log: dict[str, Any] = {"path": None, "read": 0}


class NetworkBlocked(RuntimeError):
    """A test tried to reach a non-loopback address."""


def _local_host(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0]
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip_literal(host: Any) -> bool:
    try:
        ipaddress.ip_address(str(host).strip("[]").split("%")[0])
        return True
    except ValueError:
        return False


def _local_address(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    return isinstance(address, tuple) and len(address) >= 1 and _local_host(address[0])


def _refuse(what: str) -> None:
    attempts.append(what)
    if _log["path"]:
        with open(_log["path"], "a", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()}: {what}\n")
    raise NetworkBlocked(f"a test tried to reach the network: {what} (only loopback is allowed)")


def install(log: str | None = None) -> None:
    """Patch the socket module (once); with ``log``, also append every attempt to that file."""
    _log["path"] = log or _log["path"]
    if getattr(socket.socket.connect, "network_guard", False):
        return
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo
    gethostbyname, gethostbyname_ex = socket.gethostbyname, socket.gethostbyname_ex

    def guarded_connect(self, address):
        if not _local_address(address):
            _refuse(f"connect {address!r}")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if not _local_address(address):
            _refuse(f"connect_ex {address!r}")
        return connect_ex(self, address)

    def guarded_create_connection(address, *args, **kwargs):
        if not _local_address(address):
            _refuse(f"create_connection {address!r}")
        return create_connection(address, *args, **kwargs)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not (_local_host(host) or _ip_literal(host)):  # a literal needs no lookup; connect checks it
            _refuse(f"getaddrinfo {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    def guarded_gethostbyname(host):
        if not (_local_host(host) or _ip_literal(host)):
            _refuse(f"gethostbyname {host!r}")
        return gethostbyname(host)

    def guarded_gethostbyname_ex(host):
        if not (_local_host(host) or _ip_literal(host)):
            _refuse(f"gethostbyname_ex {host!r}")
        return gethostbyname_ex(host)

    guarded_connect.network_guard = True
    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.create_connection, socket.getaddrinfo = guarded_create_connection, guarded_getaddrinfo
    socket.gethostbyname, socket.gethostbyname_ex = guarded_gethostbyname, guarded_gethostbyname_ex


def guard_subprocesses() -> None:
    """Make every Python process started from now on install the guard and log to a fresh file."""
    fd, path = tempfile.mkstemp(prefix="longalign-network-", suffix=".log")
    os.close(fd)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    _log.update(path=path, read=0)
    os.environ[LOG_VARIABLE] = path
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)


def take_attempts() -> list[str]:
    """The attempts made since the last call, here and in subprocesses (from the log), and forget them."""
    tried = list(attempts)
    attempts.clear()
    if _log["path"] and os.path.exists(_log["path"]):
        with open(_log["path"], encoding="utf-8") as f:
            f.seek(_log["read"])
            logged = f.read()
            _log["read"] = f.tell()
        tried += [line for line in logged.splitlines() if f"pid {os.getpid()}:" not in line]
    return tried
