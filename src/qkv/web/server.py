"""Run the explorer with uvicorn on a socket this module binds itself, so the printed address
is the real one (port 0 picks a free port)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Callable, Optional

import uvicorn

from .app import create_app
from .schema import DEFAULT_MAX_CHARS

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(*, host: str = "127.0.0.1", port: int = 8000, model_dir: Optional[str] = None, max_queue: int = 8,
                max_chars: int = DEFAULT_MAX_CHARS, preload: Optional[str] = "minilm", log_level: str = "warning",
                **limits: int):
    """(uvicorn.Server, its bound socket). `preload` loads one model before serving; `limits`:
    create_app's max_cost, max_answer_mb, max_memory_mb, max_session_mb, max_pick, workers,
    max_image_mb, max_image_pixels."""
    allowed = LOOPBACK_NAMES if is_loopback(host) else None
    app = create_app(model_dir=model_dir, max_queue=max_queue, max_chars=max_chars, allowed_hosts=allowed, **limits)
    if preload:
        app.state.service.registry.get(preload)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off")
    return uvicorn.Server(config), sock


def serve(*, host: str = "127.0.0.1", port: int = 8000, model_dir: Optional[str] = None, max_queue: int = 8,
          max_chars: int = DEFAULT_MAX_CHARS, echo: Callable[[str], None] = print, **limits: int) -> None:
    """Serve until Ctrl+C; prints the address once it is listening. `limits`: as make_server."""
    server, sock = make_server(host=host, port=port, model_dir=model_dir, max_queue=max_queue, max_chars=max_chars,
                               **limits)
    echo(f"qkv serve: the attention explorer is at {url_of(sock)} (Ctrl+C stops it)")
    if not is_loopback(host):
        echo(f"qkv serve: listening on {host}, not only this machine: anyone who can reach it can use it",)
    sys.stdout.flush()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
