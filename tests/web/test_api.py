"""The explorer's JSON API through Starlette's TestClient (httpx): the numbers are those of
qkv.explain, and every bad request gets a 4xx JSON error that never reaches the catch-all."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from importlib import resources

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

import qkv.inspect
import qkv.models
from qkv import cli
from qkv.web.app import STATIC_FILES, create_app
from qkv.web.service import ModelRegistry

from .web_helpers import TEXT, running_server

API_POSTS = ("/api/explain", "/api/steps", "/api/compare")  # /api/weights: tests/web/test_long.py


@pytest.fixture(scope="module")
def app(registry):
    return create_app(registry=registry, max_chars=200, max_body=4096)


def post(client, path, body):
    return client.post(path, json=body)


def assert_error(resp, status, code):
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:300]}"
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["status"] == status and err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text and "File \"" not in resp.text
    return err


def as_json(x):
    return json.loads(json.dumps(x))


# --------------------------------------------------------------------------- good requests


def test_health_and_models(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["queue"]["waiting"] == 0
    m = client.get("/api/models").json()
    names = [e["name"] for e in m["models"]]
    assert "minilm" in names and m["default"] == "minilm"
    assert all(e["source"] == "bundled" for e in m["models"])
    assert m["limits"] == {"max_chars": 200, "max_body_bytes": 4096, "max_cost": 2**30, "max_answer_bytes": 64 * 2**20,
                           "max_memory_bytes": 2048 * 2**20, "max_session_bytes": 1024 * 2**20, "max_pick": 64}


@pytest.mark.parametrize("options", [
    dict(method="raw", level="word", hide_special=False, focus=None),
    dict(method="raw", level="word", hide_special=False, focus="cat"),
    dict(method="rollout", level="word", hide_special=True, focus="cat"),
    dict(method="value-norm", level="token", hide_special=False, focus="mat"),
])
def test_explain_numbers_equal_to_dict(client, reference, options):
    body = {"text": TEXT, "model": "minilm", **{k: v for k, v in options.items() if v is not None}}
    resp = post(client, "/api/explain", body)
    assert resp.status_code == 200, resp.text
    want = as_json(reference.to_dict(**options))
    want["model"] = "minilm"
    got = resp.json()
    assert isinstance(got.pop("session"), str)
    assert got == want


def test_explain_defaults_and_focus_index(client, reference):
    got = post(client, "/api/explain", {"text": TEXT, "focus": 2}).json()
    want = as_json(reference.to_dict(focus="cat"))
    assert got["focus"] == want["focus"] and got["maps"] == want["maps"]


def test_steps_numbers(client, reference, registry):
    """The server records only the word's rows (linear in the length): its numbers are exactly
    those of qkv.explain(..., rows="focus"), and those of the full recording up to float32
    rounding (one row's dot products are summed in another order than the whole matrix's)."""
    resp = post(client, "/api/steps", {"text": TEXT, "word": "cat", "layer": 5, "head": 11})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    model, _ = registry.get("minilm")
    s = qkv.inspect.explain(TEXT, model, focus="cat", rows="focus").steps("cat", 5, 11)
    full = reference.steps("cat", 5, 11)
    assert got["token_label"] == "cat" and got["token"] == s.token == full.token == 2
    for name in ("query", "keys", "scores", "weights", "values", "output"):
        np.testing.assert_allclose(got[name], getattr(s, name).double().numpy(), rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got[name], getattr(full, name).double().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(got["dots"]) * got["scale"], got["scores"], rtol=1e-5, atol=1e-6)
    assert abs(sum(got["weights"]) - 1) < 1e-5
    out = np.asarray(got["weights"]) @ np.asarray(got["values"])
    np.testing.assert_allclose(out, got["output"], rtol=1e-5, atol=1e-6)
    # the same word by its index among the shown words (hidden specials shift it)
    by_index = post(client, "/api/steps", {"text": TEXT, "word": 1, "layer": 5, "head": 11,
                                           "hide_special": True}).json()
    assert by_index["weights"] == got["weights"]


def test_compare(client, reference, registry):
    other = "The dog sat on the mat."
    resp = post(client, "/api/compare", {"text": TEXT, "other": other, "focus": "sat"})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    want_a = as_json(reference.to_dict(focus="sat"))
    want_a["model"] = "minilm"
    sessions = got["a"].pop("session"), got["b"].pop("session")
    assert all(isinstance(s, str) for s in sessions) and sessions[0] != sessions[1]
    assert got["a"] == want_a
    assert got["b"]["text"] == other and got["same_length"] is True
    model, _ = registry.get("minilm")
    b = qkv.inspect.explain(other, model)
    jsd = reference.compare(b, "sat")["jsd"].double().numpy()
    np.testing.assert_allclose(got["jsd"], jsd, rtol=0, atol=1e-12)
    assert got["largest"]["jsd"] == pytest.approx(jsd.max())
    # different lengths: both views, no divergence, a note
    diff = post(client, "/api/compare", {"text": TEXT, "other": "A dog.", "focus": "cat"}).json()
    assert diff["jsd"] is None and "same" in diff["note"] and diff["b"]["focus"] is None


# --------------------------------------------------------------------------- bad requests

BAD_BODIES = [
    # (endpoint, body, status, code)
    ("/api/explain", [TEXT], 422, "wrong_type"),
    ("/api/explain", "just a string", 422, "wrong_type"),
    ("/api/explain", {}, 422, "missing_field"),
    ("/api/explain", {"text": 5}, 422, "wrong_type"),
    ("/api/explain", {"text": None}, 422, "wrong_type"),
    ("/api/explain", {"text": "   "}, 422, "empty_text"),
    ("/api/explain", {"text": "x" * 201}, 413, "text_too_long"),
    ("/api/explain", {"text": TEXT, "colour": "red"}, 422, "unknown_field"),
    ("/api/explain", {"text": TEXT, "method": "attention"}, 422, "bad_value"),
    ("/api/explain", {"text": TEXT, "method": 1}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "level": "char"}, 422, "bad_value"),
    ("/api/explain", {"text": TEXT, "hide_special": "yes"}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "hide_special": 1}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "focus": ["cat"]}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "focus": True}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "focus": "dog"}, 422, "unknown_word"),
    ("/api/explain", {"text": TEXT, "focus": 99}, 422, "unknown_word"),
    ("/api/explain", {"text": TEXT, "focus": -1}, 422, "unknown_word"),
    ("/api/explain", {"text": TEXT, "focus": ""}, 422, "bad_value"),
    ("/api/explain", {"text": TEXT, "model": 3}, 422, "wrong_type"),
    ("/api/explain", {"text": TEXT, "model": "gpt-17"}, 404, "unknown_model"),
    ("/api/steps", {"text": TEXT, "layer": 0, "head": 0}, 422, "missing_field"),
    ("/api/steps", {"text": TEXT, "word": "cat", "head": 0}, 422, "missing_field"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": 6, "head": 0}, 422, "unknown_layer"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": -1, "head": 0}, 422, "unknown_layer"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": 0, "head": 12}, 422, "unknown_head"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": 0.5, "head": 0}, 422, "wrong_type"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": True, "head": 0}, 422, "wrong_type"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": "1", "head": 0}, 422, "wrong_type"),
    ("/api/steps", {"text": TEXT, "word": "dog", "layer": 0, "head": 0}, 422, "unknown_word"),
    ("/api/steps", {"text": TEXT, "word": 9, "layer": 0, "head": 0}, 422, "unknown_word"),
    ("/api/steps", {"text": TEXT, "word": {"w": 1}, "layer": 0, "head": 0}, 422, "wrong_type"),
    ("/api/compare", {"text": TEXT}, 422, "missing_field"),
    ("/api/compare", {"text": TEXT, "other": ""}, 422, "empty_text"),
    ("/api/compare", {"text": TEXT, "other": "y" * 500}, 413, "text_too_long"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "focus": "dog"}, 422, "unknown_word"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "model": "nope"}, 404, "unknown_model"),
]


@pytest.mark.parametrize("path, body, status, code", BAD_BODIES)
def test_bad_bodies(client, path, body, status, code):
    assert_error(post(client, path, body), status, code)


BAD_TEXTS = ["\ud800", "a cat \udce9 here", "\udfff", "The cat\ud83d sat"]


@pytest.mark.parametrize("text", BAD_TEXTS)
@pytest.mark.parametrize("path, field", [(p, "text") for p in API_POSTS] + [("/api/compare", "other")])
def test_text_that_is_not_unicode_is_a_422(client, path, field, text):
    """A lone surrogate (JSON "\\ud800") reaches no tokenizer: 422 bad_text naming the field and the index."""
    body = {"text": TEXT, "other": TEXT, "word": "cat", "layer": 0, "head": 0}
    body = {k: v for k, v in body.items() if k in ("text",) or (path == "/api/compare" and k == "other")
            or (path == "/api/steps" and k in ("word", "layer", "head"))}
    body[field] = text
    raw = json.dumps(body)  # ASCII, with the surrogate escaped as JSON allows
    resp = client.post(path, content=raw, headers={"content-type": "application/json"})
    err = assert_error(resp, 422, "bad_text")
    bad_at = text.index(next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF))
    assert f"'{field}' is not valid Unicode at index {bad_at}" \
        in err["message"], err


@pytest.mark.parametrize("word", ["cat", 1, "sees"])
def test_steps_on_an_encoder_decoder_is_a_422(client, word):
    body = {"text": "the big red cat sees a small dog", "model": "translate", "word": word, "layer": 0, "head": 0}
    err = assert_error(post(client, "/api/steps", body), 422, "not_supported")
    assert "encoder-decoder" in err["message"] and "/api/explain" in err["message"]


def test_too_many_tokens_names_the_field_not_a_python_argument(client):
    body = {"text": TEXT, "other": "c3 " * 60, "model": "recall"}
    err = assert_error(post(client, "/api/compare", body), 422, "cannot_explain")
    assert re.search(r"'other' has \d+ tokens but the model 'recall' takes at most 20", err["message"]), err
    assert "truncate" not in err["message"]


PATH_LIKE = ["../../etc/passwd", "/etc/passwd", "minilm/../minilm", "./minilm", "~/models/x", "C:\\models\\x",
             "sentence-transformers/all-MiniLM-L6-v2", "file:///etc/passwd", "minilm\x00", ".", ""]


@pytest.mark.parametrize("name", PATH_LIKE)
@pytest.mark.parametrize("path", API_POSTS)
def test_path_like_model_names_are_unknown(client, path, name):
    body = {"text": TEXT, "model": name, "word": "cat", "layer": 0, "head": 0}
    if path != "/api/steps":
        body = {"text": TEXT, "model": name}
    if path == "/api/compare":
        body["other"] = TEXT
    assert_error(post(client, path, body), 404, "unknown_model")


@pytest.mark.parametrize("path", API_POSTS)
@pytest.mark.parametrize("raw", [b"{", b"{'text': 'single quotes'}", b"\xff\xfe", b"", b"[" * 2000 + b"]" * 2000,
                                 b"NaN", b'{"text": "a"} trailing'])
def test_malformed_json(client, path, raw):
    resp = client.post(path, content=raw, headers={"content-type": "application/json"})
    if raw == b"NaN":  # valid to Python's parser: a number, not an object
        assert_error(resp, 422, "wrong_type")
    else:
        assert_error(resp, 400, "malformed_json")


@pytest.mark.parametrize("path", API_POSTS)
def test_not_json_content_type(client, path):
    resp = client.post(path, content=json.dumps({"text": TEXT}), headers={"content-type": "text/plain"})
    assert_error(resp, 415, "unsupported_media_type")
    resp = client.post(path, data={"text": TEXT})  # an HTML form post
    assert_error(resp, 415, "unsupported_media_type")


def test_body_too_large(client):
    big = {"text": TEXT, "pad": "x" * 5000}
    assert_error(post(client, "/api/explain", big), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is counted while reading
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    resp = client.post("/api/explain", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "body_too_large")


def test_bad_content_length(client):
    resp = client.post("/api/explain", content=b'{"text": "a"}',
                       headers={"content-type": "application/json", "content-length": "-5"})
    assert_error(resp, 400, "bad_request")


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/api/nothing"), 404, "not_found")
    assert_error(client.get("/api/explain"), 405, "method_not_allowed")
    assert_error(client.delete("/api/models"), 405, "method_not_allowed")
    assert_error(client.post("/", json={}), 405, "method_not_allowed")


# --------------------------------------------------------------------------- the answers of the hand-written checks
# The answers before the pydantic models (commit 1da6627), pinned: status, code and the message.


def post_raw(client, path, body):
    """`body` sent as ASCII JSON, so a lone surrogate goes as the escape "\\ud800"."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_said(resp, status, code, says):
    err = assert_error(resp, status, code)
    assert says in err["message"], err
    return err


