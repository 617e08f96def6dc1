"""Honest results for every backend: NaN in, NaN out, in exactly the rows that depend on it.

The rule (docs/errors.md). A query row is *poisoned* when its row of q holds a NaN or an
infinity, or when it may see (under every constraint given) a key whose row of k or v holds
one, or a float-mask entry of NaN or +inf. A poisoned row's output (and weights) are NaN in
every entry and its lse is NaN. A key a row may not see (bool mask False, float mask -inf,
outside the causal/window band, a BlockMask's or mask function's False) has no effect on that
row, whatever its k and v hold. Gradients follow the forward: NaN in dq of a poisoned row and
in dk, dv of every key a poisoned row may see; elsewhere the gradient of the finite rest.

Fused kernels break this on their own (torch's CPU SDPA turns a NaN query row into zeros, a
masked key's NaN value leaks through `0 * NaN` into rows that cannot see it, and a masked
score that overflows to inf leaks through `inf + -inf`), so the rule is enforced here, once,
around every backend (the reference included), in two steps:

1. A cheap scan: the minimum and maximum of q, k and v (O(L*D) against attention's O(L^2*D);
   benchmarks/finite_check.py measures it). Finite extremes mean no NaN or infinity anywhere,
   and bound every score by scale * D * max|q| * max|k|. A backend that reads k and v once per
   call anyway (decode, whose whole step is O(L*D)) checks what it reads instead and raises
   `Suspect`: only q and a float mask are checked there, by one sum and one maximum. The native
   FA-2 kernel takes the extremes of q, k and v as it loads and packs them, and its backends
   apply this scan's test to them (`extremes_suspect`): nothing is scanned there (`checks_queries`).
2. Only when the scan finds something: non-finite entries are replaced by 0, the backend runs
   on the clean inputs (`trusted()`, so self-checking backends do not raise again), and the
   poisoned rows, found through the spec's own constraints (prefix sums for a causal/window
   band, key chunks for masks), are set to NaN. Finite inputs whose scores could overflow the
   compute dtype (float32 for float32, bfloat16 and float16) run in float64 and are rounded
   back, so a huge masked key cannot leak and a huge visible one gives the exact softmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .spec import AttentionSpec, compute_dtype, slice_block

# Scores bounded by scale * D * max|q| * max|k| below this share of the compute dtype's
# largest value cannot overflow, even after a float mask or score function adds to them.
_SAFE_SHARE = 1.0 / 1024
# Mask entries evaluated at once while finding poisoned rows (bool, so 4 MiB).
_CHUNK_ENTRIES = 1 << 22

_state = threading.local()


class Suspect(Exception):
    """Raised by a self-checking backend that read a non-finite value (see `report`)."""


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Inputs are known to be finite: self-checking backends do not raise `Suspect`."""
    previous = getattr(_state, "trusted", False)
    _state.trusted = True
    try:
        yield
    finally:
        _state.trusted = previous


def report(suspect) -> None:
    """Called by a self-checking backend after its fast path: `suspect` (a bool or a 0-d bool
    tensor) says whether it read a non-finite value or produced one. Raises `Suspect` unless
    inside `trusted()`, so the guard recomputes the call by the rule."""
    if getattr(_state, "trusted", False):
        return
    if bool(suspect):
        raise Suspect()


# A backend forward: (q, k, v, spec, need_lse) -> (out, lse or None); v may be None for weights.
Forward = Callable[..., tuple]


