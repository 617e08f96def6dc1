"""benchmarks/native_windows.py: causal windows on the native kernels against SDPA with the window as a mask,
grouped-query heads included (--kv-heads), every output checked against float64 before it is timed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def native_windows(bench_module):
    return bench_module("native_windows")


@pytest.mark.parametrize("Hkv", [8, 2, 1])
def test_a_wide_window_row_with_grouped_heads(native_windows, Hkv):
    row = native_windows.wide_row(torch.float32, 256, 128, 1, 16, Hkv)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["float32", "256", "128", f"8/{Hkv}"], row
    assert cells[6].endswith("x") and cells[9].endswith("x") and float(cells[6][:-1]) > 0, row


def test_a_window_outside_the_rule_stops_the_run(native_windows, monkeypatch):
    real = native_windows.qkv.attention

    def unbanded(q, k, v, **kw):  # the native method ignores the window
        if kw.get("backend") == "native":
            return real(q, k, v, backend="native")
        return real(q, k, v, **kw)

    monkeypatch.setattr(native_windows.qkv, "attention", unbanded)
    with pytest.raises(SystemExit, match="outside the tolerance rule: qkv"):
        native_windows.wide_row(torch.float32, 256, 128, 1, 16, 2)


@pytest.mark.parametrize("bad", ["3", "0", "16"])
def test_a_kv_head_count_that_does_not_divide_is_refused_by_name(native_windows, capsys, bad):
    with pytest.raises(SystemExit) as err:
        native_windows.main(["--kv-heads", bad])
    assert err.value.code == 2
    assert f"--kv-heads must divide the 8 query heads, got {bad}" in capsys.readouterr().err
