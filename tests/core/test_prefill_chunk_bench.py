"""benchmarks/prefill_chunk.py: a chunk of queries against a longer cache, every qkv method checked
against float64 under the tolerance rule before it is timed (a wrong output stops the run)."""

from __future__ import annotations

import pytest

import qkv


@pytest.fixture
def prefill_chunk(bench_module):
    return bench_module("prefill_chunk")


def test_the_benchmark_times_native_after_checking_every_method(prefill_chunk, capsys):
    argv = ["--configs", "small", "--chunks", "32", "--caches", "256", "--dtypes", "float32", "bfloat16",
            "--repeats", "1", "--methods", "sdpa-mask", "auto", "split", "native"]
    assert prefill_chunk.main(argv) == 0
    out = capsys.readouterr().out
    assert "| torch SDPA + mask | qkv auto (picks; before) | qkv split | qkv native |" in out, out
    for dtype in ("float32", "bfloat16"):
        assert f"| small Hq=8 Hkv=2 D=64 | {dtype} | 32 | 256 |" in out, out


def test_a_wrong_output_stops_the_benchmark(prefill_chunk, monkeypatch):
    real = qkv.attention

    def without_the_band(q, k, v, **kw):  # the native method drops the chunk's causal band: every key seen
        if kw.get("backend") == "native":
            return real(q, k, v, causal=False, backend="native")
        return real(q, k, v, **kw)

    monkeypatch.setattr(prefill_chunk.qkv, "attention", without_the_band)
    with pytest.raises(SystemExit, match=r"native outside the tolerance rule at small float32 Lq=32 Lk=256"):
        prefill_chunk.main(["--configs", "small", "--chunks", "32", "--caches", "256", "--dtypes", "float32",
                            "--repeats", "1", "--methods", "auto", "native"])


def test_a_bad_check_count_is_refused_by_name(prefill_chunk, capsys):
    with pytest.raises(SystemExit) as err:
        prefill_chunk.main(["--check-rows", "0"])
    assert err.value.code == 2 and "--check-rows must be at least 1, got 0" in capsys.readouterr().err
