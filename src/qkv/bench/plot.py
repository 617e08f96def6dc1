"""The picture of `qkv bench`: time against length on log-log axes (matplotlib, optional)."""

from __future__ import annotations

import io
import math

import torch

from .._files import write_bytes
from .config import CASES, METHODS
from .report import BenchResult

PNG_SIZE = (1400, 700)  # pixels of the picture (width, height)


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