def guarded(forward: Forward, q: Tensor, k: Tensor, v: Optional[Tensor], spec: AttentionSpec, need_lse: bool,
            *, self_checking: bool = False, checks_queries: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Run `forward(q, k, v, spec, need_lse=...)` under the rule of the module docstring.

    Args:
        forward: a backend's forward; returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) or None).
            For attention weights, v is None and out is probs (B, Hq, Lq, Lk).
        q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) or None: as given by the user.
        spec: the validated arguments.
        need_lse: passed on.
        self_checking: the backend checks k and v as it reads them and calls `report`; only
            q (and a float mask) are scanned here.
        checks_queries: with self_checking, the backend checks q too (the native kernel takes the
            extremes of every query row it loads): only a float mask is scanned here.
    """
    if getattr(_state, "trusted", False):
        return forward(q, k, v, spec, need_lse=need_lse)
    if self_checking and checks_queries and spec.float_mask is None:
        finite, bound = True, 0.0
    elif self_checking:
        finite, bound = queries_finite(q, spec), 0.0
    else:
        finite, bound = scan(tuple(t for t in (q, k, v) if t is not None), spec)
    if finite and (self_checking or bound <= _safe_bound(q.dtype)):
        try:
            return forward(q, k, v, spec, need_lse=need_lse)
        except Suspect:
            pass
    return _exact(forward, q, k, v, spec, need_lse)


def all_finite(*tensors: Tensor) -> bool:
    """Whether the tensors hold no NaN and no infinity (one synchronising read of their extremes)."""
    return all(bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()) for t in tensors if t.numel())


def queries_finite(q: Tensor, spec: AttentionSpec) -> bool:
    """Whether q holds no NaN and no infinity and the float mask no NaN and no +inf, for a
    self-checking backend (which needs no bound on the scores): one sum of q, and the mask's
    maximum. A sum is NaN or infinite when an entry is; a finite q whose sum overflows reads as
    not finite, which only sends the call down the exact path. After a decode step's cache has
    streamed through the CPU's caches every torch operation runs cold: `scan` took 0.12-0.13 ms
    here, this 0.04 ms (bfloat16 q, B=1, Hq=32, D=128, each call right after a 128 MiB read, best
    of 21, twice)."""
    if q.numel() and not math.isfinite(q.sum(dtype=torch.float32 if q.dtype == torch.float16 else None).item()):
        return False
    mask = spec.float_mask
    return mask is None or not mask.numel() or float(mask.amax()) < float("inf")  # NaN and +inf fail `<`


def _safe_bound(dtype: torch.dtype) -> float:
    return torch.finfo(compute_dtype(dtype)).max * _SAFE_SHARE


def extremes_suspect(q_max: float, k_max: float, v_max: float, spec: AttentionSpec, dtype: torch.dtype) -> bool:
    """For a self-checking backend that takes the extremes of what it reads (the native kernel does as it
    packs the keys and values and loads the queries): whether the call must be recomputed by the rule,
    from the largest |x| of the queries, keys and values read (NaN or infinity where one was). The same
    test as `scan` and `guarded` make on the whole tensors: a NaN or an infinity, or a score bound
    scale * D * max|q| * max|k| past the compute dtype's safe share. Keys no query may see are left out
    of the extremes where the backend never reads them, which the rule allows (they have no effect)."""
    if not all(x < float("inf") for x in (q_max, k_max, v_max)):  # NaN and inf fail `<`
        return True
    return abs(spec.scale) * spec.D * q_max * k_max > _safe_bound(dtype)


def report_extremes(seen: list, spec: AttentionSpec, dtype: torch.dtype) -> None:
    """`report` by `extremes_suspect` on a kernel's extremes `seen` ([max|q|, max|k|, max|v|], or empty for an
    empty call, which reports nothing)."""
    if seen:
        report(extremes_suspect(seen[0], seen[1], seen[2], spec, dtype))


def scan(tensors: tuple, spec: AttentionSpec) -> tuple[bool, float]:
    """(no NaN or infinity in the tensors and the float mask, bound on |score|), from one
    synchronising read of their extremes. The bound is scale * D * max|q| * max|k| when
    `tensors` starts with q and k, else 0."""
    stats = [torch.stack(torch.aminmax(t)) if t.numel() else t.new_zeros(2) for t in tensors]  # (2,): min, max
    mask = spec.float_mask
    if mask is not None and mask.numel():
        top = mask.amax()  # NaN if an entry is NaN, +inf if one is +inf; -inf entries are masks
        stats.append(top.clamp_min(0).expand(2))  # so a -inf maximum (all masked) reads as 0
    if not stats:
        return True, 0.0
    values = torch.stack([s.to(torch.float64) for s in stats]).abs().tolist()  # the one sync
    if not all(x < float("inf") for pair in values for x in pair):  # NaN and inf fail `<`
        return False, float("inf")
    if len(tensors) < 2:
        return True, 0.0
    return True, abs(spec.scale) * spec.D * max(values[0]) * max(values[1])


# ------------------------------------------------------------------ the exact path
def _exact(forward: Forward, q: Tensor, k: Tensor, v: Optional[Tensor], spec: AttentionSpec,
           need_lse: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Clean inputs, run, and poison the rows the rule names (see the module docstring)."""
    bad_q = _bad_rows(q)  # (B, Hq, Lq)
    bad_kv = _bad_rows(k)  # (B, Hkv, Lk): a key is bad if its k or v row is
    if v is not None:
        bad_kv = bad_kv | _bad_rows(v)
    mask = spec.float_mask
    bad_mask = None
    clean_spec = spec
    if mask is not None and mask.numel() and bool((torch.isnan(mask) | torch.isposinf(mask)).any()):
        bad_mask = torch.isnan(mask) | torch.isposinf(mask)  # the mask's broadcast shape
        clean_spec = dataclasses.replace(spec, float_mask=mask.masked_fill(bad_mask, 0.0))
    poisoned = poisoned_rows(spec, bad_q, bad_kv, bad_mask)  # (B, Hq, Lq)
    qc, kc, vc = _Clean.apply(q, k, v, spec, poisoned)
    ct = compute_dtype(q.dtype)
    hazard = q.dtype != torch.float64 and _bound(qc, kc, spec) > _safe_bound(q.dtype)
    with trusted():
        if hazard:  # finite scores that could overflow float32: compute them in float64
            wide = clean_spec
            if wide.float_mask is not None:
                wide = dataclasses.replace(wide, float_mask=wide.float_mask.double())
            out, lse = forward(qc.double(), kc.double(), None if vc is None else vc.double(), wide,
                               need_lse=need_lse)
            out = out.to(q.dtype)
            lse = None if lse is None else lse.to(ct)
        else:
            out, lse = forward(qc, kc, vc, clean_spec, need_lse=need_lse)
    if bool(poisoned.any()):
        out = out.masked_fill(poisoned.unsqueeze(-1), float("nan"))  # (B, Hq, Lq, Dv or Lk)
        if lse is not None:
            lse = lse.masked_fill(poisoned, float("nan"))
    return out, lse


