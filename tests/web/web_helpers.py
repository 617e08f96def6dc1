"""Fixtures and helpers of the web tests: one loaded MiniLM for every app, and a real uvicorn
server on a free 127.0.0.1 port, run in a thread and stopped at the end.

A plain module, not a conftest.py: tests/models imports its own conftest by name, and a second
conftest module would shadow it when both folders are collected together.
"""

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

from qkv.web.service import ModelRegistry  # noqa: E402

TEXT = "The cat sat on the mat."
_SHARED: dict = {}


@pytest.fixture(scope="session")
def registry():
    """One ModelRegistry with MiniLM loaded, shared by every web test of this process."""
    if "registry" not in _SHARED:
        reg = ModelRegistry()
        reg.get("minilm")
        _SHARED["registry"] = reg
    return _SHARED["registry"]


@pytest.fixture(scope="session")
def reference(registry):
    """qkv.explain of TEXT on the same loaded model: the numbers the server must give."""
    if "reference" not in _SHARED:
        import qkv

        model, _ = registry.get("minilm")
        _SHARED["reference"] = qkv.explain(TEXT, model)
    return _SHARED["reference"]


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
