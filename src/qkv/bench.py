"""`qkv bench`: the attention core against torch SDPA and FlexAttention, in one run.

Cases (B, H query heads, D head size, length L; `kv_heads` for the grouped cases):

- ``dense``   non-causal self-attention, Lq = Lk = L, Hq = Hkv = H.
- ``causal``  causal self-attention (Vaswani et al., 2017).
- ``window``  causal sliding window: each query sees itself and the `window` keys before it
              (Mistral 7B, Jiang et al., 2023), through ``qkv.attention(causal=True, window=w)``.
- ``gqa``     causal grouped-query attention, Hkv = kv_heads (Ainslie et al., 2023, "GQA").
- ``decode``  one new query (Lq = 1) against a KV cache of L keys, Hkv = kv_heads.

Peers, measured in the same run on the same inputs: torch's ``F.scaled_dot_product_attention``
(``is_causal``, ``enable_gqa=True`` for the grouped cases, a dense bool mask for the window,
built outside the timing), and with ``flex=True`` FlexAttention (Dong et al., 2024):
``torch.compile(flex_attention)`` with a ``create_block_mask`` of the same mask function.

Timing: a first call (for Flex it includes compilation: reported apart as ``first_call_s``),
then ``repeats`` samples per method, the methods interleaved so that a burst of load on a
shared machine hits all of them; a sample repeats a fast call until it lasts at least
`min_sample_s` and is divided by the count. The table shows the best sample (the least noisy
estimate on a shared machine); the JSON keeps every sample.

Verification: every qkv result is checked before it is timed. On up to `check_rows` query
rows spread over the sequence, it is compared with ``qkv.reference_attention`` in float64
under the tolerance rule of the test suite (tests/tolerance.py, after flash-attention's
tests): its error must be at most twice the error of the plain reference run in the same
dtype, plus a rounding term. Where SDPA runs, the largest difference from its full output is
reported too. A result outside the rule makes `qkv bench` exit with status 1.

Skipped peers (shown as "-", with the reason in the JSON): a peer is skipped where it would
need more than `max_memory_gib` beyond the inputs (SDPA with the window's dense bool mask:
about 10 bytes per query-key pair on torch 2.13's CPU kernel, the mask and its float copy;
Flex's ``create_block_mask`` evaluates the whole Lq x Lk grid, about 10 bytes per pair), or
where one call would take longer than `max_seconds`, predicted from the same method at the
previous length by its growth (L^2 for SDPA and for Flex without a sparse mask, L for decode
and for Flex on the window). qkv itself always runs at every length asked for.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional, TextIO

import torch
import torch.nn.functional as F

from ._files import write_bytes, write_text

FORMAT = "qkv.bench/1"
CASES = ("dense", "causal", "window", "gqa", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("qkv", "sdpa", "flex")
PNG_SIZE = (1400, 700)  # pixels of the picture (width, height)
# Working memory per query-key pair of the peers that materialise an Lq x Lk grid, measured
# on torch 2.13's CPU kernels (SDPA with a bool mask; create_block_mask of a mask function).
SDPA_MASK_BYTES_PER_PAIR = 10
FLEX_MASK_BYTES_PER_PAIR = 10
# Absolute term of the tolerance rule, in units of the dtype's epsilon (tests/tolerance.py).
_ULPS = {torch.float64: 64.0, torch.float32: 8.0}
FWD_FACTOR = 2.0

_DESCRIBE = {
    "dense": "non-causal, Hq = Hkv = H",
    "causal": "causal, Hq = Hkv = H",
    "window": "causal sliding window of {window} keys before each query, Hq = Hkv = H",
    "gqa": "causal grouped-query, Hq = H, Hkv = {kv_heads}",
    "decode": "Lq = 1 against a cache of L keys, Hq = H, Hkv = {kv_heads}",
}


@dataclass(frozen=True)
class BenchConfig:
    """What `qkv bench` measures; `validate()` explains any bad value."""

    cases: tuple = CASES                      # any of CASES, in the order to run
    dtypes: tuple = ("float32", "bfloat16")   # any of DTYPES
    lengths: tuple = (1024, 4096, 16384)      # L of the self-attention cases
    decode_lengths: Optional[tuple] = None    # cache lengths of `decode`; None = `lengths`
    batch: int = 1                            # B
    heads: int = 8                            # H: query heads
    kv_heads: Optional[int] = None            # key/value heads of gqa and decode; None = H // 4
    dim: int = 64                             # D: head size (of queries, keys and values)
    window: int = 256                         # keys before each query in `window`
    repeats: int = 3                          # timed samples per method
    min_sample_s: float = 0.05                # a sample repeats a fast call until this long
    backend: str = "auto"                     # qkv.attention(..., backend=)
    flex: bool = False                        # also time compiled FlexAttention
    max_seconds: float = 60.0                 # skip a peer whose call would take longer
    max_memory_gib: float = 4.0               # skip a peer that would need more memory
    check_rows: int = 128                     # query rows compared with the float64 reference
    seed: int = 0                             # inputs are a function of seed, case, dtype, L
    threads: Optional[int] = None             # torch threads; None = torch's default

    @property
    def Hkv(self) -> int:
        return self.kv_heads if self.kv_heads is not None else max(1, self.heads // 4)

    def lengths_of(self, case: str) -> tuple:
        if case == "decode" and self.decode_lengths is not None:
            return tuple(self.decode_lengths)
        return tuple(self.lengths)

    def validate(self) -> "BenchConfig":
        for c in self.cases:
            if c not in CASES:
                raise ValueError(f"unknown case {c!r}; choose from {', '.join(CASES)}")
        if not self.cases:
            raise ValueError(f"no cases given; choose from {', '.join(CASES)}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
        if not self.dtypes:
            raise ValueError(f"no dtypes given; choose from {', '.join(DTYPES)}")
        for name in ("cases", "dtypes", "lengths", "decode_lengths"):
            values = list(getattr(self, name) or ())
            twice = sorted({x for x in values if values.count(x) > 1}, key=str)
            if twice:
                raise ValueError(f"--{name.replace('_', '-')}: {', '.join(map(str, twice))} given more than once")
        for name in ("lengths", "decode_lengths"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise ValueError(f"--{name.replace('_', '-')} needs at least one length")
            for n in values:
                if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                    raise ValueError(f"--{name.replace('_', '-')}: {n!r} is not a positive length; "
                                     "give whole numbers of tokens, e.g. 1024 4096")
        for name, flag in (("batch", "--batch"), ("heads", "--heads"), ("dim", "--dim"),
                           ("repeats", "--repeats"), ("check_rows", "--check-rows")):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{flag} must be a positive whole number; got {n!r}")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise ValueError(f"--kv-heads {self.kv_heads} must be positive and divide --heads {self.heads} "
                             "(grouped-query attention shares each key/value head among Hq/Hkv query heads)")
        if self.window < 0:
            raise ValueError(f"--window must be 0 or more keys; got {self.window}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be a positive number of threads; got {self.threads}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0; got {self.seed}")
        if not self.max_seconds > 0 or not self.max_memory_gib > 0 or self.min_sample_s < 0:
            raise ValueError(f"--max-seconds and --max-memory-gib must be positive; got {self.max_seconds} "
                             f"and {self.max_memory_gib}")
        from .core import backends

        if self.backend != "auto" and self.backend not in backends():
            raise ValueError(f"unknown backend {self.backend!r}; choose one of "
                             + ", ".join(repr(b) for b in ["auto"] + backends()))
        return self


@dataclass
class BenchResult:
    """Everything one run measured: `to_dict()` is the JSON document."""

    config: BenchConfig
    rows: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    flex: dict = field(default_factory=dict)
    command: str = ""
    argv: list = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every qkv result passed its check against the reference."""
        return all(r["check"]["ok"] for r in self.rows if r["check"] is not None)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "command": self.command,
            "argv": self.argv,
            "started": self.started,
            "seconds": self.seconds,
            "qkv": _qkv_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": self.machine.get("threads"),
            "machine": self.machine,
            "config": dict(asdict(self.config), kv_heads=self.config.Hkv,
                           decode_lengths=list(self.config.lengths_of("decode"))),
            "flex": self.flex,
            "notes": self.notes,
            "ok": self.ok,
            "rows": self.rows,
            "growth": growth(self.rows),
        }


