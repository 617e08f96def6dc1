"""benchmarks/auto_floor.py: SDPA against the native kernels around `auto`'s floor, every row checked against
float64 under the tolerance rule before it is timed, with what `auto` runs for the shape beside the ratio."""

from __future__ import annotations

import pytest
import torch

from qkv.core.api import choose_backend
from qkv.core.spec import build_spec


@pytest.fixture
def auto_floor(bench_module):
    return bench_module("auto_floor")


@pytest.mark.parametrize("band,Hkv,backward", [("none", 8, False), ("causal", 2, True), ("window", 1, False)])
def test_a_row_names_the_shape_the_ratio_and_autos_choice(auto_floor, band, Hkv, backward, monkeypatch):
    asked = []

    def spy(spec, q, need_lse):  # what the row asks `auto` about: the timed call's spec, gradients included
        asked.append((spec.grad, spec.Hkv, spec.right, spec.left))
        return choose_backend(spec, q, need_lse)

    monkeypatch.setattr(auto_floor, "choose_backend", spy)
    row = auto_floor.row(torch.float32, 16, Hkv, 64, band, backward, 1)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["float32", "16", f"8/{Hkv}", "64", "4096", band], row
    assert cells[8].endswith("x") and float(cells[8][:-1]) > 0, row
    q = torch.zeros(1, 8, 64, 16, requires_grad=backward)
    k = torch.zeros(1, Hkv, 64, 16)
    spec = build_spec(q, k, k, **auto_floor._kwargs(band, 64))
    assert asked == [(backward, Hkv, spec.right, spec.left)], asked
    assert cells[9] == choose_backend(spec, q, False), row


def test_an_output_outside_the_rule_stops_the_run(auto_floor, monkeypatch):
    real = auto_floor.qkv.attention

    def unbanded(q, k, v, **kw):  # the native method ignores the band
        if kw.get("backend") == "native":
            return real(q, k, v, backend="native")
        return real(q, k, v, **kw)

    monkeypatch.setattr(auto_floor.qkv, "attention", unbanded)
    with pytest.raises(SystemExit, match="outside the tolerance rule: qkv"):
        auto_floor.row(torch.float32, 16, 8, 64, "causal", False, 1)


@pytest.mark.parametrize("args", [["--kv-heads", "3"], ["--dims", "0"], ["--dims", "512"], ["--repeats", "0"],
                                  ["--bands", "left"]])
def test_bad_arguments_are_refused_by_name(auto_floor, capsys, args):
    with pytest.raises(SystemExit) as err:
        auto_floor.main(args)
    assert err.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_the_table_prints_every_row_asked_for(auto_floor, capsys):
    auto_floor.main(["--dtypes", "float32", "--dims", "8", "--lengths", "16", "32", "--bands", "none", "window",
                     "--repeats", "1", "--min-sample-ms", "0"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float32")]
    assert [r.split("|")[4].strip() + r.split("|")[6].strip() for r in rows] == ["16none", "32none", "16window",
                                                                                 "32window"], out


def test_a_gradient_outside_the_rule_stops_the_run(auto_floor, monkeypatch):
    real = auto_floor.qkv.attention

    class Doubled(torch.autograd.Function):  # the native method's output right, its gradients doubled
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def wrong_grads(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return Doubled.apply(out) if kw.get("backend") == "native" else out

    monkeypatch.setattr(auto_floor.qkv, "attention", wrong_grads)
    auto_floor.row(torch.float32, 16, 8, 64, "causal", False, 1)  # the forward alone: within the rule
    with pytest.raises(SystemExit, match="gradients outside the tolerance rule: native"):
        auto_floor.row(torch.float32, 16, 8, 64, "causal", True, 1)
