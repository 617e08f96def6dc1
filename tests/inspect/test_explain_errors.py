"""Bad input at the Python API: qkv.explain, ExplainResult.compare and the tokenizer answer each
with one exception whose message says what they take, before the model runs."""

from __future__ import annotations

import pytest

import qkv
from qkv.inspect.terminal import render_overview
from qkv.models import ModelError

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def result(minilm):
    return qkv.explain(TEXT, minilm)


# (call(minilm, result), exception type, words the message must hold)
CASES = {
    "a list of texts": (lambda m, r: qkv.explain(["a cat", "a dog"], m), TypeError,
                        ["text must be a string", "got list", "once per sentence"]),
    "a tuple of texts": (lambda m, r: qkv.explain(("a cat",), m), TypeError, ["text must be a string", "got tuple"]),
    "bytes": (lambda m, r: qkv.explain(b"a cat", m), TypeError, ["text must be a string", "got bytes"]),
    "None": (lambda m, r: qkv.explain(None, m), TypeError, ["text must be a string", "got NoneType"]),
    "blank text": (lambda m, r: qkv.explain("  \n", m), ValueError, ["the text is empty"]),
    "a lone surrogate": (lambda m, r: qkv.explain("a \ud800 cat", m), ValueError,
                         ["not valid Unicode at index 2", "U+D800", "lone surrogate"]),
    "bytes not UTF-8 (surrogateescape)": (lambda m, r: qkv.explain("caf\udce9 au lait", m), ValueError,
                                          ["not valid Unicode at index 3", "byte 0xE9"]),
    "a model of the wrong type": (lambda m, r: qkv.explain(TEXT, 3), TypeError, ["model must be", "got int"]),
    "a focus of the wrong type": (lambda m, r: qkv.explain(TEXT, m, focus=1.5), TypeError, ["focus must be", "float"]),
    "rows='focus' without a focus": (lambda m, r: qkv.explain(TEXT, m, rows="focus"), ValueError, ["needs a focus"]),
    "a layer the model lacks": (lambda m, r: qkv.explain(TEXT, m, layers=[9]), ValueError,
                                ["layers [9] do not exist", "0..5"]),
    "a head the model lacks": (lambda m, r: qkv.explain(TEXT, m, heads=[0, 12]), ValueError,
                               ["heads [12] do not exist", "0..11"]),
    "layers not a list": (lambda m, r: qkv.explain(TEXT, m, layers=3), TypeError, ["layers must be a list"]),
    "compare with a string": (lambda m, r: r.compare("The dog sat on the mat."), TypeError,
                              ["other must be an ExplainResult", "got str"]),
    "the layer table, one head of rollout": (lambda m, r: render_overview(r, method="rollout", head=3), ValueError,
                                             ["rollout averages the heads"]),
    "the tokenizer, a lone surrogate": (lambda m, r: m.tokenizer(["fine", "\udfff"]), ModelError,
                                        ["text 1 is not valid Unicode at index 0", "U+DFFF"]),
    "the tokenizer's encode, bytes not UTF-8": (lambda m, r: m.tokenizer.encode("ab\udcff"), ModelError,
                                                ["not valid Unicode at index 2", "byte 0xFF"]),
    "encode (sentence embeddings), a lone surrogate": (lambda m, r: m.encode(["\ud83d"]), ModelError,
                                                       ["text 0 is not valid Unicode", "U+D83D"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_python_input_is_one_clear_exception(case, minilm, result):
    call, kind, words = CASES[case]
    with pytest.raises(kind) as info:
        call(minilm, result)
    message = str(info.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and "TextEncodeInput" not in message


def test_a_missing_focus_word_is_found_before_the_model_runs(minilm, monkeypatch):
    calls = []
    monkeypatch.setattr(type(minilm), "forward", lambda self, *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="focus word 'dog' is not in the text"):
        qkv.explain(TEXT, minilm, focus="dog")
    with pytest.raises(ValueError, match="layers"):
        qkv.explain(TEXT, minilm, layers=[6])
    assert calls == [], "the model ran before the arguments were checked"
