"""The SHIPPED trained models (qkv.load("recall"), qkv.load("translate")): held-out accuracy,
the recall lookup head, generation with the KV cache, explain, and the CLI on bad input."""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.models import GPT2LMHeadModel, bundled_path
from qkv.models.seq2seq import QkvSeq2Seq
from qkv.train import recall, translate


@pytest.fixture(scope="module")
def recall_model():
    return qkv.load("recall")


@pytest.fixture(scope="module")
def translate_model():
    return qkv.load("translate")


def test_bundled_folders_are_small_hf_folders():
    for name in ("recall", "translate"):
        folder = bundled_path(name)
        files = sorted(p.name for p in folder.iterdir())
        extra = ["generation_config.json"] if name == "recall" else []
        # .qkv-train: the marker of qkv train's own folders, so the documented retraining may overwrite them
        assert files == sorted([".qkv-train", "config.json", "model.safetensors", "tokenizer.json"] + extra), files
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 3_000_000, f"{name} ships {size} bytes"


def test_recall_held_out_accuracy(recall_model):
    assert isinstance(recall_model, GPT2LMHeadModel)
    acc = recall.accuracy(recall_model, recall.held_out(300))
    assert acc >= 0.99, f"held-out recall accuracy {acc:.4f}"


def test_recall_lookup_head(recall_model):
    """The documented head: from the final key, its strongest weight lands on the matching key
    or on the value right after it, on >= 95% of held-out prompts (recorded by qkv.inspect)."""
    layer, head = recall.LOOKUP_HEAD
    assert json.loads((bundled_path("recall") / "config.json").read_text())["qkv_lookup_head"] == [layer, head]
    hits = recall.lookup_hits(recall_model, recall.held_out(200, seed=7))  # (layers, heads)
    assert hits[layer, head] >= 0.95, \
        f"layer {layer} head {head} lands on the pair in {hits[layer, head]:.3f}; all: {hits}"


def test_recall_lookup_head_through_explain(recall_model):
    result = qkv.explain("c3 a7 k2 f9 ? k", recall_model)
    layer, head = recall.LOOKUP_HEAD
    row = result.attentions[layer, head, -1]  # from the final key "k"
    assert int(row.argmax()) in (4, 5), f"strongest weight on token {int(row.argmax())}: {result.tokens}"


def test_recall_generate_with_the_cache_matches_the_full_forward(recall_model):
    ids = recall.held_out(50)[5][:, :-1]  # 6 pairs, "?", a key
    out = recall_model.generate(ids, max_new_tokens=1)  # (50, L + 1) through the KV cache
    with torch.no_grad():
        full = recall_model(ids)[:, -1].argmax(-1)  # (50,)
    assert torch.equal(out[:, -1], full)
    assert recall_model.complete("c3 a7 k2 ? a", max_new_tokens=1) == "7"


def test_translate_held_out_exact_match(translate_model):
    assert isinstance(translate_model, QkvSeq2Seq)
    acc = translate.exact_match(translate_model, translate.held_out(500))
    assert acc >= 0.98, f"held-out exact match {acc:.4f}"


def test_translate_cache_matches_full_decoding(translate_model):
    texts = translate.held_out(8)
    src, mask, _, _ = translate.encode_pairs(texts)
    cached = translate_model.generate(src, attention_mask=mask)
    with torch.no_grad():
        memory = translate_model.encode(src, mask)
        full = cached[:, :1]
        for _ in range(cached.shape[1] - 1):
            logits = translate_model.logits(translate_model.decode(full, memory, mask))[:, -1]
            full = torch.cat([full, logits.argmax(-1, keepdim=True)], dim=1)
    eos = translate_model.config.eos_token_id
    for a, b in zip(cached.tolist(), full.tolist()):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert a[:cut] == b[:cut]


def test_translate_explain_alignment(translate_model):
    result = qkv.explain("the big red cat sees a small dog", translate_model)
    source, target, cross = result.cross_maps()
    assert source == "the big red cat sees a small dog".split()
    assert target[:-1] == "miro dulo raka ke vasku semi na tolven".split()
    assert cross.shape == (2, 4, len(target), len(source))
    assert torch.allclose(cross.sum(-1), torch.ones(2, 4, len(target)), atol=1e-4)
    data = result.to_dict()
    assert data["cross"]["layers"] == result.cross_layers
    assert len(data["maps"][0][0]) == len(data["labels"]) == len(source) + len(target)


def test_cli_generate_recall(capsys):
    assert main(["generate", "--model", "recall", "c3 a7 k2 ? a"]) == 0
    assert capsys.readouterr().out.strip() == "7"


def test_cli_translate(capsys):
    assert main(["translate", "the big red cat sees a small dog"]) == 0
    assert capsys.readouterr().out.strip() == "miro dulo raka ke vasku semi na tolven"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "recall", "c3 Z7 ? c"], "'Z' not in the vocabulary of 'recall'"),
    (["generate", "--model", "recall", "a1 b2 c3 d4 e5 f6 g7 h8 i9 j0 ? a"], "has 20 positions"),
    (["generate", "--model", "recall", "   "], "the prompt is empty"),
    (["translate", "the purple cat sees a dog"], "'purple' not in the vocabulary of 'translate'"),
    (["translate", "the big red cat sees the big red dog a a a"], "trained on at most 9"),
    (["generate", "--model", "translate", "x"], "needs a decoder"),
    (["translate", "--model", "recall", "a"], "needs an encoder-decoder"),
    (["train", "recall", "--steps", "0"], "--steps must be a positive"),
    (["explain", "--model", "translate", "the cat sees a dog", "--method", "rollout"], "use --method raw"),
])
def test_cli_bad_input(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_cli_explain_translate_writes_png_and_html(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, html = tmp_path / "a.png", tmp_path / "a.html"
    assert main(["explain", "--model", "translate", "the big red cat sees a small dog",
                 "--png", str(png), "--html", str(html), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "cross-attention" in out and "tolven" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"cross"' in html.read_text()


def test_cli_explain_recall(capsys):
    layer, head = recall.LOOKUP_HEAD
    assert main(["explain", "--model", "recall", "c3 a7 k2 ? a", "--layer", str(layer), "--head", str(head),
                 "--color", "never"]) == 0
    assert "layer 1" in capsys.readouterr().out