@pytest.mark.parametrize("path", ["/api/health", "/api/models", "/api/openapi.json", "/"])
def test_get_routes_answer_head_too(client, path):
    """Starlette's routes answered HEAD wherever they answered GET; a 405 says Allow: GET, HEAD.
    The document lists the GET alone."""
    resp = client.head(path)
    assert resp.status_code == 200 and resp.content == b"", resp.status_code
    assert resp.headers["content-type"] == client.get(path).headers["content-type"]
    for method in ("DELETE", "PUT", "POST"):
        err = assert_error(client.request(method, path), 405, "method_not_allowed")
        assert err["message"] == f"{method} is not allowed here"
        assert set(client.request(method, path).headers["allow"].split(", ")) == {"GET", "HEAD"}
    if path != "/":
        assert set(client.get("/api/openapi.json").json()["paths"][path]) == {"get"}


EXPLAIN_FIELDS = "the fields are: text, model, focus, method, level, hide_special, rows"
STEPS = {"text": TEXT, "word": "cat", "layer": 0, "head": 0}


@pytest.mark.parametrize("path, body, status, code, says", [
    # several errors: the first field in the order text, (other), model, the rest is told
    ("/api/explain", {"text": "", "level": "x"}, 422, "empty_text", "'text' is empty"),
    ("/api/explain", {"text": "", "model": 3}, 422, "empty_text", "'text' is empty"),
    ("/api/explain", {"level": "x", "method": "x"}, 422, "missing_field", "the field 'text' is required"),
    ("/api/explain", {"text": 3, "focus": "", "level": "x"}, 422, "wrong_type", "'text' must be a string; got an"),
    ("/api/compare", {"text": "\ud800", "other": ""}, 422, "bad_text", "'text' is not valid Unicode"),
    ("/api/steps", {"text": TEXT, "word": "", "layer": "x"}, 422, "bad_value", "'word' is empty"),
    ("/api/steps", {"text": TEXT, "word": "cat", "layer": "x", "head": None}, 422, "wrong_type",
     "'layer' must be an integer; got a string"),
    # the model's name is looked at last: a null model after the other fields, an unknown one after all
    ("/api/explain", {"text": TEXT, "model": None, "level": "x"}, 422, "bad_value", "'level' must be one of"),
    ("/api/explain", {"text": TEXT, "model": None}, 422, "wrong_type",
     "'model' must be a string (a model name); got null"),
    ("/api/explain", {"text": TEXT, "model": "nope", "level": "x"}, 422, "bad_value", "'level' must be one of"),
    ("/api/explain", {"text": TEXT, "model": 3}, 422, "wrong_type", "'model' must be a string; got an integer"),
    # unknown fields: the first by name; the fields listed in the old order
    ("/api/explain", {"zzz": 1, "text": TEXT, "aaa": 2}, 422, "unknown_field",
     f"unknown field 'aaa'; {EXPLAIN_FIELDS}"),
    ("/api/explain", {"text": "", "colour": "red", "level": "x"}, 422, "unknown_field",
     f"unknown field 'colour'; {EXPLAIN_FIELDS}"),
    ("/api/explain", {"text": TEXT, "zz": 1, "\udc00": 2}, 422, "unknown_field", "unknown field 'zz'"),
    ("/api/steps", {**STEPS, "focus": 1}, 422, "unknown_field",
     "the fields are: text, model, word, layer, head, level, hide_special"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "word": 1}, 422, "unknown_field",
     "the fields are: text, other, model, focus, method, level, hide_special"),
    # the messages of the choices and of a word of the wrong type
    ("/api/explain", {"text": TEXT, "method": "x"}, 422, "bad_value",
     "'method' must be one of raw, rollout, value-norm; got 'x'"),
    ("/api/explain", {"text": TEXT, "method": "\ud800"}, 422, "bad_value", "'method' must be one of raw"),
    ("/api/steps", {**STEPS, "level": "WORD"}, 422, "bad_value", "'level' must be one of word, token; got 'WORD'"),
    ("/api/explain", {"text": TEXT, "focus": 1.5}, 422, "wrong_type",
     "'focus' must be a word (a string) or a word index (an integer); got a number"),
    ("/api/steps", {**STEPS, "word": None}, 422, "wrong_type",
     "'word' must be a word (a string) or a word index (an integer); got null"),
    ("/api/explain", {"text": TEXT, "hide_special": None}, 422, "wrong_type",
     "'hide_special' must be true or false; got null"),
])
def test_the_first_error_in_the_old_order(client, path, body, status, code, says):
    assert_said(post_raw(client, path, body), status, code, says)