# ----------------------------------------------------------------------------- the cases
def _inputs(cfg: BenchConfig, case: str, dtype_name: str, L: int):
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


# ----------------------------------------------------------------------------- timing
class _Timer:
    """Samples of one method's calls; see the module docstring for the method."""

    def __init__(self, fn: Callable[[], torch.Tensor], min_sample_s: float, *, compiles: bool = False):
        self.fn, self.min_sample_s, self.compiles = fn, min_sample_s, compiles
        self.samples: list[float] = []
        self.calls = 1

    def first(self) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.fn()
        self.first_call_s = time.perf_counter() - t0
        # a fast call (or one whose first call was mostly compilation): time one more to size the samples
        if self.compiles or self.first_call_s < self.min_sample_s:
            t0 = time.perf_counter()
            self.fn()
            once = max(time.perf_counter() - t0, 1e-7)
            self.calls = max(1, min(10_000, math.ceil(self.min_sample_s / once)))
        return out

    def sample(self) -> None:
        fn, n = self.fn, self.calls
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.samples.append((time.perf_counter() - t0) / n)

    def summary(self) -> dict:
        s = sorted(self.samples)
        return {"seconds": s[0], "median_s": s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2,
                "samples_s": self.samples, "calls_per_sample": self.calls, "first_call_s": self.first_call_s}