def _bad_rows(t: Tensor) -> Tensor:
    """(B, H, L, E) -> bool (B, H, L): rows holding a NaN or an infinity."""
    return ~torch.isfinite(t).all(dim=-1)


def _bound(q: Tensor, k: Tensor, spec: AttentionSpec) -> float:
    if not q.numel() or not k.numel():
        return 0.0
    return abs(spec.scale) * spec.D * float(q.detach().abs().amax()) * float(k.detach().abs().amax())


class _Clean(torch.autograd.Function):
    """q, k, v with non-finite entries replaced by 0; the backward puts NaN where the rule does:
    dq of poisoned rows, dk and dv of the keys a poisoned row may see."""

    @staticmethod
    def forward(ctx, q, k, v, spec, poisoned):
        ctx.spec, ctx.poisoned = spec, poisoned
        ctx.has_v = v is not None
        clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k)]
        clean.append(None if v is None else torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0))
        return tuple(clean)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        poisoned = ctx.poisoned
        if not bool(poisoned.any()):
            return dq, dk, dv, None, None
        nan = float("nan")
        if dq is not None:
            dq = dq.masked_fill(poisoned.unsqueeze(-1), nan)
        if dk is not None or dv is not None:
            seen = keys_seen(ctx.spec, poisoned).unsqueeze(-1)  # (B, Hkv, Lk, 1)
            dk = None if dk is None else dk.masked_fill(seen, nan)
            dv = None if dv is None else dv.masked_fill(seen, nan)
        return dq, dk, dv, None, None