@pytest.mark.parametrize("path, body, status, code, says", [
    ("/api/steps", {**STEPS, "layer": -1, "model": "nope"}, 404, "unknown_model", "no model named 'nope'"),
    ("/api/explain", {"text": TEXT, "focus": -1, "model": "nope"}, 404, "unknown_model", "no model named 'nope'"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "focus": -1, "model": "nope"}, 404, "unknown_model", "'nope'"),
    ("/api/steps", {**STEPS, "layer": -1}, 422, "unknown_layer", "layer -1 does not exist: the model has layers 0..5"),
    ("/api/steps", {**STEPS, "layer": -1, "head": -1}, 422, "unknown_layer", "the model has layers 0..5"),
    ("/api/steps", {**STEPS, "head": -1}, 422, "unknown_head", "head -1 does not exist: the model has heads 0..11"),
    ("/api/steps", {**STEPS, "layer": 10**30}, 422, "unknown_layer", "the model has layers 0..5"),
    ("/api/steps", {**STEPS, "word": -1, "layer": -1}, 422, "unknown_word",
     "word index -1 is out of range: the text has 9 words"),
    ("/api/steps", {**STEPS, "word": -1, "hide_special": True}, 422, "unknown_word",
     "the text has 7 words (special tokens hidden)"),
    ("/api/explain", {"text": TEXT, "focus": -1}, 422, "unknown_word", "word index -1 is out of range"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "focus": -1}, 422, "unknown_word", "word index -1 is out of range"),
])
def test_negative_indices_are_the_service_s_to_refuse(client, path, body, status, code, says):
    """No ge=0 in the models: an unknown model is a 404 before any index, and an index is told
    against what the text or the model has. The document still says minimum 0."""
    assert_said(post(client, path, body), status, code, says)
    schemas = client.get("/api/openapi.json").json()["components"]["schemas"]
    steps = schemas["StepsRequest"]["properties"]
    assert steps["layer"]["minimum"] == 0 and steps["head"]["minimum"] == 0
    for word in (steps["word"], schemas["ExplainRequest"]["properties"]["focus"]):
        assert {"type": "integer", "minimum": 0} in word["anyOf"], word


