"""Ring attention on 2 and 4 gloo processes equals single-process attention (tolerance rule).

Each launch runs a list of cases (causal or not, zigzag and contiguous, odd local lengths,
GQA/MQA, float64/float32/bfloat16/float16, tiny tiles, partial outputs merged in pieces) and
returns every rank's shards of out, lse
and the gradients; here they are unsharded and compared, by the Foundation issue's rule,
with the float64 reference, the plain reference in the test dtype setting the bound.
"""

from __future__ import annotations

import pytest
import torch
from ring_workers import launch, make_inputs, results_ok

import qkv
import qkv.distributed as qd
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule, grads


def _case(N, layout, causal, *, Hq=2, Hkv=2, D=8, Dv=8, B=1, dtype="float32", seed=0, **extra):
    return dict(N=N, layout=layout, causal=causal, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, B=B, dtype=dtype,
                seed=seed, **extra)


CASES = {
    2: [
        _case(14, "contiguous", True, Hq=4, Hkv=2, piece_rows=3),  # local length 7 (odd), GQA
        _case(18, "contiguous", False, D=5, Dv=7, dtype="float64", seed=1),  # local 9, Dv != D
        _case(20, "zigzag", True, Hq=4, Hkv=1, seed=2, tiles=(3, 4)),  # chunks of 5 (odd), MQA, many tiles
        _case(12, "zigzag", False, B=2, seed=3),
        _case(36, "zigzag", True, Hq=4, Hkv=2, D=16, Dv=16, seed=4, lse_grad=True),  # d(lse) path
        _case(64, "zigzag", True, D=16, Dv=16, dtype="bfloat16", seed=5),
    ],
    4: [
        _case(40, "zigzag", True, Hq=4, Hkv=2, seed=6, piece_rows=3),  # chunks of 5, ragged pieces
        _case(36, "contiguous", True, seed=7),  # local 9
        _case(24, "zigzag", False, Hq=3, Hkv=1, D=6, Dv=6, dtype="float64", seed=8),
        _case(56, "zigzag", True, Hq=2, Hkv=1, seed=9, tiles=(4, 3)),
        _case(28, "contiguous", False, seed=10, lse_grad=True),  # local 7
        _case(48, "contiguous", True, D=16, Dv=16, dtype="float16", seed=11),
    ],
}


def _exact_lse(case):
    """float64 lse from the scores (the reference returns lse in float32 by contract)."""
    q, k, v, _, _ = (t.double() for t in make_inputs(case))
    G = case["Hq"] // case["Hkv"]
    k = k.repeat_interleave(G, dim=1)  # (B, Hq, N, D)
    s = (q @ k.transpose(-1, -2)) / case["D"] ** 0.5  # (B, Hq, N, N)
    if case["causal"]:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def _reference(case, dtype):
    q, k, v, g_out, g_lse = make_inputs(case)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = qkv.attention_with_lse(q, k, v, causal=case["causal"], backend="reference")
    loss = (out.double() * g_out.double()).sum()
    if case.get("lse_grad"):
        loss = loss + (lse.double() * g_lse.double()).sum()
    dq, dk, dv = grads(loss, (q, k, v), None)
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def ring_results(request):
    P = request.param
    ranks = results_ok(launch(P, "cases", {"cases": CASES[P]}, timeout=150))
    return P, ranks


def _name(case):
    keys = ("N", "layout", "causal", "Hq", "Hkv", "dtype")
    return " ".join(f"{k}={case[k]}" for k in keys)


@pytest.mark.parametrize("index", range(6))
def test_ring_matches_single_process(ring_results, index):
    P, ranks = ring_results
    case = CASES[P][index]
    got = {name: qd.unshard([r[index][name] for r in ranks], layout=case["layout"])
           for name in ("out", "lse", "dq", "dk", "dv")}
    assert all(r[index]["inputs_intact"] for r in ranks), "ring attention overwrote a caller's k or v"
    dtype = getattr(torch, case["dtype"])
    exact = _reference(case, torch.float64)
    plain = _reference(case, dtype)
    what = f"P={P} {_name(case)}"
    assert got["out"].dtype == dtype
    assert_within_rule(got["out"], plain["out"], exact["out"], factor=FWD_FACTOR, what=f"{what} out")
    assert_within_rule(got["lse"], plain["lse"], _exact_lse(case), factor=FWD_FACTOR, what=f"{what} lse")
    for g in ("dq", "dk", "dv"):
        assert_within_rule(got[g], plain[g], exact[g], factor=GRAD_FACTOR, what=f"{what} {g}")
    # qkv.attention (the single-process path users run) agrees with the reference by the same rule.
    q, k, v, _, _ = make_inputs(case)
    single = qkv.attention(q, k, v, causal=case["causal"])
    assert_within_rule(single, plain["out"], exact["out"], factor=FWD_FACTOR, what=f"{what} single-process")


def test_mismatched_shards_raise_everywhere():
    msgs = results_ok(launch(2, "mismatch", timeout=60))
    for m in msgs:
        assert "same shard shapes" in m and "L_local: rank 0 has 6, rank 1 has 8" in m, m


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_multihead_attention_in_ring_mode(layout):
    """A MultiHeadAttention layer (RoPE, GQA) whose attention call is RingAttention equals the layer on one process."""
    pytest.importorskip("qkv.nn")
    for r, errs in enumerate(results_ok(launch(2, "mha", {"layout": layout, "N": 24}, timeout=90))):
        assert max(errs.values()) < 1e-10, f"rank {r}: max errors {errs}"


# A NaN or inf in one shard: on 2 ranks, rows that see it (on any shard) are NaN, others are
# exact; gradients NaN exactly where the single-process guard puts them (core/finite.py).
POISONED = [
    _case(16, "zigzag", True, Hq=4, Hkv=2, seed=12, poison=[("k", (0, 1, 5, 2), float("nan"))]),
    _case(16, "contiguous", True, seed=13, poison=[("v", (0, 0, 3, 1), float("inf"))]),
    _case(16, "zigzag", False, seed=14, poison=[("q", (0, 1, 12, 0), float("nan"))]),
    _case(16, "contiguous", True, seed=15, poison=[("v", (0, 1, 11, 0), float("nan"))]),  # rows 11.. only
]


def test_ring_follows_the_nonfinite_rule():
    ranks = results_ok(launch(2, "cases", {"cases": POISONED}, timeout=150))
    for index, case in enumerate(POISONED):
        got = {name: qd.unshard([r[index][name] for r in ranks], layout=case["layout"])
               for name in ("out", "lse", "dq", "dk", "dv")}
        want = _reference(case, torch.float64)
        what = _name(case) + f" poison={case['poison']}"
        for name in ("out", "dq", "dk", "dv"):
            nan_rows, want_rows = torch.isnan(got[name]).all(-1), torch.isnan(want[name]).all(-1)
            assert torch.equal(nan_rows, want_rows), f"{what}: NaN rows of {name} differ from one process"
            assert torch.equal(torch.isnan(got[name]).any(-1), want_rows), f"{what}: a partly NaN row in {name}"
            ok = ~want_rows
            err = (got[name][ok].double() - want[name][ok]).abs().max().item()
            assert err < 1e-4, f"{what}: finite rows of {name} differ by {err:.2e}"
        assert torch.equal(torch.isnan(got["lse"]), torch.isnan(want["lse"])), f"{what}: NaN lse rows differ"
        assert torch.isnan(want["out"]).any() and not torch.isnan(want["out"]).all()
