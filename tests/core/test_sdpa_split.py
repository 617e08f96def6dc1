"""The sdpa backend's mask-free split of a causal chunk (Lq < Lk, chunked prefill), issue 6.

Bottom-right causal attention of Lq < Lk queries runs as the prefix keys without a mask plus the
square causal block, merged by lse (qkv.core.backend.sdpa.split_causal). Outputs and gradients against
the float64 reference by the rule of tests/tolerance.py; every case also counts the kernel
calls, so that a case meant for the split cannot pass through the dense-mask path unseen and a
case that must not split (windows, masks, D != Dv, Lq >= Lk) is seen not to.
"""

from __future__ import annotations

import pytest
import torch
from random_qkv import random_inputs

import qkv
from qkv.core import choose_backend
from qkv.core.backend import sdpa
from qkv.core.spec import build_spec
from qkv.testing import FWD_FACTOR, GRAD_FACTOR, assert_within_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (B, Hq, Hkv, Lq, Lk, D): Lq = 1 and a few, prefix Lk - Lq of 1 and many, MHA/GQA/MQA, B > 1.
SPLIT_SHAPES = {
    "one-query-one-prefix": (1, 2, 2, 1, 2, 32),
    "one-query-mqa": (2, 4, 1, 1, 97, 32),
    "gqa-prefix1": (2, 4, 2, 5, 6, 64),
    "mha-many": (2, 3, 3, 7, 300, 59),
    "gqa-many": (1, 8, 2, 64, 1100, 64),
    "gqa-wide-head": (1, 6, 3, 33, 40, 128),
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of split_causal calls and of the fused CPU kernel's forward and backward calls."""
    seen = {"split": 0, "kernel": 0, "kernel_backward": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sdpa, "split_causal", counting("split", sdpa.split_causal))
    monkeypatch.setattr(sdpa, "_flash_cpu", counting("kernel", sdpa._flash_cpu))
    monkeypatch.setattr(sdpa, "_flash_cpu_backward", counting("kernel_backward", sdpa._flash_cpu_backward))
    return seen


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed):
    return random_inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed, upstream=True)  # q, k, v, upstream


def _check(q, k, v, up, backend="sdpa", grad=(True, True, True), **kw):
    """backend's output and the gradients of the inputs flagged in `grad` against float64, by the rule."""
    dtype = q.dtype
    q64, k64, v64 = (t.detach().double().requires_grad_(g) for t, g in zip((q, k, v), grad))
    wanted = [t for t in (q64, k64, v64) if t.requires_grad]
    exact = qkv.reference_attention(q64, k64, v64, **kw)
    exact_grads = torch.autograd.grad(exact, wanted, up.double())

    qp, kp, vp = (t.detach().clone().requires_grad_(g) for t, g in zip((q, k, v), grad))
    plain = qkv.reference_attention(qp, kp, vp, **kw)
    plain_grads = torch.autograd.grad(plain, [t for t in (qp, kp, vp) if t.requires_grad], up)

    qf, kf, vf = (t.detach().requires_grad_(g) for t, g in zip((q, k, v), grad))
    fast = qkv.attention(qf, kf, vf, backend=backend, **kw)
    assert fast.dtype == dtype
    fast_grads = torch.autograd.grad(fast, [t for t in (qf, kf, vf) if t.requires_grad], up)

    what = f"{backend} {tuple(q.shape)} x {tuple(k.shape)} {kw} {dtype}"
    assert_within_rule(fast, plain, exact, factor=FWD_FACTOR, what=what + " out")
    names = [n for n, g in zip("qkv", grad) if g]
    for name, g, gp, ge in zip(names, fast_grads, plain_grads, exact_grads):
        assert_within_rule(g, gp, ge, factor=GRAD_FACTOR, what=f"{what} d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SPLIT_SHAPES))
def test_split_matches_reference(shape_name, dtype, calls):
    B, Hq, Hkv, Lq, Lk, D = SPLIT_SHAPES[shape_name]
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, D, dtype, seed=sum(SPLIT_SHAPES[shape_name]))
    _check(q, k, v, up, causal=True)
    assert calls == {"split": 1, "kernel": 2, "kernel_backward": 2}, calls


