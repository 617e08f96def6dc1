"""`qkv explain` on the decoder families, and what a family adds to attention shown per layer:
the sliding window (Mistral's, and one set by hand on a Llama layer) and a score_mod
(soft-capping set by hand), in `layer_attention()`, the "qkv.explain/1" JSON (`attention`),
the terminal table, the HTML page and `qkv serve`'s answer. Read generically from what each
layer passed to `qkv.attention`: no branch on the family."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

import qkv
from qkv.inspect.capture import describe_function
from qkv.inspect.schema import check_data
from qkv.inspect.terminal import render_focus, render_overview
from qkv.masks import soft_cap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXT = "the quick brown fox jumps over the lazy dog"  # 9 words, one token each (the word tokenizer)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from models.hf_folders import build_folder

    out = {}
    for kind in ("mistral", "qwen2", "llama"):
        folder = tmp_path_factory.mktemp(kind)
        build_folder(folder, kind)
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def by_hand(folders):
    """A Llama whose layer 0 attends through a window (2, 0) and layer 1 soft-caps its scores
    at 0.5 (set by hand on the layers: the block's `window` and `score_mod`, which it passes to
    its attention, as Gemma 2's layers do)."""
    model = qkv.load(folders["llama"])
    model.blocks[0].window = (2, 0)
    attn = model.blocks[1].self_attn
    with torch.no_grad():  # random init gives scores near 0.05; make them large enough for a cap at 0.5 to bite
        attn.qkv_proj.weight[:attn.num_heads * attn.head_dim] *= 40
    model.blocks[1].score_mod = soft_cap(0.5)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "llama"])
def test_explain_runs_on_the_decoder_families(folders, kind):
    r = qkv.explain(TEXT, str(folders[kind]), focus="fox")
    assert r.attentions.shape == (2, 4, 9, 9)  # 9 words (the word tokenizer adds no <s>)
    # causal: no weight on later keys; rows sum to 1
    assert torch.all(r.attentions.triu(1) == 0)
    torch.testing.assert_close(r.attentions.sum(-1), torch.ones(2, 4, 9))
    window = [3, 0] if kind == "mistral" else None
    assert r.layer_attention() == [
        {"layer": i, "name": f"model.layers.{i}.self_attn", "causal": True, "window": window, "score_mod": None}
        for i in range(2)]
    data = r.to_dict(focus="fox")
    assert check_data(data) == (9, 2, 4) and data["attention"] == r.layer_attention()
    table = render_focus(r, "fox")
    assert ("window (3, 0)" in table) == (kind == "mistral")


def test_mistral_maps_show_the_window(folders):
    """Each token's weights beyond the 3 keys before it are zero, and the table says so."""
    r = qkv.explain(TEXT, str(folders["mistral"]))
    n = r.attentions.shape[-1]
    far = torch.ones(n, n, dtype=torch.bool).tril(-4)  # keys more than 3 before the query
    assert torch.all(r.attentions[..., far] == 0) and torch.all(r.attentions[..., 5, 2:6] > 0)
    table = render_focus(r, "fox")
    rows = [line for line in table.splitlines() if line.lstrip()[:1].isdigit()]
    assert len(rows) == 2 and all(line.endswith("window (3, 0)") for line in rows)
    assert "window (left, right): each token sees at most `left` keys before it" in table
    assert "attention: window (3, 0)" in render_overview(r)


def test_window_and_soft_cap_set_by_hand(by_hand):
    """Layer 0: window (2, 0); layer 1: global with soft_cap(cap=0.5). The recorded weights honour
    both (layer 1's equal softmax(0.5 tanh(s / 0.5)) of the recorded scores, not plain softmax)."""
    r = qkv.explain(TEXT, by_hand, focus="fox")
    assert r.layer_attention() == [
        {"layer": 0, "name": "model.layers.0.self_attn", "causal": True, "window": [2, 0], "score_mod": None},
        {"layer": 1, "name": "model.layers.1.self_attn", "causal": True, "window": None,
         "score_mod": "soft_cap(cap=0.5)"}]
    n = r.attentions.shape[-1]
    assert torch.all(r.attentions[0][..., torch.ones(n, n, dtype=torch.bool).tril(-3)] == 0)
    scores = r.records[1].scores()[0]  # (H, n, n), unmasked q.k * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    capped = (0.5 * torch.tanh(scores / 0.5)).masked_fill(~causal, float("-inf")).softmax(-1)
    plain = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(r.attentions[1], capped.float(), rtol=0, atol=1e-6)
    assert (r.attentions[1] - plain.float()).abs().max() > 1e-3  # the cap really changes the weights
    table = render_focus(r, "fox")
    assert "  window (2, 0)" in table and "  global, soft_cap(cap=0.5)" in table


