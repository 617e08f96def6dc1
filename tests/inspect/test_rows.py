"""The compact "rows" view and the chunked computations of qkv.inspect.rows, against the full maps.

Every number of the compact view is checked against the same number read from the full maps
(`ExplainResult.maps`, built by the plain path for short inputs) or from `analysis` applied to
them: rows, top keys, the weight left out, summaries, the minimap, rollout rows, weights_dict.
Long inputs (4k and 8k tokens) run on a tiny random long-context decoder.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import qkv
from qkv.inspect import analysis, rows
from qkv.inspect.capture import Cancelled, stopping
from qkv.inspect.schema import check_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXPLAIN = importlib.import_module("qkv.inspect.explain")  # the module (qkv.inspect.explain is also the function)
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    from models.hf_folders import build_folder

    folder = tmp_path_factory.mktemp("llama-long-rows")
    build_folder(folder, "llama", max_position_embeddings=8192)
    return qkv.load(folder)


def _reference_maps(result, method: str, level: str, hide: bool) -> torch.Tensor:
    """Full maps by the plain path: every layer's whole weights, merged with analysis.merge_units."""
    att = torch.stack([r.weights()[0].double() for r in result.records])  # (L, H, n, n)
    if method == "rollout":
        att = analysis.rollout(att.mean(dim=1)).unsqueeze(1)
    elif method == "value-norm":
        att = torch.stack([analysis.value_norms(a, r.fv_norm[0].double()) for a, r in zip(att, result.records)])
    labels, special, unit_of = result.units(level)
    if level == "word":
        att = analysis.merge_units(att, unit_of, len(labels))
    if hide:
        att = analysis.drop_and_renormalise(att, [not s for s in special], renormalise=method != "value-norm")
    return att


@pytest.mark.parametrize("method", ["raw", "value-norm", "rollout"])
@pytest.mark.parametrize("level,hide", [("word", False), ("token", False), ("word", True)])
def test_compact_rows_equal_the_full_maps(minilm, method, level, hide):
    result = qkv.explain(TEXT, minilm)
    full = _reference_maps(result, method, level, hide)  # (L, H, n, n)
    n = full.shape[-1]
    ship = [0, 3, n - 1]
    got = result.weights_dict(ship, method=method, level=level, hide_special=hide)
    torch.testing.assert_close(torch.tensor(got["weights"], dtype=torch.float64), full[:, :, ship],
                               atol=2e-5, rtol=0)
    data = result.to_dict(method=method, level=level, hide_special=hide, rows=ship, top_k=4)
    check_data(data)
    assert data["view"] == "rows" and "maps" not in data and data["rows"]["index"] == ship
    for layer, per_head in enumerate(data["rows"]["top"]):
        for head, per_row in enumerate(per_head):
            for r, top in zip(ship, per_row):
                row = full[layer, head, r]
                values, index = row.topk(4)
                torch.testing.assert_close(torch.tensor(top["weights"], dtype=torch.float64), values, atol=2e-5,
                                           rtol=0)
                assert sorted(top["keys"]) == sorted(index.tolist()) or len(set(values.tolist())) < 4
                assert top["rest"] == pytest.approx(float(row.sum() - values.sum()), abs=1e-4)
                assert top["left_out"] == int((row > 0).sum()) - 4