# ------------------------------------------------------------ who sees what
def poisoned_rows(spec: AttentionSpec, bad_q: Tensor, bad_kv: Tensor, bad_mask: Optional[Tensor]) -> Tensor:
    """bool (B, Hq, Lq): rows with a bad query, or that may see a bad key or a bad mask entry.

    Args:
        bad_q (B, Hq, Lq), bad_kv (B, Hkv, Lk): rows of q, and keys, holding a NaN or infinity.
        bad_mask: bool broadcastable to (B, Hq, Lq, Lk): float-mask entries NaN or +inf, or None.
    """
    Lq, Lk = spec.Lq, spec.Lk
    rows = bad_q.clone()
    if Lk == 0 or (bad_mask is None and not bool(bad_kv.any())):
        return rows
    bad_keys = bad_kv.repeat_interleave(spec.groups, dim=1)  # (B, Hq, Lk): query head h uses kv head h // G
    if bad_mask is None and not spec.has_dense_constraints:
        # The band alone: row i sees keys [lo_i, hi_i), so count bad keys there by prefix sums.
        lo, hi = spec.band_edges(torch.arange(Lq, device=bad_q.device))  # (Lq,) each
        count = torch.nn.functional.pad(bad_keys.to(torch.int64).cumsum(-1), (1, 0))  # (B, Hq, Lk + 1)
        seen_bad = count[..., hi] - count[..., lo] > 0  # (B, Hq, Lq)
        return rows | (seen_bad & (hi > lo))
    cols = None if bad_mask is not None else bad_keys.flatten(0, 1).any(0)  # (Lk,): columns worth a look
    for i0, i1, j0, j1 in _chunks(spec):
        if cols is not None and not bool(cols[j0:j1].any()):
            continue
        visible = _visible(spec, i0, i1, j0, j1, bad_q.device)  # (B, Hq, bi, bj)
        bad = bad_keys[:, :, None, j0:j1]  # (B, Hq, 1, bj)
        if bad_mask is not None:
            bad = bad | slice_block(bad_mask, i0, i1, j0, j1)
        rows[:, :, i0:i1] |= (visible & bad).any(-1)
    return rows


def keys_seen(spec: AttentionSpec, rows: Tensor) -> Tensor:
    """bool (B, Hkv, Lk): keys that some row marked in `rows` (B, Hq, Lq) may see."""
    B, Hq, Lq, Lk = spec.B, spec.Hq, spec.Lq, spec.Lk
    seen = torch.zeros(B, Hq, Lk, dtype=torch.bool, device=rows.device)
    if Lk == 0 or not bool(rows.any()):
        return seen.view(B, spec.Hkv, spec.groups, Lk).any(2)
    if not spec.has_dense_constraints:
        # The band alone: mark [lo_i, hi_i) of every marked row with a difference array.
        lo, hi = spec.band_edges(torch.arange(Lq, device=rows.device))  # (Lq,) each
        live = (rows & (hi > lo)).to(torch.int64)  # (B, Hq, Lq)
        diff = torch.zeros(B, Hq, Lk + 1, dtype=torch.int64, device=rows.device)
        diff.scatter_add_(-1, lo.expand(B, Hq, Lq), live)
        diff.scatter_add_(-1, hi.expand(B, Hq, Lq), -live)
        seen = diff.cumsum(-1)[..., :Lk] > 0
    else:
        marked = rows.flatten(0, 1).any(0)  # (Lq,)
        for i0, i1, j0, j1 in _chunks(spec):
            if not bool(marked[i0:i1].any()):
                continue
            visible = _visible(spec, i0, i1, j0, j1, rows.device)  # (B, Hq, bi, bj)
            seen[:, :, j0:j1] |= (visible & rows[:, :, i0:i1, None]).any(-2)
    return seen.view(B, spec.Hkv, spec.groups, Lk).any(2)  # (B, Hkv, Lk)


def _chunks(spec: AttentionSpec):
    """(i0, i1, j0, j1) blocks covering the grid, about _CHUNK_ENTRIES entries each."""
    heads = max(1, spec.B * spec.Hq)
    bi = max(1, min(spec.Lq, _CHUNK_ENTRIES // (heads * min(spec.Lk, 1024) or 1)))
    bj = max(1, min(spec.Lk, _CHUNK_ENTRIES // (heads * bi)))
    for i0 in range(0, spec.Lq, bi):
        lo, hi = spec.kv_range(i0, min(i0 + bi, spec.Lq))
        for j0 in range(max(0, lo) // bj * bj, min(hi, spec.Lk), bj):
            yield i0, min(i0 + bi, spec.Lq), j0, min(j0 + bj, spec.Lk)


def _visible(spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int, device) -> Tensor:
    """bool (B, Hq, i1-i0, j1-j0): may query i see key j (every constraint; a -inf float-mask
    entry hides the key)."""
    allowed, bias = spec.constraints(i0, i1, j0, j1, device)
    shape = (spec.B, spec.Hq, i1 - i0, j1 - j0)
    vis = torch.ones(shape, dtype=torch.bool, device=device) if allowed is None else allowed.expand(shape)
    if bias is not None:
        vis = vis & ~torch.isneginf(bias)
    return vis


