"""The public attention functions: validation, the backend registry and dispatch.

Every backend follows one protocol (`Backend`, backend/base.py):

    forward(q, k, v, spec, *, need_lse) -> (out, lse or None)
    unsupported(spec, q, need_lse) -> None, or a sentence naming what it cannot do and
                                      which backend can
    auto(spec, q, need_lse) -> bool    claims the arguments for `auto`, tried by priority

The builtin backends are registered here from one list (`backend.BUILTIN`); adding one
means writing one module and calling `register_backend`. `auto` picks the fastest exact
path that honours every argument, and never falls back silently to a path whose memory
grows with the square of the length. Every call runs under the non-finite guard
(core/finite.py) and the memory check. Layout: docs/architecture.md.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from torch import Tensor

from . import _memory, finite
from .backend import BUILTIN, Backend, reference
from .spec import AttentionSpec, build_spec

_BACKENDS: dict[str, Backend] = {b.name: b for b in BUILTIN}
# Priority of a backend registered with an auto rule and no priority: after the builtin
# special cases (sparse 40, decode 30), before the general fallbacks (sdpa 20, tiled 10).
DEFAULT_PRIORITY = 25


def register_backend(name: str, forward: Callable, unsupported: Callable, auto_rule: Optional[Callable] = None,
                     self_checking: Optional[Callable] = None, memory: Optional[Callable] = None, *,
                     priority: int = DEFAULT_PRIORITY) -> None:
    """Make `backend=name` available; `auto_rule(spec, q, need_lse)` may claim cases for auto
    by returning True (or the backend's name), tried among the other rules by `priority`.

    `memory(spec, q, need_lse) -> (bytes, what)` estimates what a call allocates; a call
    that cannot fit in the device's free memory is refused before it starts.

    `self_checking(spec, q, k, v) -> bool` says when the backend checks the keys and values it
    reads for NaN and infinity itself (calling `finite.report`), so that the dispatch checks
    only q and a float mask for them (see core/finite.py).
    """
    auto = None if auto_rule is None else (lambda spec, q, need_lse: auto_rule(spec, q, need_lse) in (True, name))
    _BACKENDS[name] = Backend(name, forward, unsupported, memory=memory, self_checking=self_checking, auto=auto,
                              priority=priority)


def backends() -> list[str]:
    """The backend names `attention(..., backend=...)` accepts, besides "auto"."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered backend called `name` (one of `backends()`)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, backends()))}")
    return _BACKENDS[name]


def choose_backend(spec: AttentionSpec, q: Tensor, need_lse: bool) -> str:
    """The backend `auto` runs for these arguments.

    Args:
        spec: the validated arguments (`build_spec`); q: the queries (B, Hq, Lq, D), whose
            device and dtype some rules read (whether autograd records: `spec.grad`); need_lse:
            whether the lse is wanted.

    The first backend, by descending priority, whose auto rule claims the arguments and which
    supports them: sparse (a BlockMask, a long sparse pattern or a narrow band), decode (a few
    queries against a long cache), sdpa (a mask of at most sdpa.AUTO_MAX_MASK_ENTRIES
    entries), tiled (always claims; memory linear). Raises ValueError, with the reason of the
    last backend that claimed them, if none can.
    """
    reason: Optional[str] = "no backend claims them"
    for impl in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if impl.auto is None or not impl.auto(spec, q, need_lse):
            continue
        reason = impl.unsupported(spec, q, need_lse)
        if reason is None:
            return impl.name
    raise ValueError(f"no linear-memory backend honours these arguments: {reason}")


def _backend(backend, spec: AttentionSpec, q: Tensor, need_lse: bool):
    """The Backend a `backend=` argument names: "auto", a registered name, or a backend object."""
    if isinstance(backend, str):
        if backend == "auto":
            return _BACKENDS[choose_backend(spec, q, need_lse)]
        if backend not in _BACKENDS:
            known = ", ".join(repr(b) for b in ["auto"] + backends())
            raise ValueError(f"unknown backend {backend!r}; choose one of {known}")
        return _BACKENDS[backend]
    if (isinstance(getattr(backend, "name", None), str) and callable(getattr(backend, "forward", None))
            and callable(getattr(backend, "unsupported", None))):
        return backend
    raise TypeError(f"backend must be a string or a backend object (qkv.core.Backend, e.g. "
                    f"qkv.distributed.RingAttention); got {type(backend).__name__}")


def _run(q, k, v, spec: AttentionSpec, backend, need_lse: bool):
    impl = _backend(backend, spec, q, need_lse)
    reason = impl.unsupported(spec, q, need_lse)
    if reason is not None:
        raise ValueError(reason)
    check_memory(impl, spec, q, need_lse)
    if not getattr(impl, "guarded", True):  # it applies the non-finite rule itself (ring attention)
        return impl.forward(q, k, v, spec, need_lse=need_lse)
    checks = getattr(impl, "self_checking", None)
    self_checking = checks is not None and checks(spec, q, k, v)
    return finite.guarded(impl.forward, q, k, v, spec, need_lse, self_checking=self_checking,
                          checks_queries=self_checking and bool(getattr(impl, "checks_queries", False)))


