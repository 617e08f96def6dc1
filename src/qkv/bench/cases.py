"""One cell of `qkv bench` (case, dtype, L): its inputs, qkv and its peers (torch SDPA,
compiled FlexAttention) timed by `qkv.bench.timing`, the skip rules, and the check of
`qkv.bench.verify`. The method is described in `qkv.bench`'s docstring."""

from __future__ import annotations

import warnings
import zlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import DTYPES, BenchConfig
from .report import loadavg
from .timing import Sampler, clock, sample_in_turns
from .verify import check_rows, verify

# Working memory per query-key pair of the peers that materialise an Lq x Lk grid, measured
# on torch 2.13's CPU kernels (SDPA with a bool mask; create_block_mask of a mask function).
SDPA_MASK_BYTES_PER_PAIR = 10
FLEX_MASK_BYTES_PER_PAIR = 10


def inputs(cfg: BenchConfig, case: str, dtype_name: str, L: int):
    """q (B, H, Lq, D), k and v (B, Hkv, L, D): the same numbers for every method."""
    seed = zlib.crc32(f"{cfg.seed}:{case}:{L}".encode())  # stable across runs and processes
    gen = torch.Generator().manual_seed(seed)
    Hkv = cfg.Hkv if case in ("gqa", "decode") else cfg.heads
    Lq = 1 if case == "decode" else L
    dtype = DTYPES[dtype_name]
    # drawn in float32 and rounded, so the dtypes of one case share their values
    q = torch.randn(cfg.batch, cfg.heads, Lq, cfg.dim, generator=gen).to(dtype)  # (B, H, Lq, D)
    k = torch.randn(cfg.batch, Hkv, L, cfg.dim, generator=gen).to(dtype)         # (B, Hkv, L, D)
    v = torch.randn(cfg.batch, Hkv, L, cfg.dim, generator=gen).to(dtype)         # (B, Hkv, L, D)
    return q, k, v


def _qkv_kwargs(case: str, cfg: BenchConfig) -> dict:
    if case == "window":
        return {"causal": True, "window": cfg.window}
    if case in ("causal", "gqa"):
        return {"causal": True}
    return {}


def _allowed(case: str, cfg: BenchConfig, rows: torch.Tensor, Lq: int, Lk: int) -> Optional[torch.Tensor]:
    """Bool (len(rows), Lk): which keys the given query rows see (bottom-right aligned), or None = all."""
    if case in ("dense", "decode"):
        return None
    diag = rows[:, None] + (Lk - Lq)  # (rows, 1) key position of each query
    kv = torch.arange(Lk)[None, :]     # (1, Lk)
    allowed = kv <= diag
    if case == "window":
        allowed = allowed & (kv >= diag - cfg.window)
    return allowed


def _flex_mask_mod(case: str, cfg: BenchConfig):
    if case in ("causal", "gqa"):
        return lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    if case == "window":
        w = cfg.window
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
    return None


def _growth_power(case: str, method: str) -> int:
    """How one call's time grows with L, for the skip rule: 1 (linear) or 2 (quadratic)."""
    if case == "decode" or (method == "flex" and case == "window"):
        return 1
    return 2


def _peer_memory(case: str, method: str, Lq: int, Lk: int) -> int:
    """Bytes beyond the inputs a peer needs (grid-sized work only; O(L) parts left out)."""
    if method == "sdpa" and case == "window":
        return SDPA_MASK_BYTES_PER_PAIR * Lq * Lk
    if method == "flex" and case in ("causal", "window", "gqa"):  # the cases with a block mask
        return FLEX_MASK_BYTES_PER_PAIR * Lq * Lk
    return 0



def _skip_reason(case: str, method: str, cfg: BenchConfig, Lq: int, L: int, previous: dict) -> Optional[str]:
    need = _peer_memory(case, method, Lq, L)
    if need > cfg.max_memory_gib * 2**30:
        return (f"needs about {need / 2**30:.1f} GiB for its Lq x Lk grid, above --max-memory-gib "
                f"{cfg.max_memory_gib:g}")
    prev = previous.get(method)
    if prev is not None:
        prev_L, prev_s = prev
        if prev_L < L:
            predicted = prev_s * (L / prev_L) ** _growth_power(case, method)
            if predicted > cfg.max_seconds:
                return (f"one call would take about {predicted:.0f} s (from {prev_s:.2f} s at L={prev_L}), "
                        f"above --max-seconds {cfg.max_seconds:g}")
    return None


