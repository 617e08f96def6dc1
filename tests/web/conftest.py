"""Fixtures of the web tests: one loaded MiniLM for every app, and its explanation of TEXT."""

from __future__ import annotations

import pytest

try:
    import fastapi  # noqa: F401
    import httpx  # noqa: F401  (Starlette's TestClient)
    import pydantic  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # the test extra lists them: a test set-up without them is broken
    pytest.fail(f"the web tests need fastapi, pydantic, starlette, uvicorn and httpx ({exc.name} is missing): "
                "pip install -e '.[test,viz,web]' (make test-env does this)", pytrace=False)

from .web_helpers import TEXT


@pytest.fixture(scope="session")
def registry():
    """One ModelRegistry with MiniLM loaded, shared by every web test of this process."""
    from qkv.web.service import ModelRegistry

    reg = ModelRegistry()
    reg.get("minilm")
    return reg


@pytest.fixture(scope="session")
def reference(registry):
    """qkv.explain of TEXT on the same loaded model: the numbers the server must give."""
    import qkv

    model, _ = registry.get("minilm")
    return qkv.explain(TEXT, model)


@pytest.fixture
def client(app):
    """A TestClient of the module's `app` fixture; the test fails if a request reached the catch-all
    (a JSON 500: an input the API should have refused by name)."""
    from starlette.testclient import TestClient

    before = app.state.internal_errors
    with TestClient(app) as c:
        yield c
    assert app.state.internal_errors == before, "a request reached the catch-all (JSON 500)"
