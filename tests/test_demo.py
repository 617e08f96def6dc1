"""`qkv demo` reproduces the seed's numpy sample; checked against numpy itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import qkv
from qkv import cli
from qkv.demo import numpy_rand, run, sample_math, seed_sample


def test_numpy_stream_is_reproduced_exactly():
    np.random.seed(42)
    expected = np.random.rand(3, 5, 64)
    assert np.array_equal(numpy_rand(42, 3, 5, 64).numpy(), expected)
    np.random.seed(7)
    assert np.array_equal(numpy_rand(7, 10).numpy(), np.random.rand(10))


def test_sample_numbers_match_numpy_and_qkv():
    np.random.seed(42)
    Q, K, V = np.random.rand(5, 64), np.random.rand(5, 64), np.random.rand(5, 64)
    scores = np.dot(Q, K.T)
    weights = np.exp(scores) / np.sum(np.exp(scores), axis=-1, keepdims=True)
    output = np.dot(weights, V)
    q, k, v = seed_sample()
    s, w, o = sample_math(q, k, v)
    np.testing.assert_allclose(s.numpy(), scores, rtol=1e-14)
    np.testing.assert_allclose(w.numpy(), weights, rtol=1e-12)
    got = qkv.reference_attention(q[None, None], k[None, None], v[None, None], scale=1.0)[0, 0]
    np.testing.assert_allclose(got.numpy(), output, rtol=1e-12)


def test_demo_text_shows_the_numbers_and_the_match():
    text = run()
    np.random.seed(42)
    Q, K = np.random.rand(5, 64), np.random.rand(5, 64)
    assert f"{np.dot(Q, K.T)[0, 0]:.8f}" in text
    assert "(match)" in text and "MISMATCH" not in text
    assert "1/sqrt(64)" in text and "NaN" in text


@pytest.mark.slow
def test_cli_and_module_run_the_same_demo(capsys):
    assert cli.main(["demo", "--columns", "4"]) == 0
    direct = capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "qkv", "demo", "--columns", "4"], capture_output=True, text=True,
                          check=True)
    assert proc.stdout == direct


def test_cli_reports_bad_arguments_without_traceback(capsys):
    assert cli.main(["demo", "--columns", "0"]) == 2
    err = capsys.readouterr().err
    assert "--columns must be between 1 and 64" in err and "Traceback" not in err