@pytest.mark.parametrize("level,hide", [("word", False), ("token", True)])
def test_summaries_and_minimap_equal_those_of_the_full_maps(minilm, level, hide):
    result = qkv.explain(TEXT, minilm)
    full = _reference_maps(result, "raw", level, hide)  # (L, H, n, n)
    n = full.shape[-1]
    s = result.summaries(level, hide)
    torch.testing.assert_close(s["entropy"].double(), analysis.entropy(full).mean(-1), atol=1e-4, rtol=0)
    gap = (torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)).abs().double()  # (n, n)
    torch.testing.assert_close(s["distance"].double(), (full * gap).sum(-1).mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(s["sink"].double(), full[..., 0].mean(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(s["received"].double(), full.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(s["row_entropy"].double(), analysis.entropy(full).mean(1), atol=1e-4, rtol=0)
    if not hide:  # the entropy of the full view is the summary's
        torch.testing.assert_close(result.entropy(level).double(), analysis.entropy(full).mean(-1), atol=1e-4,
                                   rtol=0)


def test_chunked_full_maps_and_focus_rows_equal_the_plain_path(minilm, monkeypatch):
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 12 * 5 * 20)  # a handful of rows per chunk
    result = qkv.explain(TEXT, minilm, focus="fox")
    for method in ("raw", "value-norm"):
        torch.testing.assert_close(result.maps(method, "word").double(), _reference_maps(result, method, "word", False),
                                   atol=2e-5, rtol=0)
    compact = result.to_dict(focus="fox", rows="focus")
    full = result.to_dict(focus="fox", rows="all")
    assert compact["focus"]["index"] == full["focus"]["index"]
    torch.testing.assert_close(torch.tensor(compact["focus"]["per_layer"]), torch.tensor(full["focus"]["per_layer"]),
                               atol=2e-5, rtol=0)
    assert compact["focus"]["sharpest_heads"] == full["focus"]["sharpest_heads"]


def test_the_view_follows_the_size_and_the_rows_argument(minilm, monkeypatch):
    result = qkv.explain(TEXT, minilm)
    n = len(result.labels("word"))
    assert not result.compact_view() and result.to_dict()["view"] == "full"
    monkeypatch.setattr(EXPLAIN, "FULL_CELLS", 6 * 12 * n * n - 1)  # one weight over
    assert result.compact_view() and result.to_dict()["view"] == "rows"
    assert result.to_dict(rows="all")["view"] == "full"
    forced = qkv.explain(TEXT, minilm, rows="all")
    assert not forced.compact_view() and forced.to_dict()["view"] == "full"
    focus_only = qkv.explain(TEXT, minilm, focus="fox", rows="focus")
    data = focus_only.to_dict(focus="fox")
    check_data(data)
    assert data["view"] == "rows" and data["summary"] is None and data["minimap"] is None
    with pytest.raises(ValueError, match="only the focus rows were recorded"):
        focus_only.to_dict(rows="all")
    with pytest.raises(ValueError, match="was not recorded"):
        focus_only.to_dict(rows=[0])


def test_without_a_focus_the_compact_view_ships_the_last_word(minilm):
    result = qkv.explain(TEXT, minilm)
    data = result.to_dict(rows="focus")
    labels, special = data["labels"], data["special"]
    last = max(i for i, s in enumerate(special) if not s)
    assert data["rows"]["index"] == [last] and labels[last] == "."
    assert data["omitted"]["rows"] == len(labels) - 1


def test_bad_rows_arguments_are_named(minilm):
    result = qkv.explain(TEXT, minilm)
    with pytest.raises(ValueError, match="row 99 does not exist"):
        result.to_dict(rows=[99])
    with pytest.raises(TypeError, match="rows must be whole numbers"):
        result.weights_dict(["a"])
    with pytest.raises(ValueError, match="rows must be one of"):
        result.to_dict(rows="some")
    with pytest.raises(ValueError, match="top_k must be"):
        result.to_dict(rows="focus", top_k=0)
    with pytest.raises(ValueError, match="head 77 does not exist"):
        result.weights_dict([0], heads=[77])
    with pytest.raises(ValueError, match="rows must be one of 'auto', 'all', 'focus'"):
        qkv.explain(TEXT, minilm, rows="some")


def test_a_full_json_of_a_long_input_is_streamed_and_equals_to_dict(minilm, tmp_path, monkeypatch):
    result = qkv.explain(TEXT, minilm, rows="all")
    monkeypatch.setattr(EXPLAIN, "FULL_CELLS", 10)  # stream even this short one
    path = tmp_path / "full.json"
    result.save_json(path, focus="fox", hide_special=True)
    streamed = json.loads(path.read_text())
    direct = json.loads(json.dumps(result.to_dict(focus="fox", hide_special=True)))
    assert streamed["view"] == "full"
    check_data(streamed)
    _assert_same_json(streamed, direct)


def _assert_same_json(a, b, where="data"):
    """Two JSON values equal, numbers within 1e-5 (the streamed maps are built by another path)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same_json(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), where
    else:
        assert a == b, where


def test_stopping_cancels_explain_and_the_chunk_loops(minilm):
    calls = []

    def stop_at_third():
        calls.append(1)
        return len(calls) >= 3

    with stopping(stop_at_third), pytest.raises(Cancelled):
        qkv.explain(TEXT, minilm)
    result = qkv.explain(TEXT, minilm)
    with stopping(lambda: True), pytest.raises(Cancelled):
        result.to_dict(rows="focus")
    result.to_dict(rows="focus")  # outside the block nothing stops


@pytest.mark.parametrize("words", [4000, 8000])
def test_long_inputs_are_small_and_exact(long_llama, tmp_path, words):
    text = " ".join(["the cat sat on the mat", "a dog ran in the park"][i % 2] for i in range(words // 6)) + " queries"
    result = qkv.explain(text, long_llama, focus="queries")
    n = len(result.tokens)
    assert n > words - 10 and result.compact_view()
    for rec in result.records:  # nothing n x n is kept: the mask of the causal band is built on demand
        assert rec.spec.bool_mask is None and rec.spec.float_mask is None
    assert result.nbytes < 4 * n * 2 * 4 * 8 * 4  # q, k, v, norms: linear in n
    path = tmp_path / "long.json"
    result.save_json(path, focus="queries")
    size = path.stat().st_size
    data = json.loads(path.read_text())
    check_data(data)
    bound = rows.answer_bytes(n, 2, 4, "rows")
    assert size < 10 * 2**20 and size < bound, (size, bound)
    # the focus row against the recorded queries and keys of its layer, computed here directly
    focus = data["focus"]["index"]
    rec = result.records[1]
    q = rec.q[0, :, focus:focus + 1].double()  # (H, 1, D)
    scores = (q @ rec.k[0].double().transpose(-1, -2)) * rec.scale  # (H, 1, n)
    scores[..., focus + 1:] = float("-inf")  # causal
    expected = scores.softmax(-1)[:, 0]  # (H, n)
    torch.testing.assert_close(torch.tensor(data["focus"]["per_layer"][1], dtype=torch.float64), expected.mean(0),
                               atol=2e-5, rtol=0)
    top = data["rows"]["top"][1][2][0]
    torch.testing.assert_close(torch.tensor(top["weights"], dtype=torch.float64), expected[2].topk(8).values,
                               atol=2e-5, rtol=0)
    assert top["rest"] == pytest.approx(1 - sum(top["weights"]), abs=1e-4)
    one = result.weights_dict([focus], layers=[1], heads=[2])
    assert len(json.dumps(one)) < 2**20
    torch.testing.assert_close(torch.tensor(one["weights"][0][0][0], dtype=torch.float64), expected[2],
                               atol=2e-5, rtol=0)
    steps = result.steps(focus, layer=1, head=2)
    torch.testing.assert_close(steps.weights.double(), expected[2], atol=2e-5, rtol=0)


def test_the_band_path_equals_the_mask_path(long_llama, monkeypatch):
    """Runs of rows under a causal band are computed over the keys they see alone (`_band_keys`);
    every other selection builds the mask. Both must give the same weights, with a left window and
    with a score function that reads the query and key positions (the sliced call's key indices
    are shifted back)."""
    from qkv.inspect.capture import Record

    model = long_llama
    model.blocks[0].window = (5, 0)
    model.blocks[1].score_mod = lambda s, b, h, qi, kj: s - 0.03 * (qi - kj).float() + 0.01 * h.float()
    try:
        result = qkv.explain(" ".join(["the cat sat on the mat"] * 12), model)
    finally:
        model.blocks[0].window = None
        model.blocks[1].score_mod = None
    n = len(result.tokens)
    cases = [(list(range(10, 40)), None), (list(range(n)), [1, 3]), ([3, 9, 30], None), (list(range(0, 7)), [2])]
    for rec in result.records:
        for positions, heads in cases:
            fast = rec.weights(positions, heads)
            with monkeypatch.context() as m:
                m.setattr(Record, "_band_keys", lambda self, p: None)
                slow = rec.weights(positions, heads)
            torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
        assert rec._band_keys(list(range(10, 40))) is not None  # the fast path was taken
    assert result.records[0]._band_keys(list(range(10, 40))) == (5, 40)  # the window's first key: 10 - 5


def test_a_word_of_many_tokens_is_computed_a_chunk_of_tokens_at_a_time(minilm, monkeypatch):
    """WordPiece splits a made-up word into many tokens. Rows, summaries, full maps and rollout rows
    are computed at most `chunk_rows` tokens at a time, the word's pieces averaged as they come,
    and still equal the plain path's merged maps."""
    from qkv.inspect import capture

    word = "zqxvbnmwertyuiopasdfghjkl" * 3
    result = qkv.explain(f"the cat saw {word} on the mat", minilm)
    tokens_of_word = sum(1 for w in result.word_of_token if w == 3)
    assert tokens_of_word > 20
    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", 12 * len(result.tokens) * 4)  # 4 tokens per chunk
    assert rows.chunk_rows(result) == 4
    references = {method: _reference_maps(result, method, "word", False) for method in ("raw", "value-norm", "rollout")}
    seen = []
    real = capture.Record.weights

    def spy(self, positions=None, heads=None):
        seen.append(len(self.rows) if positions is None else len(positions))
        return real(self, positions, heads)

    monkeypatch.setattr(capture.Record, "weights", spy)
    for method in ("raw", "value-norm"):
        got = result.weights_dict([4], method=method)
        torch.testing.assert_close(torch.tensor(got["weights"], dtype=torch.float64),
                                   references[method][:, :, [4]], atol=2e-5, rtol=0)
    got = result.weights_dict([4], method="rollout")
    torch.testing.assert_close(torch.tensor(got["weights"], dtype=torch.float64),
                               references["rollout"][:, :, [4]], atol=2e-5, rtol=0)
    s = result.summaries("word")
    full = references["raw"]
    torch.testing.assert_close(s["entropy"].double(), analysis.entropy(full).mean(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(result.maps("raw", "word").double(), full, atol=2e-5, rtol=0)
    assert seen and max(seen) <= 4, f"a chunk of {max(seen)} tokens"


def test_a_focus_only_result_ships_its_word_without_the_focus_again(minilm, tmp_path):
    result = qkv.explain(TEXT, minilm, focus="fox", rows="focus")
    data = result.to_dict()
    assert data["view"] == "rows" and data["focus"]["label"] == "fox"
    assert data["rows"]["index"] == [data["focus"]["index"]]
    torch.testing.assert_close(torch.tensor(data["focus"]["per_layer"]),
                               torch.tensor(qkv.explain(TEXT, minilm).to_dict(focus="fox", rows="all")
                                            ["focus"]["per_layer"]), atol=2e-5, rtol=0)
    result.save_json(tmp_path / "f.json")
    result.save_html(tmp_path / "f.html")
    assert json.loads((tmp_path / "f.json").read_text())["rows"]["index"] == data["rows"]["index"]


def test_summaries_of_an_encoder_decoder_are_refused_by_name():
    result = qkv.explain("The cat sat.", "translate")
    with pytest.raises(ValueError, match="summaries are for encoder or decoder models"):
        result.summaries()


def test_a_missing_focus_word_lists_a_few_distinct_words(long_llama):
    text = " ".join(f"w{i % 300}" for i in range(3000))
    probe = EXPLAIN.prepare(text, long_llama, "llama")[0]
    with pytest.raises(ValueError) as err:
        probe.focus_index("nowhere")
    message = str(err.value)
    assert len(message) < 800 and "distinct words in all" in message and message.count("'w1'") == 1