# ----------------------------------------------------------------------------- verification
def _rounding_term(exact: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    return _ULPS.get(dtype, 1.0) * torch.finfo(dtype).eps * scale


def _check_rows(Lq: int, n: int) -> torch.Tensor:
    """Up to n query rows spread evenly over 0..Lq-1, first and last included."""
    return torch.linspace(0, Lq - 1, min(n, Lq)).round().long().unique()


def _verify(case: str, cfg: BenchConfig, q, k, v, outputs: dict) -> dict:
    """Errors of each method's output against float64 on sampled rows; qkv's against the rule."""
    from . import reference_attention

    Lq, Lk = q.shape[2], k.shape[2]
    rows = _check_rows(Lq, cfg.check_rows)
    allowed = _allowed(case, cfg, rows, Lq, Lk)
    mask = None if allowed is None else allowed[None, None]  # (1, 1, rows, Lk)
    q_rows = q[:, :, rows]  # (B, H, rows, D)
    exact = reference_attention(q_rows.double(), k.double(), v.double(), mask=mask)  # (B, H, rows, D)
    plain = reference_attention(q_rows, k, v, mask=mask)

    def err(out: torch.Tensor) -> float:
        return (out[:, :, rows].double() - exact).abs().max().item()

    plain_err = (plain.double() - exact).abs().max().item()
    bound = FWD_FACTOR * plain_err + _rounding_term(exact, q.dtype)
    check = {"rows_checked": int(rows.numel()), "exact_max_abs": exact.abs().max().item(),
             "plain_max_err": plain_err, "bound": bound}
    for method, out in outputs.items():
        check[f"{method}_max_err"] = err(out)
        if method != "qkv":
            check[f"{method}_within_rule"] = bool(check[f"{method}_max_err"] <= bound)
    if "qkv" in outputs:
        check["ok"] = bool(math.isfinite(check["qkv_max_err"]) and check["qkv_max_err"] <= bound)
        if "sdpa" in outputs:
            check["qkv_vs_sdpa_max_diff"] = (outputs["qkv"].double() - outputs["sdpa"].double()).abs().max().item()
    else:
        check["ok"] = True  # nothing of qkv's to check (its backend refused the case)
    return check


# ----------------------------------------------------------------------------- one cell
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
    t0 = time.perf_counter()
    bm = None if mask_mod is None else create_block_mask(mask_mod, None, None, q.shape[2], L, device="cpu")
    block_mask_s = time.perf_counter() - t0
    gqa = k.shape[1] != q.shape[1]

    def call():
        return compiled(q, k, v, block_mask=bm, enable_gqa=gqa)

    return call, block_mask_s


def _run_cell(case: str, dtype_name: str, L: int, cfg: BenchConfig, history: dict, flex_state: dict,
              step: Callable[[str], None]) -> dict:
    q, k, v = _inputs(cfg, case, dtype_name, L)
    B, H, Lq, D = q.shape
    row = {"case": case, "dtype": dtype_name, "L": L, "B": B, "Hq": H, "Hkv": k.shape[1], "Lq": Lq, "Lk": L,
           "D": D, "qkv_backend": cfg.backend, "load_average": (_loadavg() or [None])[0]}
    previous = history.setdefault((case, dtype_name), {})
    timers: dict[str, _Timer] = {}
    outputs: dict[str, torch.Tensor] = {}
    import qkv as _qkv

    kwargs = _qkv_kwargs(case, cfg)
    if cfg.backend == "auto":
        row["qkv_backend"] = _auto_choice(q, k, v, kwargs)
    step("qkv")
    timers["qkv"] = _Timer(lambda: _qkv.attention(q, k, v, backend=cfg.backend, **kwargs), cfg.min_sample_s)
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
            rows = torch.arange(Lq)
            dense = _allowed(case, cfg, rows, Lq, L)  # (Lq, L) bool, built outside the timing
            timers["sdpa"] = _Timer(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), cfg.min_sample_s)
        else:
            causal = case in ("causal", "gqa")
            timers["sdpa"] = _Timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
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
                    timers["flex"] = _Timer(call, cfg.min_sample_s, compiles=True)
                    outputs["flex"] = timers["flex"].first()
                    timers["flex"].block_mask_s = block_mask_s
            except Exception as exc:  # a compile failure is a result to report, not a crash
                timers.pop("flex", None)
                row["flex"] = {"skipped": f"FlexAttention failed: {type(exc).__name__}: {exc}"[:400]}
        else:
            row["flex"] = {"skipped": reason}
    else:
        row["flex"] = {"skipped": "not requested (--flex)"}

    step("check")
    row["check"] = _verify(case, cfg, q, k, v, outputs) if outputs else None
    del outputs

    for r in range(cfg.repeats):
        for method, timer in timers.items():
            step(f"{method} {r + 1}/{cfg.repeats}")
            timer.sample()
    for method, timer in timers.items():
        row[method] = timer.summary()
        if method == "flex":
            row["flex"]["block_mask_s"] = timer.block_mask_s
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
        from .core import choose_backend
        from .core._spec import build_spec

        return choose_backend(build_spec(q, k, v, **kwargs), q, False)
    except Exception:  # an internal detail changed: the measurement itself is unaffected
        return "auto"