def test_json_and_html_carry_the_layers(by_hand, tmp_path):
    from qkv.inspect.html import render_html

    r = qkv.explain(TEXT, by_hand, focus="fox")
    r.save_json(tmp_path / "r.json", focus="fox")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["format"] == "qkv.explain/1"
    assert [a["window"] for a in data["attention"]] == [[2, 0], None]
    assert [a["score_mod"] for a in data["attention"]] == [None, "soft_cap(cap=0.5)"]
    page = render_html(data)
    assert "soft_cap(cap=0.5)" in page and "layerNote" in page
    for method in ("rollout", "value-norm"):  # one entry per layer of maps, whatever the method
        assert check_data(r.to_dict(method=method))[1] == len(r.to_dict(method=method)["attention"])


def test_layers_subset_describes_the_recorded_layers(by_hand):
    r = qkv.explain(TEXT, by_hand, layers=[1])
    data = r.to_dict()
    assert [a["layer"] for a in data["attention"]] == [1] and check_data(data)[1] == 1


def test_schema_stays_backward_compatible(by_hand):
    data = qkv.explain(TEXT, by_hand).to_dict()
    old = {k: v for k, v in data.items() if k != "attention"}  # a file written before the field existed
    assert check_data(old) == check_data(data)
    with pytest.raises(ValueError, match=r"data\['attention'\] has 1 entries for the 2 layers of maps"):
        check_data({**data, "attention": data["attention"][:1]})
    with pytest.raises(ValueError, match="window"):
        check_data({**data, "attention": [{"layer": 0, "window": [1, 2, 3]}, data["attention"][1]]})


def test_describe_function():
    from qkv.nn.attention import _shift_kv

    assert describe_function(soft_cap(50.0)) == "soft_cap(cap=50.0)"
    assert describe_function(_shift_kv(soft_cap(30), 7, with_score=True)) == "soft_cap(cap=30.0)"

    def tanh_cap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score)

    assert describe_function(tanh_cap) == "tanh_cap()"
    tanh_cap.description = "softcap 1.0"
    assert describe_function(tanh_cap) == "softcap 1.0"

    def scaled(score, b, h, q_idx, kv_idx, *, factor):
        return score * factor

    assert describe_function(functools.partial(scaled, factor=2.0)) == "scaled(factor=2.0)"


def test_serve_answers_with_the_layers(folders, tmp_path):
    """`qkv serve`'s /api/explain answer on a Mistral folder carries the windows."""
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from qkv.web.app import create_app
    from qkv.web.service import ModelRegistry

    (tmp_path / "mistral").symlink_to(folders["mistral"], target_is_directory=True)
    app = create_app(registry=ModelRegistry(tmp_path))
    with TestClient(app) as client:
        resp = client.post("/api/explain", json={"text": TEXT, "model": "mistral", "focus": "fox"})
    assert resp.status_code == 200, resp.text[:300]
    assert [a["window"] for a in resp.json()["attention"]] == [[3, 0], [3, 0]]


def test_cli_explain_prints_the_window(folders, capsys):
    from qkv.cli import main

    assert main(["explain", TEXT, "--model", str(folders["mistral"]), "--focus", "fox", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("window (3, 0)") == 2 and "window (left, right): each token sees" in out  # rows, legend


def test_html_page_names_each_layers_attention(by_hand, browser, tmp_path):
    """In the browser: the layer picker and the status line say each layer's window and score_mod."""
    from test_html_browser import Page

    from qkv.inspect.html import write_html

    page = Page(browser, write_html(qkv.explain(TEXT, by_hand).to_dict(), tmp_path / "r.html"))
    options = page.page.eval_on_selector_all("#layer-select option", "els => els.map(e => e.textContent)")
    assert options == ["layer 0 (window (2, 0))", "layer 1 (global, soft_cap(cap=0.5))"]
    assert page.page.text_content("#status").startswith("Layer 1 (global, soft_cap(cap=0.5)), mean of heads")
    page.check_clean()
