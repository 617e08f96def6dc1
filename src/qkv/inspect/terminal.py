"""Terminal rendering of an explanation: compact tables with a heat strip.

Without colour (a pipe, a file, NO_COLOR set) the strip is drawn with block characters
" ▁▂▃▄▅▆▇█"; with colour, each cell's background also shades with its weight.
"""

from __future__ import annotations

from typing import Optional

import torch

from .analysis import aggregate as _aggregate

_BLOCKS = " ▁▂▃▄▅▆▇█"


def _strip(row: list[float]) -> str:
    top = max(row) if row and max(row) > 0 else 1.0
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int(round(x / top * (len(_BLOCKS) - 1))))] for x in row)


def _cell(x: float, top: float, width: int, color: bool, digits: int) -> str:
    text = f"{x:.{digits}f}".rjust(width)
    if not color:
        return text
    level = 0 if top <= 0 else x / top
    shade = 232 + int(round(level * 23))  # the 24-step grey ramp of 256-colour terminals
    fg = 16 if level > 0.55 else 255
    return f"\x1b[48;5;{shade}m\x1b[38;5;{fg}m{text}\x1b[0m"


def _label(s: str, width: int) -> str:
    return (s if len(s) <= width else s[: width - 1] + "…").rjust(width)


def layer_notes(result) -> list[str]:
    """What each recorded layer adds to plain attention, as short texts ("" for nothing): its
    sliding window ("window (3, 0)"; "global" beside windowed layers) and score_mod."""
    infos = result.layer_attention()
    windowed = any(info["window"] is not None for info in infos)
    notes = []
    for info in infos:
        parts = []
        if windowed:
            w = info["window"]
            parts.append("global" if w is None else "window ({}, {})".format(*("-" if x is None else x for x in w)))
        if info["score_mod"]:
            parts.append(info["score_mod"])
        notes.append(", ".join(parts))
    return notes


_LEGEND = ("window (left, right): each token sees at most `left` keys before it and `right` after it; "
           "global: no window")


def render_focus(result, focus, *, method: str = "raw", level: str = "word", hide_special: bool = False,
                 layer: Optional[int] = None, head: Optional[int] = None, color: bool = False,
                 top_heads: int = 5, aggregate: str = "mean") -> str:
    """The focus word's attention per layer (mean or max over heads, or one head), and its sharpest heads."""
    labels = result.labels(level, hide_special)
    rows = result.focus_rows(focus, method, level, hide_special)  # (L, H, n)
    index = result.focus_index(focus, level)
    focus_label = result.units(level)[0][index]
    if head is not None:
        if method == "rollout":
            raise ValueError("rollout averages the heads; drop --head or use --method raw")
        h = result._head_position(result.records[0], head)
        per_layer, what = rows[:, h], f"head {head}"
    else:
        per_layer = _aggregate(rows, dim=1, how=aggregate)
        what = "rollout of the mean over heads" if method == "rollout" else f"{aggregate} over heads"
    layers = range(per_layer.shape[0]) if layer is None else [layer]
    if layer is not None:
        result._record(layer)
    width = max(6, min(10, max(len(lab) for lab in labels) + 1))
    digits = 2 if method != "value-norm" else 1
    method_name = {"raw": "attention weights", "rollout": "attention rollout",
                   "value-norm": "value-weighted norms ||a f(v)||"}[method]
    lines = [
        f"{result.text!r} on {result.model_name}: {result.num_layers} layers x {result.num_heads} heads, "
        f"{method_name}, {level} level" + (", special tokens hidden" if hide_special else ""),
        f"from {focus_label!r} to each {level} ({what})",
        "",
        "layer " + "".join(_label(lab, width) for lab in labels) + "  strip",
    ]
    notes = layer_notes(result)
    for lay in layers:
        row = per_layer[lay].tolist()
        top = max(row) if row else 0.0
        note = f"  {notes[lay]}" if notes[lay] else ""
        lines.append(f"{lay:>5} " + "".join(_cell(x, top, width, color, digits) for x in row) + "  " + _strip(row)
                     + note)
    if any("window" in note for note in notes):
        lines.append(_LEGEND)
    if method == "raw" and head is None and top_heads:
        lines += ["", f"sharpest heads for {focus_label!r} (lowest entropy of its row):"]
        for item in result.sharpest_heads(focus, top_heads, level, hide_special):
            if layer is not None and item["layer"] != layer:
                continue
            tops = " · ".join(f"{t['label']} {t['weight']:.2f}" for t in item["top"])
            lines.append(f"  layer {item['layer']} head {item['head']:<3} entropy {item['entropy']:.2f} nats   {tops}")
    return "\n".join(lines)


