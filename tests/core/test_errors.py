"""Bad arguments raise ValueError/TypeError whose message quotes what was observed and the fix."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import qkv


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


Q, K, V = _t(2, 8, 5, 16), _t(2, 4, 7, 16), _t(2, 4, 7, 16)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda: qkv.attention(Q, K, _t(2, 4, 6, 16)), ValueError, r"expected v of shape \(2, 4, 7, Dv\)"),
    (lambda: qkv.attention(Q, _t(2, 3, 7, 16), _t(2, 3, 7, 16)), ValueError,
     r"Hq=8 query heads and Hkv=3 key/value heads; Hq must be a multiple of Hkv"),
    (lambda: qkv.attention(Q, _t(2, 4, 7, 8), V), ValueError, r"share head_dim.*\(2, 8, 5, 16\).*\(2, 4, 7, 8\)"),
    (lambda: qkv.attention(Q, _t(3, 4, 7, 16), _t(3, 4, 7, 16)), ValueError, r"q has batch 2 but k has batch 3"),
    (lambda: qkv.attention(_t(5, 16), K, V), ValueError, r"must be 4-D .* got shape \(5, 16\).*q\[None, None\]"),
    (lambda: qkv.attention(_t(8, 5, 16), K, V), ValueError, r"got shape \(8, 5, 16\).*unsqueeze\(0\)"),
    (lambda: qkv.attention(Q.long(), K, V), TypeError, r"dtype torch.int64.*q.float\(\)"),
    (lambda: qkv.attention(Q, K.double(), V), TypeError, r"share one dtype.*k=torch.float64"),
    (lambda: qkv.attention(Q.numpy(), K, V), TypeError, r"q must be a torch.Tensor; got ndarray"),
    (lambda: qkv.attention(Q, K, V, backend="flash"), ValueError, r"unknown backend 'flash'; choose one of 'auto'"),
    (lambda: qkv.attention(Q, K, V, mask=torch.ones(2, 8, 5, 6, dtype=torch.bool)), ValueError,
     r"mask has shape \(2, 8, 5, 6\).*dimension Lk is 6, expected 7 or 1"),
    (lambda: qkv.attention(Q, K, V, mask=torch.ones(2, 3, 5, 7, dtype=torch.bool)), ValueError,
     r"dimension Hq is 3, expected 8 or 1"),
    (lambda: qkv.attention(Q, K, V, mask=torch.ones(1, 1, 1, 1, 7, dtype=torch.bool)), ValueError,
     r"must broadcast to"),
    (lambda: qkv.attention(Q, K, V, mask=torch.ones(2, 1, 1, 7, dtype=torch.int64)), TypeError,
     r"mask has dtype torch.int64.*mask.bool\(\)"),
    (lambda: qkv.attention(Q, K, V, mask="causal"), TypeError, r"mask must be a bool or float tensor.*got str"),
    (lambda: qkv.attention(Q, K, V, mask=lambda b, h, q, k: q - k), TypeError,
     r"mask function must return a bool tensor; got dtype torch.int64"),
    (lambda: qkv.attention(Q, K, V, window=-1), ValueError, r"window left must be >= 0; got -1"),
    (lambda: qkv.attention(Q, K, V, window=(1, 2, 3)), TypeError, r"window must be an int w or a \(left, right\) pair"),
    (lambda: qkv.attention(Q, K, V, window=2.5), TypeError, r"window must be an int"),
    (lambda: qkv.attention(Q, K, V, causal=1), TypeError, r"causal must be True or False"),
    (lambda: qkv.attention(Q, K, V, scale=float("nan")), ValueError, r"scale must be finite"),
    (lambda: qkv.attention(Q, K, V, scale="0.5"), TypeError, r"scale must be a number"),
    (lambda: qkv.attention(Q, K, V, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\); got 1.0"),
    (lambda: qkv.attention(Q, K, V, score_mod=3), TypeError, r"score_mod must be a function"),
    (lambda: qkv.attention(Q, K, V, score_mod=lambda s, *_: s[..., :1, :1].sum(-1)), ValueError,
     r"score_mod returned shape"),
    (lambda: qkv.attention(Q, K, V, score_mod=lambda s, *_: s, backend="sdpa"), ValueError,
     r"sdpa backend cannot apply a score_mod; use backend='tiled'"),
    (lambda: qkv.attention_with_lse(Q, K, V, backend="sdpa"), ValueError,
     r"does not return the lse; use backend='tiled'"),
    (lambda: qkv.attention(Q, K, V, backend=3), TypeError, r"backend must be a string"),
    (lambda: qkv.attention_weights(Q, _t(2, 4, 7, 8)), ValueError, r"share head_dim"),
])
def test_bad_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_tiled_refuses_gradients_it_cannot_compute():
    bias = torch.zeros(1, 1, 5, 7, requires_grad=True)
    q, k, v = (torch.randn_like(t).requires_grad_() for t in (Q, K, V))
    with pytest.raises(ValueError, match="float mask that requires grad; use backend='reference'"):
        qkv.attention(q, k, v, mask=bias, backend="tiled")
    table = torch.zeros(8, requires_grad=True)
    with pytest.raises(ValueError, match="tensors captured by score_mod"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h], backend="tiled")
    # A learned tensor reached as a global (not a closure) is found too, and auto refuses it.
    with pytest.raises(ValueError, match="tensors captured by score_mod"):
        qkv.attention(q, k, v, score_mod=_global_bias_mod, backend="auto")
    # Without gradients there is nothing to refuse.
    with torch.no_grad():
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h], backend="tiled")
    # The reference honours both, and so does auto (through sdpa for the mask).
    qkv.attention(q, k, v, mask=bias, backend="reference").sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


_GLOBAL_BIAS = torch.zeros(8, requires_grad=True)


def _global_bias_mod(score, b, h, q_idx, kv_idx):
    return score + _GLOBAL_BIAS[h]


# ------------------------------------------------------------- the user's functions
QF, KF, VF = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
ALL_CALLS = {
    "reference": lambda **kw: qkv.reference_attention(QF, KF, VF, **kw),
    "weights": lambda **kw: qkv.attention_weights(QF, KF, **kw),
    **{be: partial(qkv.attention, QF, KF, VF, backend=be)
       for be in ("auto", "sdpa", "tiled", "sparse", "decode")},
}
BAD_FUNCTIONS = {
    # a batch of 4 for B = 1: the reference used to broadcast the output to a batch of 4
    "mask-batch-4": ({"mask": lambda b, h, q, k: torch.ones(4, 1, 1, 1, dtype=torch.bool)},
                     r"mask function returned shape \(4, 1, 1, 1\).*broadcast shape \(1, 2, \d+, \d+\)"),
    "mask-5-d": ({"mask": lambda b, h, q, k: (q >= k)[None]}, r"mask function returned shape \(1, 1, 1, \d+, \d+\)"),
    "mask-wrong-keys": ({"mask": lambda b, h, q, k: torch.ones(1, 1, 1, 3, dtype=torch.bool)},
                        r"mask function returned shape \(1, 1, 1, 3\)"),
    # written for scalar indices, as for flex_attention's vmap: Python's `if` on a tensor
    "mask-scalar-if": ({"mask": lambda b, h, q, k: (q >= k) if bool(q >= k) else (q < k)},
                       r"mask function raised RuntimeError: Boolean value of Tensor.*not scalars"),
    "score-batch-4": ({"score_mod": lambda s, b, h, q, k: s.new_zeros(4, 1, 1, 1)},
                      r"score_mod returned shape \(4, 1, 1, 1\)"),
    "score-scalar-if": ({"score_mod": lambda s, b, h, q, k: s + (1.0 if q > k else 0.0)},
                        r"score_mod raised RuntimeError.*q_idx >= kv_idx"),
}


@pytest.mark.parametrize("name", list(BAD_FUNCTIONS))
@pytest.mark.parametrize("call", list(ALL_CALLS))
def test_a_bad_mask_or_score_function_is_named_with_its_shape(call, name):
    kw, pattern = BAD_FUNCTIONS[name]
    if "score_mod" in kw and call in ("sdpa", "sparse"):
        pattern = r"cannot apply a score_mod|sparse backend needs mask="  # refused before it is called
    with pytest.raises(ValueError, match=pattern):
        ALL_CALLS[call](**kw)


# ------------------------------------------------------------- memory before work
def _expanded(L, H=8, D=64):
    """A (1, H, L, D) tensor that costs D floats: every row is the same, with stride 0."""
    return torch.randn(1, 1, 1, D).expand(1, H, L, D)


@pytest.mark.parametrize("kw,what", [
    ({"window": 128}, r"dense mask of 1000000000000 entries"),
    ({"causal": True, "mask": torch.ones(1, 1, 1, 10**6, dtype=torch.bool)}, r"dense mask of"),
    ({"mask": lambda b, h, q, k: q >= k}, r"dense mask of 8000000000000 entries"),
    ({"dropout_p": 0.1}, r"math path for dropout on the CPU"),
])
def test_sdpa_refuses_a_dense_mask_that_cannot_fit_before_allocating_it(kw, what):
    x = _expanded(10**6)
    with pytest.raises(ValueError, match=rf"backend='sdpa' would allocate about [\d.]+ TiB for .*{what}"
                                         r".*free on cpu.*backend='tiled' needs about"):
        qkv.attention(x, x, x, backend="sdpa", **kw)


def test_reference_and_weights_refuse_before_allocating():
    x = _expanded(10**6)
    with pytest.raises(ValueError, match=r"score matrix of B\*Hq\*Lq\*Lk = 1\*8\*1000000\*1000000.*backend='tiled'"):
        qkv.reference_attention(x, x, x)
    with pytest.raises(ValueError, match=r"attention_weights would build a score matrix"):
        qkv.attention_weights(x, x)


def test_linear_backends_refuse_when_even_they_cannot_fit(monkeypatch):
    from qkv.core import _memory

    monkeypatch.setattr(_memory, "available", lambda device: 64 << 20)  # a machine with 64 MiB free
    x = torch.randn(1, 8, 100_000, 64)
    for backend in ("tiled", "sparse", "auto"):
        with pytest.raises(ValueError, match=r"would allocate about [\d.]+ [MG]iB for upcast inputs"
                                             r".*64.0 MiB free.*no backend fits"):
            qkv.attention(x, x, x, window=16, backend=backend)
