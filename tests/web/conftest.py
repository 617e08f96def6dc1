"""Shared fixtures of the web tests: one loaded MiniLM for every app, and a real uvicorn server
on a free 127.0.0.1 port, run in a thread and stopped at the end."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

try:
    import httpx  # noqa: F401  (Starlette's TestClient)
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # the test extra lists them: a test set-up without them is broken
    pytest.fail(f"the web tests need starlette, uvicorn and httpx ({exc.name} is missing): "
                "pip install -e '.[test,viz,web]' (make test-env does this)", pytrace=False)

from qkv.web.app import create_app  # noqa: E402
from qkv.web.service import ModelRegistry  # noqa: E402

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="session")
def registry():
    reg = ModelRegistry()
    reg.get("minilm")  # load once for the whole session
    return reg


@pytest.fixture(scope="session")
def reference(registry):
    """qkv.explain of TEXT on the same loaded model: the numbers the server must give."""
    import qkv

    model, _ = registry.get("minilm")
    return qkv.explain(TEXT, model)


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    from qkv.web.server import bind, url_of

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"