@pytest.mark.parametrize("path, body, status, code, says", [
    ("/api/explain", {"text": TEXT, "focus": "   "}, 422, "bad_value",
     "'focus' is empty; give a word of the text or its index"),
    ("/api/explain", {"text": TEXT, "focus": ""}, 422, "bad_value",
     "'focus' is empty; give a word of the text or its index"),
    ("/api/explain", {"text": TEXT, "focus": "   ", "model": "nope"}, 422, "bad_value", "'focus' is empty"),
    ("/api/steps", {**STEPS, "word": " "}, 422, "bad_value", "'word' is empty; give a word of the text or its index"),
    ("/api/compare", {"text": TEXT, "other": TEXT, "focus": "\t"}, 422, "bad_value", "'focus' is empty"),
    ("/api/explain", {"text": TEXT, "focus": "x" * 201}, 422, "bad_value",
     "'focus' is 201 characters long; give one word of the text"),
    ("/api/explain", {"text": TEXT, "focus": "\ud800"}, 422, "unknown_word", "is not in the text"),
    ("/api/explain", {"text": TEXT, "model": "\ud800"}, 404, "unknown_model", "no model named"),
    ("/api/explain", {"text": " " * 201}, 422, "empty_text", "'text' is empty; give a sentence"),
    ("/api/compare", {"text": TEXT, "other": "\n" * 500}, 422, "empty_text", "'other' is empty; give a sentence"),
    ("/api/steps", {**STEPS, "text": " " * 300}, 422, "empty_text", "'text' is empty"),
    ("/api/explain", {"text": "x" * 201 + "\ud800"}, 413, "text_too_long",
     "'text' has 202 characters; this server explains at most 200"),
])
def test_blank_words_and_texts_are_told_first(client, path, body, status, code, says):
    """A blank word is a bad value (not an unknown word), a blank text is empty however long it
    is, a text is too long before its characters are looked at."""
    assert_said(post_raw(client, path, body), status, code, says)