def test_the_causal_band_from_a_window_splits_too(calls):
    """window=(None, 0) without causal=True is the same band."""
    q, k, v, up = _inputs(1, 4, 2, 9, 50, 32, 32, torch.float32, seed=1)
    _check(q, k, v, up, window=(None, 0))
    assert calls["split"] == 1, calls


@pytest.mark.parametrize("grad", [(True, False, False), (False, True, True), (False, False, True)])
def test_split_with_gradients_for_some_inputs(grad, calls):
    q, k, v, up = _inputs(2, 4, 2, 6, 70, 32, 32, torch.float32, seed=2)
    _check(q, k, v, up, grad=grad, causal=True)
    assert calls["split"] == 1, calls


def test_split_reads_a_kv_cache_view_and_transposed_queries(calls):
    """As in a model: q is (B, L, H, D) transposed, k and v are views into a larger cache buffer."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 8, 40, 16
    q = torch.randn(B, Lq, Hq, D, generator=gen).transpose(1, 2)  # (B, Hq, Lq, D), not contiguous
    k = torch.randn(B, Hkv, 64, D, generator=gen)[:, :, :Lk]  # (B, Hkv, Lk, D) of a capacity-64 buffer
    v = torch.randn(B, Hkv, 64, D, generator=gen)[:, :, :Lk]
    up = torch.randn(B, Hq, Lq, D, generator=gen)
    _check(q, k, v, up, causal=True)
    assert calls["split"] == 1, calls


def test_split_backward_from_a_sum():
    """out.sum() sends an expanded (stride 0) gradient; it must give the same gradients as ones."""
    q, k, v, _ = _inputs(1, 4, 2, 5, 30, 16, 16, torch.float32, seed=4)
    got, want = [], []
    for upstream, sink in ((None, got), (torch.ones(1, 4, 5, 16), want)):
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        out = qkv.attention(qf, kf, vf, causal=True, backend="sdpa")
        out.sum().backward() if upstream is None else out.backward(upstream)
        sink.extend([qf.grad, kf.grad, vf.grad])
    for name, g, w in zip("qkv", got, want):
        assert torch.equal(g, w), f"d{name} from out.sum() differs from ones upstream"


def test_auto_runs_the_split_for_a_chunk(calls):
    """`auto` sends a 64-query chunk against 1100 keys (no decode: more than 16 queries) to the split."""
    q, k, v, up = _inputs(1, 8, 2, 64, 1100, 32, 32, torch.float32, seed=5)
    _check(q, k, v, up, backend="auto", causal=True)
    assert calls["split"] == 1, calls


def test_auto_picks_sdpa_for_a_2048_chunk_against_a_32k_cache():
    """Before the split, the dense bottom-right mask of 2048 x 32768 entries (> 2^24) sent this to
    tiled; now it needs no mask. Tiny head dims keep the tensors small."""
    def spec_of(Lq, Lk, requires_grad=False, **kw):
        q = torch.zeros(1, 32, Lq, 4, requires_grad=requires_grad)  # (B, Hq, Lq, D)
        k = torch.zeros(1, 8, Lk, 4)  # (B, Hkv, Lk, D)
        return build_spec(q, k, k, **kw), q

    spec, q = spec_of(2048, 32768, causal=True)
    assert sdpa.mask_entries(spec) == 2048 * 32768 > sdpa.AUTO_MAX_MASK_ENTRIES  # the dense mask it avoids
    assert sdpa.mask_entries(spec, q) == 0
    assert choose_backend(spec, q, False) == "sdpa"
    spec, q = spec_of(2048, 32768, requires_grad=True, causal=True)
    assert choose_backend(spec, q, False) == "sdpa"
    # A window, a key-padding mask or D != Dv still need the dense mask, so never go to sdpa
    # (a window goes to the sparse backend, the rest to tiled).
    spec, q = spec_of(2048, 32768, causal=True, window=4096)
    assert sdpa.mask_entries(spec, q) > sdpa.AUTO_MAX_MASK_ENTRIES
    assert choose_backend(spec, q, False) != "sdpa"
    padding = torch.ones(1, 1, 1, 32768, dtype=torch.bool)
    spec, q = spec_of(2048, 32768, causal=True, mask=padding)
    assert choose_backend(spec, q, False) == "tiled"
    q, k = torch.zeros(1, 32, 2048, 4), torch.zeros(1, 8, 32768, 4)
    spec = build_spec(q, k, torch.zeros(1, 8, 32768, 2), causal=True)
    assert choose_backend(spec, q, False) == "tiled"


# (B, Hq, Hkv, Lq, Lk, D, Dv, keyword arguments): cases the split must leave to the other paths.
NOT_SPLIT = {
    "causal-window": (1, 4, 2, 9, 50, 32, 32, {"causal": True, "window": 16}),
    "window-right": (1, 4, 2, 9, 50, 32, 32, {"window": (None, 3)}),
    "key-padding-causal": (2, 4, 2, 9, 50, 32, 32, {"causal": True, "padding": True}),
    "bool-mask-causal": (1, 4, 2, 9, 50, 32, 32, {"causal": True, "bool": True}),
    "d-ne-dv": (1, 4, 2, 9, 50, 32, 16, {"causal": True}),
    "square": (2, 4, 2, 33, 33, 32, 32, {"causal": True}),
    "more-queries": (1, 4, 2, 50, 9, 32, 32, {"causal": True}),
    "not-causal": (1, 4, 2, 9, 50, 32, 32, {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(NOT_SPLIT))
def test_cases_that_do_not_split(case, dtype, calls):
    B, Hq, Hkv, Lq, Lk, D, Dv, kw = NOT_SPLIT[case]
    q, k, v, up = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=len(case))
    kw = dict(kw)
    gen = torch.Generator().manual_seed(6)
    if kw.pop("padding", False):
        lengths = torch.tensor([Lk, Lk - 7])
        kw["mask"] = (torch.arange(Lk)[None, :] < lengths[:, None]).view(B, 1, 1, Lk)
    if kw.pop("bool", False):
        kw["mask"] = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.3
    _check(q, k, v, up, **kw)
    assert calls["split"] == 0, calls


def test_split_causal_rejects_shapes_it_cannot_run():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="0 < Lq < Lk"):
        sdpa.split_causal(q, k, k, 0.25)  # Lq == Lk
    with pytest.raises(ValueError, match="Dv == D"):
        sdpa.split_causal(q[:, :, :4], k, k[..., :8], 0.25)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sdpa.split_causal(q[:, :3, :4], k, k, 0.25)


def test_chunked_prefill_of_a_model_runs_the_split(calls):
    """A Llama-family decoder fed 13 tokens in chunks of 5 (no padding, so no mask): the chunks of
    5 against 10 keys and 3 against 13 run the split in each of the 2 layers, and the hidden
    states equal one pass by the rule."""
    from qkv.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    exact_model = LlamaForCausalLM(config).eval()
    exact_model.load_state_dict(model.state_dict())
    exact_model.double()
    ids = torch.randint(4, 64, (2, 13), generator=torch.Generator().manual_seed(1))  # (B, L)
    with torch.no_grad():
        got = model.hidden(ids, cache=model.new_cache(2), chunk_size=5)  # (B, L, E)
        assert calls["split"] == 2 * 2, calls
        plain = model.hidden(ids, cache=model.new_cache(2))
        exact = exact_model.hidden(ids, cache=exact_model.new_cache(2))
    assert_within_rule(got, plain, exact, factor=FWD_FACTOR, what="chunked prefill hidden states")
