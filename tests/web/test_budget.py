"""The server budgets work by cost, not characters: every request's cost (weights the model
forms, memory, answer bytes) is estimated from the tokenizer's count before the model runs, and
a request over a limit is a 413 too_costly that names the estimate, the limit and the flag of
`qkv serve` that raises it, refused before anything is allocated. Heavy requests are admitted by
their memory estimate (a byte budget), and a request whose client goes away stops and frees its
worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
from starlette.testclient import TestClient

import qkv.inspect
from qkv.inspect.explain import prepare
from qkv.web.app import Gate, create_app
from qkv.web.schema import MB

from .test_api import assert_error
from .web_helpers import TEXT, running_server

LONG = "a " * 500  # 502 MiniLM tokens: every full map of it is a 356 MB answer


@contextlib.contextmanager
def counting_forwards(model):
    """The number of times the model's forward ran, in a list of one (a forward pre-hook)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def tokens_of(registry, text):
    model, _ = registry.get("minilm")
    return len(prepare(text, model, "minilm")[0].tokens)


def test_all_rows_of_a_long_text_are_refused_before_the_model_runs(registry, reference):
    app = create_app(registry=registry)
    model, _ = registry.get("minilm")
    with TestClient(app) as c, counting_forwards(model) as calls:
        err = assert_error(c.post("/api/explain", json={"text": LONG, "rows": "all"}), 413, "too_costly")
        assert calls == [0], "the model ran for a request refused by its cost"
    limit = err["limit"]
    assert limit["name"] == "max_answer" and limit["flag"] == "--max-answer-mb" and limit["limit"] == 64 * MB
    n, L, H = tokens_of(registry, LONG), reference.num_layers, reference.num_heads
    assert limit["estimate"] > L * H * n * n * 8, "a full answer holds every weight, several bytes each"
    assert "--max-answer-mb" in err["message"] and "MB" in err["message"]
    assert app.state.internal_errors == 0


def test_the_weights_formed_are_counted_and_refused_over_max_cost(registry, reference):
    n, L, H = tokens_of(registry, TEXT), reference.num_layers, reference.num_heads
    cost = n * n * L * H
    model, _ = registry.get("minilm")
    app = create_app(registry=registry, max_cost=cost - 1)
    with TestClient(app) as c, counting_forwards(model) as calls:
        err = assert_error(c.post("/api/explain", json={"text": TEXT}), 413, "too_costly")
        assert calls == [0]
    assert err["limit"] == {"name": "max_cost", "estimate": cost, "limit": cost - 1, "flag": "--max-cost"}
    assert f"{cost:,} attention weights ({n} tokens squared x {L} layers x {H} heads)" in err["message"]
    with TestClient(create_app(registry=registry, max_cost=cost)) as c:  # at the limit: served
        assert c.post("/api/explain", json={"text": TEXT}).status_code == 200


def test_memory_over_the_budget_is_refused_naming_its_flag(registry):
    model, _ = registry.get("minilm")
    app = create_app(registry=registry, max_memory_mb=1)
    with TestClient(app) as c, counting_forwards(model) as calls:
        medium = "the cat sat on the mat " * 10
        err = assert_error(c.post("/api/compare", json={"text": medium, "other": medium}), 413, "too_costly")
        assert calls == [0]
    assert err["limit"]["name"] == "max_memory" and err["limit"]["flag"] == "--max-memory-mb"
    assert err["limit"]["estimate"] > err["limit"]["limit"] == 1 * MB


def test_characters_are_no_longer_the_limit(registry):
    """The default takes a few thousand words: what stops them is the model (512 positions)."""
    words = " ".join(["word"] * 3000)
    app = create_app(registry=registry)
    assert app.state.limits.max_chars >= 15_000 and app.state.limits.max_body >= 2 * 6 * app.state.limits.max_chars
    with TestClient(app) as c:
        err = assert_error(c.post("/api/explain", json={"text": words}), 422, "cannot_explain")
        assert "takes at most 512" in err["message"]
        # the body of a compare of two such texts, every character escaped, fits the body limit
        body = json.dumps({"text": "\u00e9" * 15_000, "other": "\u00e9" * 15_000}, ensure_ascii=True)
        assert len(body) <= app.state.limits.max_body


