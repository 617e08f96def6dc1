"""qkv.explain on the bundled MiniLM: weights against transformers, analyses against their
formulas in float64, outputs unchanged by inspection, the CLI and its errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qkv
from qkv import cli
from qkv.inspect import analysis, explain
from qkv.inspect.capture import Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def result(minilm):
    return explain(TEXT, minilm, focus="cat")


def test_weights_equal_transformers_output_attentions(minilm, result):
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(minilm.folder), attn_implementation="eager").eval()
    batch = minilm.tokenizer([TEXT])
    with torch.no_grad():
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), output_attentions=True)
    expected = torch.stack([a[0] for a in out.attentions])  # (layers, heads, n, n)
    assert result.attentions.shape == expected.shape == (6, 12, 9, 9)
    err = (result.attentions - expected).abs().max().item()
    assert err < 1e-5, f"max difference from transformers' eager attentions: {err:.2e}"
    torch.testing.assert_close(result.attentions.sum(-1), torch.ones(6, 12, 9))


def test_inspection_never_changes_the_output(minilm):
    batch = minilm.tokenizer([TEXT, "A longer second sentence with padding after the first."])
    with torch.no_grad():
        plain = minilm(batch.input_ids, attention_mask=batch.attention_mask)
        rec = Recorder(rows=[1, 2], heads=[0, 5]).attach(minilm)
        try:
            inspected = minilm(batch.input_ids, attention_mask=batch.attention_mask)
        finally:
            rec.detach()
    assert torch.equal(plain, inspected), "outputs must be bit-identical with and without inspection"
    assert len(rec.records) == 6 and rec.records[0].q.shape[1:3] == (2, 2)


def test_rollout_matches_its_formula_in_float64(result):
    maps = result.attentions.double().mean(dim=1)  # (L, n, n)
    n = maps.shape[-1]
    expected, current = [], torch.eye(n, dtype=torch.float64)
    for a in maps:  # Abnar & Zuidema: A~ = 0.5 A + 0.5 I, rows renormalised, multiplied up the layers
        a_res = 0.5 * a + 0.5 * torch.eye(n, dtype=torch.float64)
        a_res = a_res / a_res.sum(-1, keepdim=True)
        current = a_res @ current
        expected.append(current)
    got = result.maps("rollout", level="token")[:, 0]
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_value_norms_match_their_formula_in_float64(minilm, result):
    layer, head = 3, 7
    rec = result.records[layer]
    # The recorder computed ||f(v_j)||; recompute everything here from the module's own weights.
    mha = [m for m in minilm.modules() if isinstance(m, qkv.nn.MultiHeadAttention)][layer]
    D = rec.v.shape[-1]
    W = mha.out_proj.weight.double()[:, head * D:(head + 1) * D]  # (E, D): W_O restricted to the head
    fv = rec.v[0, head].double() @ W.T  # (n, E): f(v_j) = v_j W_O^h
    alpha = result.attentions[layer, head].double()  # (n, n)
    expected = torch.linalg.vector_norm(alpha.unsqueeze(-1) * fv.unsqueeze(0), dim=-1)  # ||alpha_ij f(v_j)||
    got = result.maps("value-norm", level="token")[layer, head]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)


def test_word_merging_sums_keys_and_averages_queries():
    maps = torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), dim=-1)
    unit_of = [0, 1, 1, 2, 2]  # tokens 1-2 and 3-4 are pieces of one word each
    merged = analysis.merge_units(maps, unit_of, 3)
    expected = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    groups = [[0], [1, 2], [3, 4]]
    for a, qs in enumerate(groups):
        for b, ks in enumerate(groups):
            expected[..., a, b] = maps[..., qs, :][..., ks].sum(-1).mean(-1)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged.sum(-1), torch.ones(2, 3, 3, dtype=torch.float64))


def test_hidden_special_tokens_renormalise(result):
    maps = result.maps("raw", "word", hide_special=True)
    assert maps.shape[-1] == 7 and result.labels("word", hide_special=True)[0] == "The"
    torch.testing.assert_close(maps.sum(-1), torch.ones(6, 12, 7))


def test_focus_rows_only_equal_the_full_maps(minilm, result):
    partial = explain(TEXT, minilm, focus="mat", rows="focus")
    assert partial.records[0].q.shape[2] == 1  # one query row recorded per layer
    for method in ("raw", "value-norm"):
        torch.testing.assert_close(partial.focus_rows("mat", method), result.focus_rows("mat", method),
                                   atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="rows='focus'"):
        _ = partial.attentions


def test_the_three_steps_add_up(result):
    steps = result.steps("cat", layer=2, head=3)
    torch.testing.assert_close(torch.softmax(steps.scores, -1), steps.weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(steps.scores, (steps.keys @ steps.query) * steps.scale, atol=1e-5, rtol=1e-5)
    rec = result.records[2]
    out = qkv.attention(rec.q[:, 3:4].float(), rec.k[:, 3:4].float(), rec.v[:, 3:4].float(),
                        mask=rec.mask.float(), scale=rec.scale)
    torch.testing.assert_close(steps.output, out[0, 0, steps.token], atol=1e-6, rtol=1e-5)
    assert "q.k*scale" in str(steps)


def test_entropy_and_jsd_formulas():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(analysis.entropy(p), torch.tensor([0.6931471805599453, 0.0], dtype=torch.float64))
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(analysis.jensen_shannon(p, q), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_compare_needs_equal_lengths(minilm, result):
    other = explain("The dog sat on the mat.", minilm)
    cmp = result.compare(other, focus="cat")
    assert cmp["difference"].shape == (6, 12, 9, 9) and cmp["jsd"].shape == (6, 12)
    assert cmp["jsd"].min() >= 0 and cmp["jsd"].max() <= 1
    with pytest.raises(ValueError, match="same length"):
        result.compare(explain("A much longer sentence about a cat.", minilm))


def test_to_dict_format(result):
    data = result.to_dict(method="raw", level="word", focus="cat")
    assert data["format"] == "qkv.explain/1" and data["labels"][2] == "cat"
    assert len(data["maps"]) == 6 and len(data["maps"][0]) == 12
    assert data["focus"]["index"] == 2 and len(data["focus"]["per_layer"]) == 6
    json.dumps(data)


def test_cli_explain_writes_json_and_prints_the_focus_table(tmp_path, capsys):
    out = tmp_path / "cat.json"
    assert cli.main(["explain", TEXT, "--focus", "cat", "--json", str(out), "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert "from 'cat' to each word" in text and "sharpest heads" in text
    data = json.loads(out.read_text())
    assert data["focus"]["label"] == "cat"
    assert [p.name for p in tmp_path.iterdir()] == ["cat.json"], "no temporary file is left behind"


def test_save_json_writes_through_a_symlink_and_refuses_a_fifo(result, tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    result.save_json(link)
    assert link.is_symlink() and json.loads(real.read_text())["format"] == "qkv.explain/1"
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=f"cannot write JSON to '{fifo}': it is a FIFO"):
        result.save_json(fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.json", "link.json", "real.json"]


@pytest.mark.parametrize("argv,message", [
    (["explain", "   "], "the text is empty"),
    (["explain", TEXT, "--focus", "dog"], "focus word 'dog' is not in the text; its words are: 'The', 'cat'"),
    (["explain", TEXT, "--focus", "cat", "--layer", "6"], "--layer 6 does not exist: the model has layers 0..5"),
    (["explain", TEXT, "--focus", "cat", "--head", "12"], "--head 12 does not exist"),
    (["explain", TEXT, "--focus", "cat", "--html", "/nonexistent-dir/x.html"], "--html: cannot write"),
    (["explain", "word " * 600, "--focus", "word"], "512"),
    (["explain", TEXT, "--model", "no-such-model"], "neither a bundled model"),
])
def test_cli_explain_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
