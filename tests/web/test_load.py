"""The explorer under load, over loopback: concurrent clients against the real server
(uvicorn in a thread). Every answer is a 200 or a clean JSON 503, /api/health stays quick
while the queue is full, and every run stops by itself (request timeouts and a deadline).
The full-size run (8 clients, 400 requests, latency percentiles) is benchmarks/web_load.py."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

import qkv.inspect
from qkv.web.app import create_app

from .web_helpers import running_server

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "web_load.py"
_spec = importlib.util.spec_from_file_location("web_load", _SCRIPT)
web_load = importlib.util.module_from_spec(_spec)
sys.modules["web_load"] = web_load  # dataclasses look their module up there
_spec.loader.exec_module(web_load)

# Liveness bounds only: a blocked event loop takes the whole run, not a couple of seconds.
HEALTH_BOUND_MS = 2000


def test_every_request_succeeds_under_load(registry):
    app = create_app(registry=registry, max_queue=8)
    with running_server(app) as url:
        res = web_load.run_load(url, clients=8, requests=80, deadline_s=60, request_timeout_s=30)
    assert res.sent == 80 and res.status == {"200": 80}, (res.status, res.unclean[:3])
    assert len(res.latencies_ms) == 80
    assert res.health_ms and max(res.health_ms) < HEALTH_BOUND_MS, f"health took {max(res.health_ms):.0f} ms"
    assert app.state.internal_errors == 0 and app.state.gate.rejected == 0


def test_full_queue_is_a_clean_503_and_health_stays_live(registry, monkeypatch):
    real = qkv.inspect.explain

    def slow(*a, **k):  # a slower model: the queue of 1 is full most of the time
        time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(qkv.inspect, "explain", slow)
    app = create_app(registry=registry, max_queue=1, workers=1)
    with running_server(app) as url:
        res = web_load.run_load(url, clients=8, requests=240, deadline_s=60, request_timeout_s=30,
                                health_every_s=0.02)
        after = web_load.run_load(url, clients=1, requests=3, deadline_s=30)  # the server still answers
    assert res.sent == 240 and not res.unclean, res.unclean[:3]
    assert set(res.status) == {"200", "503"}, res.status
    assert res.status["503"] == app.state.gate.rejected
    assert res.health_while_full >= 1, "the queue was never seen full; the test did not test a full queue"
    assert max(res.health_ms) < HEALTH_BOUND_MS, f"health took {max(res.health_ms):.0f} ms while the queue was full"
    assert after.status == {"200": 3}
    assert app.state.internal_errors == 0


def test_load_script_talks_only_to_loopback():
    for url in ("http://example.com", "https://127.0.0.1:1", "http://10.0.0.1:8000", "http://127.0.0.1.nip.io"):
        with pytest.raises(ValueError, match="this machine"):
            web_load.run_load(url, clients=1, requests=1)