def test_the_compact_view_of_a_long_text_is_small(registry):
    app = create_app(registry=registry)
    with TestClient(app) as c:
        resp = c.post("/api/explain", json={"text": LONG, "focus": 3})
    assert resp.status_code == 200, resp.text[:300]
    data = resp.json()
    assert data["view"] == "rows" and data.get("maps") is None and isinstance(data["session"], str)
    assert len(resp.content) < 2 * MB, len(resp.content)


# --------------------------------------------------------------------------- the memory budget


def test_the_gate_admits_by_bytes_first_come_first_served():
    """Budget 100 bytes, three workers: jobs of 60, 30, 50, 10 bytes. 60 and 30 run; 50 waits
    (it does not fit), and 10, behind it, waits too (first come, first served); when 60 ends,
    both start."""
    gate = Gate(workers=3, max_queue=8, max_memory=100)
    release = {need: threading.Event() for need in (60, 30, 50, 10)}
    started: list[int] = []

    def work(need):
        started.append(need)
        release[need].wait(30)
        return need

    async def scenario():
        async def one(need):
            return await gate.run(lambda: need, work, memory=lambda planned: planned)

        tasks = {}
        for need in (60, 30, 50, 10):
            tasks[need] = asyncio.ensure_future(one(need))
            await until(lambda: gate.waiting == 0 or len(gate._waiters) >= 1)
        await until(lambda: len(started) == 2 and len(gate._waiters) == 2)
        seen = (sorted(started), gate.used, gate.running, gate.waiting)
        release[60].set()
        await until(lambda: len(started) == 4)
        after = (sorted(started), gate.used)
        for e in release.values():
            e.set()
        results = [await tasks[need] for need in (60, 30, 50, 10)]
        return seen, after, results

    async def until(cond, deadline=20.0):
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > deadline:
                raise AssertionError(f"not reached: {gate.stats()}, started {started}")
            await asyncio.sleep(0.01)

    seen, after, results = asyncio.run(scenario())
    assert seen == ([30, 60], 90, 2, 2), seen
    assert after == ([10, 30, 50, 60], 90), after
    assert results == [60, 30, 50, 10]
    assert gate.running == 0 and gate.used == 0 and gate.waiting == 0


# --------------------------------------------------------------------------- cancellation


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST over a plain socket and return it unread (the test closes it: a disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def wait_for(cond, what: str, deadline: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def test_a_cancelled_request_stops_and_frees_its_worker(registry, monkeypatch):
    """One worker, one slow explain that runs until it is told to stop (the check the core's
    recorder and chunk loops make, `stopping`): its client disconnects, the job stops, the
    worker and its bytes come back, and the next request runs."""
    from qkv.web import service

    real = qkv.inspect.explain
    running, saw_stop = threading.Event(), threading.Event()

    def slow(*a, **k):
        if not running.is_set():
            running.set()
            t0 = time.monotonic()
            while not service.stop_requested() and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            if service.stop_requested():
                saw_stop.set()
        return real(*a, **k)

    monkeypatch.setattr(qkv.inspect, "explain", slow)
    app = create_app(registry=registry, workers=1, max_queue=4)
    gate = app.state.gate
    with running_server(app) as url:
        s = raw_post(url, "/api/explain", {"text": TEXT})
        assert running.wait(30), "the job never started"
        assert gate.stats()["running"] == 1
        # a second request waits behind it; its client goes away too
        s2 = raw_post(url, "/api/explain", {"text": TEXT})
        wait_for(lambda: gate.waiting == 1 and len(gate._waiters) == 1, "the second request waiting")
        s2.close()
        wait_for(lambda: gate.waiting == 0, "the waiting request leaving the queue")
        s.close()
        assert saw_stop.wait(30), "the running job was never told to stop"
        wait_for(lambda: gate.running == 0 and gate.cancelled == 2, "the worker freed, both requests cancelled")
        stats = httpx.get(url + "/api/health", timeout=10).json()["queue"]
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["memory_used"] == 0, stats
        assert stats["cancelled"] == 2, stats
        after = httpx.post(url + "/api/explain", json={"text": TEXT}, timeout=60)
        assert after.status_code == 200, after.text[:300]
    assert app.state.internal_errors == 0