# --------------------------------------------------------------------------- static files


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    low = page.text.lower()
    assert "http://" not in low and "https://" not in low and "<style" not in low and "style=" not in low
    assert "<script>" not in low, "an inline script would be refused by the CSP"
    for name, (pkg, path, media) in STATIC_FILES.items():
        resp = client.get(f"/static/{name}")
        assert resp.status_code == 200 and resp.headers["content-type"] == media, name
        assert resp.content == resources.files(pkg).joinpath(*path.split("/")).read_bytes()
        assert b"http://" not in resp.content and b"https://" not in resp.content and b"url(" not in resp.content
    # one renderer, two uses: the offline file inlines the very script the page is served
    from qkv.inspect.html import _SCRIPT

    assert client.get("/static/explain.js").text == _SCRIPT


TRAVERSALS = [
    "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static//etc/passwd", "/static/explain.js/../../pyproject.toml",
    "/static/app.js%00.png", "/static/..\\..\\etc\\passwd", "/static/index.html", "/static/",
    "/static/__init__.py", "/static/service.py", "/static/EXPLAIN.JS", "/etc/passwd", "/static/explain.js.bak",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_unknown_static_paths_are_404(client, path):
    assert_error(client.get(path), 404, "not_found")


def test_raw_traversal_over_a_socket(registry):
    """Paths exactly as sent (no client-side normalisation) to a real server."""
    app = create_app(registry=registry)
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in ("/static/../../etc/passwd", "/static/../app.py", "/../../../etc/passwd",
                     "/static/%2e%2e/%2e%2e/etc/passwd", "/static/....//....//etc/passwd"):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404"), (path, head[:80])
            assert b"root:" not in body and b"import" not in body
    assert app.state.internal_errors == 0


# --------------------------------------------------------------------------- robustness


def test_catch_all_is_json_without_internals(registry, monkeypatch):
    app = create_app(registry=registry)

    def broken(*a, **k):
        raise RuntimeError("secret /home/user/internal detail")

    monkeypatch.setattr(qkv.inspect, "explain", broken)
    with TestClient(app) as c:
        resp = c.post("/api/explain", json={"text": TEXT})
    err = assert_error(resp, 500, "internal")
    assert "secret" not in resp.text and "RuntimeError" not in resp.text
    assert "content-security-policy" in resp.headers
    assert app.state.internal_errors == 1 and err["message"].startswith("internal error")


def test_host_header_is_checked_when_asked(registry):
    app = create_app(registry=registry, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert_error(c.get("/api/health", headers={"host": "attacker.example"}), 400, "bad_host")


def test_queue_full_gives_503(registry, monkeypatch):
    """One worker, no waiting room, a slow explain: of three at once, at least one is a 503,
    every answer is 200 or a clean 503, and /api/health answers meanwhile."""
    real = qkv.inspect.explain
    gate = threading.Event()

    def slow(*a, **k):
        gate.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(qkv.inspect, "explain", slow)
    app = create_app(registry=registry, max_queue=0, workers=1)
    results = []
    with running_server(app) as url:
        def one():
            r = httpx.post(url + "/api/explain", json={"text": TEXT}, timeout=30)
            results.append(r)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while app.state.gate.rejected < 2 and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        health = httpx.get(url + "/api/health", timeout=5)
        assert health.status_code == 200 and health.json()["queue"]["running"] == 1
        # a bad request is answered as such at once, queue full or not
        assert_error(httpx.post(url + "/api/explain", json={"text": 5}, timeout=5), 422, "wrong_type")
        assert_error(httpx.post(url + "/api/explain", json={"text": TEXT, "model": "x"}, timeout=5), 404,
                     "unknown_model")
        gate.set()
        for t in threads:
            t.join(30)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 503, 503], codes
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "busy" and r.headers["retry-after"] == "1"
    assert app.state.internal_errors == 0


# --------------------------------------------------------------------------- the description


def test_openapi_describes_every_route_and_error(client, app):
    spec = client.get("/api/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    api_routes = {r.path for r in app.routes if r.path.startswith("/api/")}
    assert api_routes == set(spec["paths"]), "the OpenAPI paths differ from the app's routes"
    for path in API_POSTS:
        responses = spec["paths"][path]["post"]["responses"]
        observed = {"200"} | {str(s) for _, _, s, _ in BAD_BODIES} | {"400", "413", "415", "500", "503"}
        assert observed <= set(responses), f"{path} does not document {observed - set(responses)}"
    codes = {c for _, _, _, c in BAD_BODIES} | {"malformed_json", "body_too_large", "unsupported_media_type", "busy"}
    text = json.dumps(spec)
    assert all(c in text for c in codes), [c for c in codes if c not in text]


def test_openapi_is_generated_from_the_models_and_keeps_its_promises(client):
    """What the hand-written document promised, now generated from the request and answer
    models: the request fields and which are required, no others, the choices, the server's
    text limit, the answer formats, Retry-After on 503; and no CDN-loaded docs pages."""
    spec = client.get("/api/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def resolve(node):
        return schemas[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    for path in ("/api/health", "/api/models", "/api/openapi.json"):
        assert set(spec["paths"][path]) == {"get"}, path
    image = {"image", "image_name", "sample", "interpolate_pos_encoding"}  # an image model's input instead of text
    requests = {"/api/explain": (set(), {"text", "model", "focus", "method", "level", "hide_special", "rows"} | image,
                                 "qkv.explain/1"),
                "/api/steps": ({"word", "layer", "head"},
                               {"text", "model", "word", "layer", "head", "level", "hide_special"} | image,
                               "qkv.steps/1"),
                "/api/compare": ({"text", "other"}, {"text", "other", "model", "focus", "method", "level",
                                                     "hide_special"}, "qkv.compare/1")}
    for path, (required, fields, fmt) in requests.items():
        op = spec["paths"][path]
        assert set(op) == {"post"}, path
        body = resolve(op["post"]["requestBody"]["content"]["application/json"]["schema"])
        assert set(body.get("required", [])) == required and set(body["properties"]) == fields, path
        assert body["additionalProperties"] is False, path
        props = body["properties"]
        for name in ("text", "other"):
            if name in props:  # the server's limit (max_chars=200 in this app), not a constant
                assert props[name]["maxLength"] == 200 and props[name]["minLength"] == 1, (path, name)
        if "method" in props:
            assert props["method"]["enum"] == ["raw", "rollout", "value-norm"] and props["method"]["default"] == "raw"
        assert props["level"]["enum"] == ["word", "token"] and props["model"]["default"] == "minilm"
        answer = resolve(op["post"]["responses"]["200"]["content"]["application/json"]["schema"])
        assert answer["properties"]["format"]["const"] == fmt, path
        assert "Retry-After" in op["post"]["responses"]["503"]["headers"], path
    explain = resolve({"$ref": "#/components/schemas/ExplainAnswer"})
    assert {"format", "labels", "head_names"} <= set(explain["required"])  # maps: absent in the compact view
    assert {"focus", "entropy", "special", "normalised", "layers", "heads"} <= set(explain["properties"])
    error = schemas["Error"]
    assert error["required"] == ["error"] and set(resolve(error["properties"]["error"])["required"]) == {
        "status", "code", "message"}
    text = json.dumps(spec)
    assert "http://" not in text and "https://" not in text
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert_error(client.get(path), 404, "not_found")


def test_answers_follow_their_models(client):
    """The documented answer models validate what the server sends."""
    from qkv.inspect.schema import ExplainData
    from qkv.web.schema import CompareData, StepsData

    ExplainData.model_validate(post(client, "/api/explain", {"text": TEXT, "focus": "cat"}).json())
    StepsData.model_validate(post(client, "/api/steps", {"text": TEXT, "word": "cat", "layer": 0, "head": 0}).json())
    for other in ("The dog sat on the mat.", "A dog."):
        CompareData.model_validate(post(client, "/api/compare", {"text": TEXT, "other": other, "focus": "sat"}).json())


# --------------------------------------------------------------------------- models and the CLI


def test_model_dir_names_only(tmp_path):
    for name in ("tiny", "minilm", "bad name", ".hidden"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()
    loaded = []
    reg = ModelRegistry(tmp_path, loader=lambda key: loaded.append(key) or object(), check=lambda folder: None)
    names = {e.name: e.source for e in reg.entries()}
    assert names["tiny"] == "model-dir" and names["minilm"] == "bundled"
    assert "bad name" not in names and ".hidden" not in names and "no-config" not in names
    reg.get("tiny")
    reg.get("tiny")
    assert loaded == [str((tmp_path / "tiny").resolve())], "loaded more than once, or from another place"
    app = create_app(registry=reg)
    with TestClient(app) as c:
        assert {"name": "tiny", "source": "model-dir", "modality": "text"} in c.get("/api/models").json()["models"]
        for bad in ("TINY", "../tiny", str(tmp_path / "tiny"), "no-config", "bad name"):
            assert_error(c.post("/api/explain", json={"text": TEXT, "model": bad}), 404, "unknown_model")


def _model_folders(root):
    """Folders under a --model-dir: one good (a copy of the bundled recall), the others broken as named."""
    from qkv.models import bundled_path

    good = bundled_path("recall")
    shutil.copytree(good, root / "good")
    broken = {
        "bad-json": {"config.json": "{not json"},
        "config-list": {"config.json": "[1, 2]"},
        "config-not-utf8": {"config.json": b"\xff\xfe{}"},
        "unknown-arch": {"config.json": json.dumps({"architectures": ["MambaForCausalLM"]})},
        "missing-fields": {"config.json": json.dumps({"architectures": ["BertModel"], "hidden_size": 10,
                                                      "num_attention_heads": 3})},
        "no-weights": {"config.json": (good / "config.json").read_text(), "tokenizer.json": "{}"},
        "pickle-only": {"config.json": (good / "config.json").read_text(), "pytorch_model.bin": b"\x80\x02"},
        "bad-safetensors": {"config.json": (good / "config.json").read_text(), "model.safetensors": b"garbage",
                            "tokenizer.json": "{}"},
        "no-tokenizer": {"config.json": (good / "config.json").read_text(),
                         "model.safetensors": (good / "model.safetensors").read_bytes()},
        "no-config": {"model.safetensors": b""},
        "bad name": {"config.json": (good / "config.json").read_text()},
    }
    for name, files in broken.items():
        (root / name).mkdir()
        for file, content in files.items():
            path = root / name / file
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (root / "a-file.txt").write_text("not a folder: ignored")
    return sorted(broken)


def test_model_dir_offers_only_loadable_folders_and_logs_the_others(tmp_path, caplog):
    broken = _model_folders(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qkv.web"):
        app = create_app(model_dir=str(tmp_path))
    reg = app.state.service.registry
    assert set(reg.skipped) == set(broken)
    logged = caplog.text
    for name in broken:
        assert f"skipped the folder {name!r}" in logged, name
    for words in ("not valid JSON", "MambaForCausalLM", "no weights", "pickle", "not a readable safetensors",
                  "no tokenizer", "no config.json", "plain model name", "not UTF-8"):
        assert words in logged, words
    with TestClient(app) as c:
        offered = {e["name"]: e["source"] for e in c.get("/api/models").json()["models"]}
        assert offered.get("good") == "model-dir" and not set(broken) & set(offered)
        ok = c.post("/api/explain", json={"text": "c3 a7 k2 ? a", "model": "good"})
        assert ok.status_code == 200, ok.text
        for name in broken:
            err = assert_error(c.post("/api/explain", json={"text": TEXT, "model": name}), 404, "unknown_model")
            assert str(tmp_path) not in err["message"]
    assert app.state.internal_errors == 0


def test_a_model_that_fails_on_first_use_is_a_500_then_no_longer_offered(tmp_path, caplog):
    shutil.copytree(qkv.models.bundled_path("recall"), tmp_path / "late")
    calls = []

    def loader(key):
        calls.append(key)
        raise qkv.models.CheckpointError(f"the checkpoint in {key} does not match config.json")

    app = create_app(registry=ModelRegistry(tmp_path, loader=loader))
    with TestClient(app) as c:
        assert "late" in [e["name"] for e in c.get("/api/models").json()["models"]]
        with caplog.at_level(logging.ERROR, logger="qkv.web"):
            err = assert_error(c.post("/api/explain", json={"text": TEXT, "model": "late"}), 500, "model_unavailable")
        assert str(tmp_path) not in err["message"] and "does not match" in caplog.text
        assert "late" not in [e["name"] for e in c.get("/api/models").json()["models"]]
        assert_error(c.post("/api/explain", json={"text": TEXT, "model": "late"}), 500, "model_unavailable")
    assert len(calls) == 1, "a failed model is not loaded again"
    assert app.state.internal_errors == 0


def test_models_are_loaded_once_under_concurrency():
    calls = []

    def loader(key):
        calls.append(key)
        time.sleep(0.2)
        return object()

    reg = ModelRegistry(loader=loader)
    threads = [threading.Thread(target=reg.get, args=("minilm",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg.get("all-minilm-l6-v2")  # an alias of the same bundled model
    assert calls == ["minilm"]


def test_cli_serve_without_starlette(monkeypatch, capsys):
    import sys

    for mod in ("qkv.web.server", "qkv.web.app"):  # imported afresh, they meet the missing packages
        monkeypatch.delitem(sys.modules, mod, raising=False)
    for mod in ("starlette", "uvicorn"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'qkv[web]'" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--max-chars", "0"], "--max-chars"),
    (["--model-dir", "/no/such/folder"], "--model-dir"),
])
def test_cli_serve_bad_arguments(capsys, args, message):
    assert cli.main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_serve_prints_its_address(monkeypatch, capsys):
    import qkv.web.server as server

    seen = {}

    def fake_run(self, sockets=None):
        seen["addr"] = sockets[0].getsockname()

    monkeypatch.setattr(server.uvicorn.Server, "run", fake_run)
    monkeypatch.setattr(server, "create_app", lambda **kw: seen.setdefault("kw", kw) and _StubApp())
    assert cli.main(["serve", "--port", "0", "--max-queue", "3", "--max-image-mb", "2",
                     "--max-image-pixels", "4096"]) == 0
    out = capsys.readouterr().out
    host, port = seen["addr"]
    assert host == "127.0.0.1" and f"http://127.0.0.1:{port}/" in out
    assert seen["kw"]["max_queue"] == 3 and seen["kw"]["allowed_hosts"]
    assert (seen["kw"]["max_image_mb"], seen["kw"]["max_image_pixels"]) == (2, 4096)


class _StubApp:
    class state:  # noqa: N801
        class service:  # noqa: N801
            class registry:  # noqa: N801
                @staticmethod
                def get(name):
                    return None


def test_more_tokens_than_the_model_takes_is_a_422(registry):
    app = create_app(registry=registry, max_chars=1000)
    with TestClient(app) as c:
        resp = c.post("/api/explain", json={"text": "\u4e2d" * 1000})  # one token per character
        err = assert_error(resp, 422, "cannot_explain")
        assert "512" in err["message"]
        ok = c.post("/api/explain", json={"text": "\u4e2d" * 100})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert app.state.internal_errors == 0


def test_qkv_serve_end_to_end(tmp_path):
    """The real command: prints its address, answers on it, refuses a foreign Host, stops on SIGTERM."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--port", "0", "--max-queue", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert lines and lines[0], \
            f"no address printed; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[0])
        assert m, lines[0]
        url = m.group(0).rstrip("/")
        health = httpx.get(url + "/api/health", timeout=10).json()
        assert health["queue"]["max_queue"] == 2 and "minilm" in health["loaded_models"]
        r = httpx.post(url + "/api/explain", json={"text": TEXT, "focus": "cat"}, timeout=30)
        assert r.status_code == 200 and r.json()["focus"]["label"] == "cat"
        assert_error(httpx.get(url + "/api/health", headers={"host": "rebound.example:80"}, timeout=10), 400,
                     "bad_host")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
