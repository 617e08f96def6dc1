"""The results of `qkv bench`: `BenchResult` (the JSON document, format qkv.bench/1), the
machine they were measured on, growth exponents, and the Markdown table."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .._files import write_text
from .config import FORMAT, METHODS, BenchConfig


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


def loadavg() -> Optional[list]:
    """The 1, 5 and 15 minute load averages, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _proc_value(path: str, key: str) -> Optional[str]:
    """The value of the first line `key ...: value` of a /proc file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name and the flags that decide attention kernels' speed (AVX-512, its bfloat16
    dot product, AMX), from /proc/cpuinfo; the platform's name where there is none."""
    model = _proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    flags = (_proc_value("/proc/cpuinfo", "flags") or "").split()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(shown) or 'no AVX-512'})"


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = _proc_value("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem = _proc_value("/proc/meminfo", "MemTotal:")  # "16318812 kB"
    return {"cpu": cpu, "machine": platform.machine(), "system": platform.system(), "logical_cpus": os.cpu_count(),
            "memory_bytes": int(mem.split()[0]) * 1024 if mem else None, "threads": torch.get_num_threads(),
            "load_average_start": loadavg()}


def _qkv_version() -> str:
    from .. import __version__

    return __version__


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
        g = lambda method, key="seconds", r=r: r.get(method, {}).get(key)  # noqa: E731
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