def _flex_call(case: str, cfg: BenchConfig, q, k, v, L: int):
    """A compiled FlexAttention call for this case, and the seconds its block mask took."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compilation per cell: each first call then includes its whole compile, and
    # torch.compile's recompile limit (8 shapes) can never make it fall back to eager.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    mask_mod = _flex_mask_mod(case, cfg)
    t0 = clock()
    bm = None if mask_mod is None else create_block_mask(mask_mod, None, None, q.shape[2], L, device="cpu")
    block_mask_s = clock() - t0
    gqa = k.shape[1] != q.shape[1]

    def call():
        return compiled(q, k, v, block_mask=bm, enable_gqa=gqa)

    return call, block_mask_s


def run_cell(case: str, dtype_name: str, L: int, cfg: BenchConfig, history: dict, flex_state: dict,
             step: Callable[[str], None]) -> dict:
    """One row of the table: every method timed on the inputs of (case, dtype_name, L), qkv checked.

    history: {(case, dtype): {method: (L, seconds)}} of the earlier lengths, for the skip rule
    (updated here); flex_state: {"unavailable": reason} once FlexAttention is known not to run;
    step(label): told what runs now, for the progress bar.
    """
    q, k, v = inputs(cfg, case, dtype_name, L)
    B, H, Lq, D = q.shape
    row = {"case": case, "dtype": dtype_name, "L": L, "B": B, "Hq": H, "Hkv": k.shape[1], "Lq": Lq, "Lk": L,
           "D": D, "qkv_backend": cfg.backend, "load_average": (loadavg() or [None])[0]}
    previous = history.setdefault((case, dtype_name), {})
    timers: dict[str, Sampler] = {}
    outputs: dict[str, torch.Tensor] = {}
    import qkv as _qkv

    kwargs = _qkv_kwargs(case, cfg)
    if cfg.backend == "auto":
        row["qkv_backend"] = _auto_choice(q, k, v, kwargs)
    step("qkv")
    timers["qkv"] = Sampler(lambda: _qkv.attention(q, k, v, backend=cfg.backend, **kwargs), cfg.min_sample_s)
    try:
        outputs["qkv"] = timers["qkv"].first()
    except ValueError as exc:  # the chosen backend cannot run this case: say so, time the rest
        del timers["qkv"]
        row["qkv"] = {"skipped": str(exc)}

    reason = _skip_reason(case, "sdpa", cfg, Lq, L, previous)
    if reason is None:
        step("sdpa")
        gqa = k.shape[1] != H
        if case == "window":
            dense = _allowed(case, cfg, torch.arange(Lq), Lq, L)  # (Lq, L) bool, built outside the timing
            timers["sdpa"] = Sampler(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), cfg.min_sample_s)
        else:
            causal = case in ("causal", "gqa")
            timers["sdpa"] = Sampler(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
                                     cfg.min_sample_s)
        outputs["sdpa"] = timers["sdpa"].first()
    else:
        row["sdpa"] = {"skipped": reason}

    if cfg.flex:
        reason = flex_state.get("unavailable") or _skip_reason(case, "flex", cfg, Lq, L, previous)
        if reason is None:
            step("flex (compiling)")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call, block_mask_s = _flex_call(case, cfg, q, k, v, L)
                    timers["flex"] = Sampler(call, cfg.min_sample_s, compiles=True)
                    outputs["flex"] = timers["flex"].first()
            except Exception as exc:  # a compile failure is a result to report, not a crash
                timers.pop("flex", None)
                row["flex"] = {"skipped": f"FlexAttention failed: {type(exc).__name__}: {exc}"[:400]}
        else:
            row["flex"] = {"skipped": reason}
    else:
        row["flex"] = {"skipped": "not requested (--flex)"}

    step("check")
    rows = check_rows(Lq, cfg.check_rows)
    row["check"] = verify(q, k, v, outputs, rows, _allowed(case, cfg, rows, Lq, L)) if outputs else None
    del outputs

    summaries = sample_in_turns(timers, cfg.repeats, step)
    for method, timer in timers.items():
        row[method] = summaries[method]
        if method == "flex":
            row["flex"]["block_mask_s"] = block_mask_s
            row["flex"]["compile_s"] = max(0.0, timer.first_call_s - row["flex"]["seconds"])
        previous[method] = (L, row[method]["seconds"])
    t_qkv = row["qkv"].get("seconds")
    for peer in ("sdpa", "flex"):
        t = row[peer].get("seconds")
        row[f"{peer}_over_qkv"] = t / t_qkv if t and t_qkv else None
    return row


def _auto_choice(q, k, v, kwargs) -> str:
    """The backend `auto` runs for these arguments (for the table), or 'auto' if unknown."""
    try:
        from ..core import choose_backend
        from ..core.spec import build_spec

        return choose_backend(build_spec(q, k, v, **kwargs), q, False)
    except Exception:  # an internal detail changed: the measurement itself is unaffected
        return "auto"


def flex_probe() -> Optional[str]:
    """None if compiled FlexAttention runs here, else why not (one tiny compile)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:
        return f"FlexAttention is not in this torch ({torch.__version__}): {exc}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._dynamo.reset()
            q = torch.randn(1, 1, 128, 16)
            torch.compile(flex_attention, dynamic=False)(q, q, q)
    except Exception as exc:
        return f"torch.compile cannot compile FlexAttention here: {type(exc).__name__}: {str(exc)[:300]}"
    return None