def _flex_probe() -> Optional[str]:
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


# ----------------------------------------------------------------------------- the run
class Progress:
    """A one-line progress bar on a text stream, rewritten with '\\r' (plain text, no colour)."""

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.done, self.start, self.width = 0, time.perf_counter(), 0
        self.label = ""

    def show(self, label: Optional[str] = None) -> None:
        if label is not None:
            self.label = label
        if not self.enabled:
            return
        bar_width = 24
        filled = int(bar_width * self.done / max(1, self.total))
        elapsed = int(time.perf_counter() - self.start)
        line = (f"qkv bench {self.done:>3}/{self.total} [{'#' * filled}{'-' * (bar_width - filled)}] "
                f"{elapsed // 60}:{elapsed % 60:02d} {self.label}")[:119]
        self.stream.write("\r" + line.ljust(self.width))
        self.width = len(line)
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1
        self.show()

    def close(self) -> None:
        if self.enabled:
            self.show("done")
            self.stream.write("\n")
            self.stream.flush()


def cells(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """(case, dtype, L) in the order they run: one row of the table each."""
    return [(case, d, L) for case in cfg.cases for d in cfg.dtypes for L in sorted(cfg.lengths_of(case))]


def command_line(cfg: BenchConfig) -> str:
    """The `qkv bench` command that measures exactly `cfg`, every option spelled out."""
    words = ["qkv", "bench", "--cases", *cfg.cases, "--dtypes", *cfg.dtypes,
             "--lengths", *map(str, cfg.lengths)]
    if cfg.decode_lengths is not None:
        words += ["--decode-lengths", *map(str, cfg.decode_lengths)]
    words += ["--batch", str(cfg.batch), "--heads", str(cfg.heads), "--kv-heads", str(cfg.Hkv),
              "--dim", str(cfg.dim), "--window", str(cfg.window), "--repeats", str(cfg.repeats),
              "--backend", cfg.backend]
    if cfg.threads is not None:
        words += ["--threads", str(cfg.threads)]
    if cfg.flex:
        words.append("--flex")
    words += ["--max-seconds", f"{cfg.max_seconds:g}", "--max-memory-gib", f"{cfg.max_memory_gib:g}",
              "--check-rows", str(cfg.check_rows), "--seed", str(cfg.seed)]
    return shlex.join(words)


def run(cfg: BenchConfig, *, progress: bool = False, stream: Optional[TextIO] = None) -> BenchResult:
    """Run the suite of `cfg` and return every measurement.

    Args:
        cfg: what to measure (validated here).
        progress: draw a progress bar on `stream` (default sys.stderr).
        stream: where the progress bar and notes go; never stdout's table.
    """
    cfg.validate()
    stream = stream or sys.stderr
    result = BenchResult(config=cfg, command=command_line(cfg), argv=list(sys.argv),
                         started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    try:
        result.machine = machine_info()
        load = result.machine.get("load_average_start")
        cpus = result.machine.get("logical_cpus") or 1
        if load is not None and load[0] > 0.75 * cpus:
            note = (f"the machine is busy (load average {load[0]:.1f} on {cpus} logical CPUs): "
                    "times are noisy; ratios within one run are steadier")
            result.notes.append(note)
            print(f"qkv bench: note: {note}", file=stream)
        todo = cells(cfg)
        bar = Progress(len(todo), stream=stream, enabled=progress)
        flex_state: dict = {}
        if cfg.flex:
            bar.show("checking torch.compile for FlexAttention")
            reason = _flex_probe()
            result.flex = {"requested": True, "available": reason is None}
            if reason is not None:
                flex_state["unavailable"] = f"skipped: {reason}"
                result.flex["reason"] = reason
                result.notes.append(f"FlexAttention skipped: {reason}")
        else:
            result.flex = {"requested": False}
        history: dict = {}
        with torch.inference_mode():
            for case, dtype_name, L in todo:
                where = f"{case} {dtype_name} L={L}"
                result.rows.append(_run_cell(case, dtype_name, L, cfg, history, flex_state,
                                             lambda what: bar.show(f"{where}: {what}")))
                bar.advance()
        bar.close()
        result.machine["load_average_end"] = _loadavg()
    finally:
        torch.set_num_threads(old_threads)
        if cfg.flex:
            torch._dynamo.reset()  # free the compiled kernels
    result.seconds = time.perf_counter() - start
    return result


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "system": platform.system(), "logical_cpus": os.cpu_count(),
            "memory_bytes": mem, "threads": torch.get_num_threads(), "load_average_start": _loadavg()}


def _qkv_version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- output
def growth(rows: list) -> list:
    """Least-squares slope of log(time) on log(L) per case, dtype and method: 1 linear, 2 quadratic."""
    series: dict[tuple, list] = {}
    for r in rows:
        for m in METHODS:
            t = r.get(m, {}).get("seconds")
            if t:
                series.setdefault((r["case"], r["dtype"], m), []).append((r["L"], t))
    out = []
    for (case, dtype, m), pts in series.items():
        if len({L for L, _ in pts}) < 2:
            continue
        xs = [math.log(L) for L, _ in pts]
        ys = [math.log(t) for _, t in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out.append({"case": case, "dtype": dtype, "method": m, "exponent": slope,
                    "from_L": min(L for L, _ in pts), "to_L": max(L for L, _ in pts)})
    return out


def _ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(result: BenchResult) -> str:
    """The Markdown report: a header, one table row per (case, dtype, L), growth exponents, notes."""
    cfg = result.config
    m = result.machine
    flex = cfg.flex
    lines = [
        f"qkv bench: B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, Hkv={cfg.Hkv} (gqa, decode), window={cfg.window}; "
        f"best of {cfg.repeats}; {m.get('threads')} threads, torch {torch.__version__}, {m.get('cpu')}",
        "ratio = peer time / qkv time (above 1: qkv is faster); \"-\" = not run (reason in the JSON); "
        "err = qkv's largest error against float64 on the checked rows",
        "",
    ]
    head = "| case | dtype | L | qkv | qkv backend | SDPA | SDPA/qkv |"
    rule = "|---|---|---:|---:|---|---:|---:|"
    if flex:
        head += " Flex | Flex/qkv | Flex 1st call (compile) |"
        rule += "---:|---:|---:|"
    head += " err | check |"
    rule += "---:|---|"
    lines += [head, rule]
    for r in result.rows:
        g = lambda method, key="seconds": r.get(method, {}).get(key)  # noqa: E731
        check = r["check"] or {}
        cells_ = [r["case"], r["dtype"], str(r["L"]), _ms(g("qkv")), r["qkv_backend"], _ms(g("sdpa")),
                  _ratio(r.get("sdpa_over_qkv"))]
        if flex:
            first = g("flex", "first_call_s")
            cells_ += [_ms(g("flex")), _ratio(r.get("flex_over_qkv")), "-" if first is None else f"{first:.1f} s"]
        err = check.get("qkv_max_err")
        cells_ += ["-" if err is None else f"{err:.1e}", "ok" if check.get("ok", True) else "FAILED"]
        lines.append("| " + " | ".join(cells_) + " |")
    g_rows = growth(result.rows)
    if g_rows:
        lines += ["", "Growth of time with L (slope on log-log axes: 1 = linear, 2 = quadratic):", ""]
        methods = [x for x in METHODS if any(gr["method"] == x for gr in g_rows)]
        names = {"qkv": "qkv", "sdpa": "SDPA", "flex": "Flex"}
        lines += ["| case | dtype | L | " + " | ".join(names[x] for x in methods) + " |",
                  "|---|---|---|" + "---:|" * len(methods)]
        keyed = {(gr["case"], gr["dtype"], gr["method"]): gr for gr in g_rows}
        for case in cfg.cases:
            for d in cfg.dtypes:
                if (case, d, "qkv") not in keyed:
                    continue
                gq = keyed[(case, d, "qkv")]
                vals = [keyed.get((case, d, x)) for x in methods]
                lines.append(f"| {case} | {d} | {gq['from_L']}-{gq['to_L']} | "
                             + " | ".join("-" if v is None else f"{v['exponent']:.2f}" for v in vals) + " |")
    skipped = sorted({f"{name}: {r[name]['skipped']}" for r in result.rows for name in METHODS
                      if "skipped" in r.get(name, {}) and not r[name]["skipped"].startswith("not requested")})
    notes = list(result.notes)
    loads = [r["load_average"] for r in result.rows if r.get("load_average") is not None]
    if loads:
        notes.append(f"load average (1 min) at the start of each row: {min(loads):.1f} to {max(loads):.1f} "
                     f"on {m.get('logical_cpus')} logical CPUs, this run's own threads included")
    if skipped:
        notes.append("not run: " + "; ".join(skipped))
    failed = [f"{r['case']} {r['dtype']} L={r['L']}" for r in result.rows if r["check"] and not r["check"]["ok"]]
    if failed:
        notes.append("qkv's result is outside the tolerance rule for: " + ", ".join(failed))
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def write_json(result: BenchResult, path: str) -> None:
    """The whole run as JSON (format qkv.bench/1) to `path` (str), through qkv's one writer
    (`qkv._files`: whole or not at all; a symbolic link is written through, a non-regular
    target refused with a FileWriteError)."""
    write_text(path, json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n", what="the bench JSON")


def require_matplotlib() -> None:
    """Raise ImportError with the fix when matplotlib is missing."""
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise ImportError("qkv bench --png needs matplotlib: pip install 'qkv[viz]'") from None


def _length_label(x: float, _pos=None) -> str:
    """Tick label of a length: 512, 1k, 64k, 1M."""
    n = int(round(x))
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def write_png(result: BenchResult, path: str) -> None:
    """Time against length on log-log axes, one panel per dtype, one line per case and method,
    with dashed guides growing as L and L^2. PNG_SIZE pixels, written to `path` (str) as
    `write_json` writes."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    cfg = result.config
    dpi = 100
    fig = Figure(figsize=(PNG_SIZE[0] / dpi, PNG_SIZE[1] / dpi), dpi=dpi)
    axes = fig.subplots(1, len(cfg.dtypes), sharey=True, squeeze=False)[0]
    colors = dict(zip(CASES, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]))
    styles = {"qkv": ("-", "o"), "sdpa": ("--", "s"), "flex": (":", "^")}
    names = {"qkv": "qkv", "sdpa": "SDPA", "flex": "Flex"}
    handles = {}
    for ax, d in zip(axes, cfg.dtypes):
        pts_all = []
        for case in cfg.cases:
            for m in METHODS:
                pts = [(r["L"], r[m]["seconds"]) for r in result.rows
                       if r["case"] == case and r["dtype"] == d and "seconds" in r.get(m, {})]
                if not pts:
                    continue
                pts_all += pts
                ls, marker = styles[m]
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls, marker=marker,
                                  color=colors[case], markersize=4, linewidth=1.6)
                handles.setdefault(f"{case} {names[m]}", line)
        if pts_all:
            Ls = sorted({p[0] for p in pts_all})
            lo, hi = Ls[0], Ls[-1]
            if hi == lo:
                lo, hi = lo / 2, hi * 2
            # the guides pass through the geometric mean of all points at their mean log L
            gx = math.exp(sum(math.log(p[0]) for p in pts_all) / len(pts_all))
            gy = math.exp(sum(math.log(p[1]) for p in pts_all) / len(pts_all))
            for power, label in ((1, "∝ L (linear)"), (2, "∝ L² (quadratic)")):
                xs = [lo, hi]
                ys = [gy * (x / gx) ** power for x in xs]
                (g,) = ax.plot(xs, ys, linestyle=(0, (6, 4)), color="grey" if power == 1 else "black",
                               linewidth=1.0, alpha=0.6)
                handles.setdefault(label, g)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_length_label))
        ax.set_yscale("log")
        ax.set_title(d)
        ax.set_xlabel("L (tokens; cache length for decode)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("seconds per call (best sample)")
    fig.suptitle(f"qkv bench: B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, Hkv={cfg.Hkv} (gqa, decode), "
                 f"window={cfg.window}; torch {torch.__version__}, {result.machine.get('threads')} threads")
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.2, wspace=0.08)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes(path, buf.getvalue(), what="the bench PNG")