def check_memory(backend: Union[str, Backend], spec: AttentionSpec, q: Tensor, need_lse: bool) -> None:
    """Refuse, before anything is allocated, a call whose estimate exceeds the free memory of
    q's device; the message gives the estimate and the backends that would fit. `backend`: a
    registered name or a backend object."""
    impl = _BACKENDS[backend] if isinstance(backend, str) else backend
    backend = impl.name
    memory = getattr(impl, "memory", None)
    if memory is None:
        return
    need, what = memory(spec, q, need_lse)
    if need < _memory.ALWAYS_FITS:
        return
    free = _memory.available(q.device)
    if free is None or need <= free:
        return
    fits = []
    for name, other in _BACKENDS.items():
        if name == backend or other.memory is None or other.unsupported(spec, q, need_lse) is not None:
            continue
        other_need, other_what = other.memory(spec, q, need_lse)
        if other_need <= free:
            fits.append(f"backend='{name}' needs about {_memory.fmt(other_need)} ({other_what})")
    advice = ("; " + "; ".join(fits)) if fits else (
        "; no backend fits these arguments: pass fewer query rows (or a shorter batch) per call")
    raise ValueError(f"backend='{backend}' would allocate about {_memory.fmt(need)} for {what}, more than the "
                     f"{_memory.fmt(free)} free on {q.device}{advice}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale: Optional[float] = None,
    score_mod=None,
    dropout_p: float = 0.0,
    backend: Union[str, Backend] = "auto",
) -> Tensor:
    """Scaled dot-product attention: softmax(q k^T * scale + constraints) v.

    Args:
        q: queries (B, Hq, Lq, D).
        k: keys (B, Hkv, Lk, D); Hq must be a multiple of Hkv (grouped-query when smaller).
        v: values (B, Hkv, Lk, Dv).
        mask: bool tensor broadcastable to (B, Hq, Lq, Lk), True = may attend (key padding is
            (B, 1, 1, Lk)); or a float tensor of that broadcast shape added to the scores; or a
            `qkv.BlockMask` (or FlexAttention's own BlockMask from create_block_mask, read as
            one: core/flex_mask.py); or a function mask_mod(b, h, q_idx, kv_idx) -> bool tensor.
        causal: query i sees key j when j <= i + (Lk - Lq) (aligned bottom right).
        window: int w or (left, right): query i sees keys i+(Lk-Lq)-left .. i+(Lk-Lq)+right;
            an int w means (w, w), or (w, 0) with causal=True. None in a pair = unbounded.
        scale: multiplies the scores; default 1/sqrt(D).
        score_mod: function (score, b, h, q_idx, kv_idx) -> score applied before the softmax;
            it receives broadcastable index tensors, score of shape (B, Hq, lq, lk).
        dropout_p: probability of dropping each attention weight (kept ones scaled 1/(1-p)).
        backend: "auto", one of `qkv.core.api.backends()`, or a backend object with the same
            protocol (`qkv.core.Backend`; e.g. `qkv.distributed.RingAttention`).

    Returns:
        out (B, Hq, Lq, Dv) in q's dtype. Rows that may attend to nothing are zeros.
    """
    spec = build_spec(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                      score_mod=score_mod, dropout_p=dropout_p)
    out, _ = _run(q, k, v, spec, backend, need_lse=False)
    return out


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale: Optional[float] = None,
    score_mod=None,
    dropout_p: float = 0.0,
    backend: Union[str, Backend] = "auto",
) -> tuple[Tensor, Tensor]:
    """`attention` plus the log-sum-exp of each row's scores.

    Arguments as for `attention`. Returns (out, lse): out (B, Hq, Lq, Dv) in q's dtype and
    lse (B, Hq, Lq) float32, the natural log of the softmax denominator (scale, score_mod
    and float mask included); -inf for a row that may attend to nothing. Both are
    differentiable, so partial results can be merged exactly: out = sum_r exp(lse_r - lse) out_r.
    """
    out, lse = attention_with_lse_exact(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                                        score_mod=score_mod, dropout_p=dropout_p, backend=backend)
    return out, lse.float()


def attention_with_lse_exact(q, k, v, *, mask=None, causal=False, window=None, scale=None,
                             score_mod=None, dropout_p=0.0, backend="auto") -> tuple[Tensor, Tensor]:
    """As `attention_with_lse`, but lse stays in the compute dtype (float64 for float64 inputs).

    For merging partial results in float64 without losing precision (ring attention).
    """
    spec = build_spec(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                      score_mod=score_mod, dropout_p=dropout_p)
    return _run(q, k, v, spec, backend, need_lse=True)


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale: Optional[float] = None,
    score_mod=None,
) -> Tensor:
    """The attention weights softmax(q k^T * scale + constraints).

    Arguments as for `attention` (no values, no dropout). q (B, Hq, Lq, D), k (B, Hkv, Lk, D)
    -> probs (B, Hq, Lq, Lk) in q's dtype; each row sums to 1 over the keys it may see, or is
    all zeros if it may see none. Materialises the full matrix: for long inputs pass only the
    query rows you need together with a mask that places them.
    """
    spec = build_spec(q, k, None, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
    reason = reference.size_error(spec, q.dtype, what="attention_weights")
    if reason is not None:
        raise ValueError(reason)
    check_memory("reference", spec, q, False)
    probs, _ = finite.guarded(_weights, q, k, None, spec, False)
    return probs


def _weights(q: Tensor, k: Tensor, v: None, spec: AttentionSpec, *, need_lse: bool):
    """reference.weights in a backend's shape, for the non-finite guard."""
    return reference.weights(q, k, spec), None


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask=None,
    causal: bool = False,
    window=None,
    scale: Optional[float] = None,
    score_mod=None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The plain reference (the specification): materialises the scores; usable in float64.

    Arguments and result as for `attention`. `scale=1.0` reproduces the seed's numpy sample.
    """
    spec = build_spec(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                      score_mod=score_mod, dropout_p=dropout_p)
    out, _ = _run(q, k, v, spec, "reference", need_lse=False)
    return out

