"""The view a request is budgeted for is the view it gets: the server decides full maps or the
compact view once, by the core's rule on the units shown (`ExplainResult.compact_view`), and asks
`to_dict` for that view; rollout is budgeted for the passes it makes; kept sessions hold only the
recorded tensors they are counted by; a full-maps answer is encoded a piece at a time."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

import qkv
from qkv.web.app import create_app, encode_json
from qkv.web.service import Sessions, explain_cost, rollout_passes, weights_cost

from .test_budget import counting_forwards


@pytest.mark.parametrize("text,options", [
    ("cat " * 240, {"hide_special": True}),  # 240 shown words: full under the core's rule, 242 with specials
    ("cat " * 241, {"hide_special": False}),
    ("cat " * 300, {"method": "rollout"}),  # rollout: the view of every head's maps, as the core decides
    ("cat " * 200, {"method": "rollout"}),
    ("cat " * 241, {"level": "token", "hide_special": True}),
])
def test_the_budgeted_view_is_the_answered_view(registry, text, options):
    app = create_app(registry=registry)
    with TestClient(app) as c:
        plan = app.state.service.explain(_request(app, text, **options))()
        got = c.post("/api/explain", json={"text": text, **options})
    assert got.status_code == 200, got.text
    data = got.json()
    model, _ = registry.get("minilm")
    result = qkv.explain(text, model)
    expected = "rows" if result.compact_view(options.get("level", "word"), options.get("hide_special", False)) \
        else "full"
    assert plan.cost.view == data["view"] == expected
    assert len(got.content) <= plan.cost.answer, "the answer is larger than its estimate"


def _request(app, text, **options):
    from qkv.web.schema import request_models

    explain_request = request_models(app.state.limits)[0]
    return explain_request(text=text, **options)


def test_rollout_is_budgeted_for_its_passes():
    raw = explain_cost(1000, 1000, 12, 4, 16, 64, view="rows", recorded_rows=1000)
    compact = explain_cost(1000, 1000, 12, 4, 16, 64, view="rows", recorded_rows=1000,
                           passes=12 + rollout_passes(range(12)))
    assert raw.compute == 1000 * 1000 * 12 * 4 and compact.compute == 1000 * 1000 * 4 * (12 + 78)
    assert rollout_passes([0]) == 1 and rollout_passes([11]) == 12 and rollout_passes([2, 5]) == 9
    one = weights_cost(1000, 1000, 12, 4, 1, "rollout", [11])
    assert one.compute == 1000 * 1000 * 4 * 12


def test_rollout_rows_form_the_weights_their_budget_counts(registry, monkeypatch):
    """A counting spy on Record.weights: the rows of the compact rollout view, and of one layer's
    rollout row, form exactly the weights rollout_passes counts (besides the summaries' one pass)."""
    from qkv.inspect import capture

    model, _ = registry.get("minilm")
    result = qkv.explain("cat " * 40, model)
    formed = [0]
    real = capture.Record.weights

    def counting(self, positions=None, heads=None):
        w = real(self, positions, heads)
        formed[0] += w.numel()
        return w
    monkeypatch.setattr(capture.Record, "weights", counting)
    n, H = len(result.tokens), result.num_heads
    result.weights_dict([3], layers=[2], method="rollout")
    assert formed[0] == n * n * H * rollout_passes([2])


def test_sessions_keep_only_what_they_count(registry):
    model, _ = registry.get("minilm")
    result = qkv.explain("The cat sat on the mat.", model)
    result.to_dict(method="rollout")  # fills the full maps' cache
    assert result._cache
    kept = Sessions(max_bytes=10**9)
    assert kept.put(result) is not None and not result._cache
    translate = qkv.explain("The cat sat.", "translate")
    assert Sessions(max_bytes=10**9).put(translate) is None, "an encoder-decoder has no /api/weights"


def test_a_full_answer_is_encoded_in_pieces_and_equals_json_dumps(registry):
    model, _ = registry.get("minilm")
    data = qkv.explain("The cat sat on the mat.", model).to_dict(focus="cat", rows="all")
    assert json.loads(encode_json(data)) == json.loads(json.dumps(data))
    assert encode_json(data) == json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    with pytest.raises(ValueError):
        encode_json({"maps": [[[float("nan")]]]})


def test_a_full_maps_answer_does_not_stall_health(registry):
    """/api/health stays live while the largest full-maps answer the default limits allow is
    computed and encoded (a real server on 127.0.0.1): answered while it runs, each answer in
    under 0.3 of the heavy request's own time (a stalled event loop holds health for much of it;
    a fixed bound in seconds would measure the shared test machine, not the server)."""
    import threading
    import time

    import httpx

    from .web_helpers import running_server

    app = create_app(registry=registry)
    model, _ = registry.get("minilm")
    text = "cat " * 300  # 302 tokens: 6 x 12 x 302^2 weights, about 45 MB of JSON, under 64 MB
    with running_server(app) as url, counting_forwards(model):
        done, slowest, sizes, answered = threading.Event(), [0.0], [], [0]

        def heavy():
            try:
                r = httpx.post(url + "/api/explain", json={"text": text, "rows": "all"}, timeout=120)
                # not r.json(): parsing 45 MB here would hold this process's GIL, the server's too
                sizes.append((r.status_code, len(r.content), b'"view":"full"' in r.content))
            finally:
                done.set()

        worker = threading.Thread(target=heavy)
        start = time.monotonic()
        worker.start()
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=10) as client:
            while not done.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                assert client.get(url + "/api/health").status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - t0)
                answered[0] += not done.is_set()
                time.sleep(0.02)
        worker.join(timeout=5)
        heavy_s = time.monotonic() - start
    assert done.is_set() and sizes and sizes[0][0] == 200 and sizes[0][2] and sizes[0][1] > 30_000_000, sizes
    assert answered[0] >= 3, "health was never answered while the full-maps answer ran: the test did not test it"
    # One json.dumps of the whole answer (holding the interpreter's lock) stalled health for 0.53 of
    # the request's time in each of five runs (1.5-2.5 s); encoded a row at a time, 0.12 (0.54 s).
    assert slowest[0] < 0.3 * heavy_s, (f"/api/health took {slowest[0]:.2f} s during a full-maps answer "
                                        f"({heavy_s:.2f} s): the event loop was stalled")