def render_overview(result, *, method: str = "raw", level: str = "word", hide_special: bool = False,
                    layer: Optional[int] = None, head: Optional[int] = None, color: bool = False,
                    aggregate: str = "mean") -> str:
    """Without a focus word: for one layer (default the last), each word's row as a table."""
    if head is not None and method == "rollout":
        raise ValueError("rollout averages the heads; drop --head or use --method raw")
    maps = result.maps(method, level, hide_special)  # (L, H, n, n)
    labels = result.labels(level, hide_special)
    lay = maps.shape[0] - 1 if layer is None else layer
    result._record(lay)
    if head is not None:
        grid, what = maps[lay, result._head_position(result.records[lay], head)], f"head {head}"
    else:
        grid, what = _aggregate(maps[lay], dim=0, how=aggregate), f"{aggregate} over heads"
    width = max(6, min(10, max(len(lab) for lab in labels) + 1))
    digits = 2 if method != "value-norm" else 1
    note = layer_notes(result)[lay]
    lines = [f"{result.text!r} on {result.model_name}: layer {lay}, {what}, {method}, {level} level; "
             "rows attend to columns" + (f"; attention: {note}" if note else ""),
             "", " " * width + "".join(_label(lab, width) for lab in labels) + "  strip"]
    for i, lab in enumerate(labels):
        row = grid[i].tolist()
        top = max(row) if row else 0.0
        lines.append(_label(lab, width) + "".join(_cell(x, top, width, color, digits) for x in row)
                     + "  " + _strip(row))
    ent = result.entropy("token")
    lines += ["", "entropy per head (nats, low = focused), layers x heads:"]
    for lay_i in range(ent.shape[0]):
        lines.append(f"{lay_i:>5} " + " ".join(f"{x:4.2f}" for x in ent[lay_i].tolist()))
    return "\n".join(lines)


def render_compare(a, b, comparison: dict, focus, level: str = "word") -> str:
    """Jensen-Shannon divergence of the focus rows per layer and head between two sentences."""
    jsd = comparison["jsd"]  # (L, H)
    label = a.units(level)[0][a.focus_index(focus, level)]
    lines = ["", f"comparison with {b.text!r}: Jensen-Shannon divergence (bits) of {label!r}'s row, layers x heads"]
    for lay in range(jsd.shape[0]):
        lines.append(f"{lay:>5} " + " ".join(f"{x:4.2f}" for x in jsd[lay].tolist())
                     + f"   max {jsd[lay].max().item():.2f}")
    diff = comparison["difference"].abs().amax(dim=(-1, -2))  # (L, H)
    flat = int(torch.argmax(diff))
    lay, head = divmod(flat, diff.shape[1])
    lines.append(f"largest change in any weight: layer {lay} head {head} ({diff[lay, head].item():.2f})")
    return "\n".join(lines)


def render_alignment(result, *, level: str = "word", layer: Optional[int] = None, head: Optional[int] = None,
                     color: bool = False) -> str:
    """Encoder-decoder models: each cross-attention layer as target words (rows) over source words
    (columns), mean over heads or one head; the strongest source word of each row is marked."""
    source, target, cross = result.cross_maps(level)  # (C, H, t, s)
    layers = result.cross_layers
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"layer {layer} is not a cross-attention layer; those are {layers}")
        picks = [layers.index(layer)]
    else:
        picks = list(range(len(layers)))
    h = None if head is None else result._head_position(result.records[layers[0]], head)
    width = max(6, min(10, max(len(lab) for lab in source + target) + 1))
    lines = [f"{result.text!r} on {result.model_name}: cross-attention, target words (rows, in the order the "
             f"decoder wrote them) over source words (columns); * = strongest"]
    for c in picks:
        grid = cross[c].mean(dim=0) if h is None else cross[c, h]  # (t, s)
        what = "mean over heads" if h is None else f"head {head}"
        lines += ["", f"layer {layers[c]} ({result.records[layers[c]].name}), {what}",
                  " " * width + "".join(_label(lab, width) for lab in source)]
        for i, lab in enumerate(target):
            row = grid[i].tolist()
            top = max(row) if row else 0.0
            best = max(range(len(row)), key=row.__getitem__) if row else -1
            cells = "".join(_cell(x, top, width - 1, color, 2) + ("*" if j == best else " ") for j, x in enumerate(row))
            lines.append(_label(lab, width) + cells)
    return "\n".join(lines)
