"""Terminal rendering of an explanation: compact tables with a heat strip.

Without colour (a pipe, a file, NO_COLOR set) the strip is drawn with block characters
" ▁▂▃▄▅▆▇█"; with colour, each cell's background also shades with its weight.

Long inputs (more than SHORT_UNITS words, or tokens, whose table would be wider than the
terminal) get another layout, no line of which is wider than the terminal: per layer, the top-k
keys of the focus row with their positions, and a strip over the whole sequence, each cell the
max of its bucket of words (a sharp peak is not averaged away), with position ticks; without a
focus, the per-layer/head summaries (entropy, distance, sink), a minimap of the weight each word
receives, and the last word's top keys. Short inputs print the tables as they always have.

Image results (a vision transformer's class token and patches, `qkv.explain(image=...)`) print
as block-character heat maps over the patch grid (`render_image`): each patch two characters
shaded " ░▒▓█" by its weight over the grid's max, one grid per layer plus the attention rollout,
or per head of one layer, side by side as the width allows.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from typing import Optional, Sequence

import torch

from .analysis import aggregate as _aggregate
from .rows import TOP_K

_BLOCKS = " ▁▂▃▄▅▆▇█"
SHORT_UNITS = 32  # inputs of at most this many words (or tokens) always print the tables
MIN_WIDTH = 40  # the long layout never draws narrower than this, whatever the terminal says


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


def terminal_width(width: Optional[int] = None) -> int:
    """The columns to draw in: `width`, else the terminal's (shutil.get_terminal_size: COLUMNS, then
    the terminal, then 80), never under MIN_WIDTH."""
    columns = shutil.get_terminal_size((80, 24)).columns if width is None else int(width)
    return max(MIN_WIDTH, columns)


def is_long(n: int, table_width: int, width: int) -> bool:
    """Whether a table of `n` units, `table_width` characters wide, gets the long layout."""
    return n > SHORT_UNITS and table_width > width


def squeeze(row: Sequence[float], cells: int) -> tuple[list[float], int]:
    """row (n,) -> (at most `cells` values, b): the max of each run of b consecutive values, so
    that one sharp peak survives the downsampling (a mean would flatten it by b)."""
    n = len(row)
    cells = max(1, cells)
    if n <= cells:
        return [float(x) for x in row], 1
    b = -(-n // cells)  # ceil(n / cells): buckets of b values, the last one possibly shorter
    t = torch.as_tensor(list(row), dtype=torch.float64)
    pad = (-n) % b
    if pad:
        t = torch.cat([t, t.new_full((pad,), float("-inf"))])  # every bucket keeps >= 1 real value
    return t.view(-1, b).amax(dim=1).tolist(), b  # (ceil(n / b),)


def _ticks(n: int, b: int, cells: int) -> str:
    """A line of positions under a strip of `cells` cells, each holding b units: the first unit of
    a cell every ten or so columns, the last unit at the right end when it fits."""
    line = [" "] * cells
    free = 0  # the first column a new label may use
    step = 10
    for c in range(0, cells, step):
        text = f"{c * b}"
        if c >= free and c + len(text) <= cells:
            line[c:c + len(text)] = text
            free = c + len(text) + 1
    last = f"{n - 1}"
    start = cells - len(last)
    if start >= free and (cells - 1) * b <= n - 1:
        line[start:cells] = last
    return "".join(line).rstrip()


def _weight(x: float) -> str:
    """A weight in few characters: 3 decimals, or 2 significant digits below 0.0005."""
    return f"{x:.3f}" if x >= 0.0005 or x == 0 else f"{x:.1e}"


def _short_label(s: str, limit: int = 14) -> str:
    s = " ".join(str(s).split()) or "␣"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """text wrapped at spaces into lines of at most `width` characters; a no-break space (U+00A0)
    holds an item together, and is printed as a plain space."""
    lines = textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines] or [""]


def _items(row: torch.Tensor, labels: list[str], k: int) -> tuple[str, float, int]:
    """(the top k keys of row (n,) as "#pos label weight" items, the weight of the others, how many
    others are above 0)."""
    k = min(k, row.numel())
    values, index = row.topk(k)
    live = values > 0
    values, index = values[live], index[live]
    text = " · ".join(f"#{j}\u00a0{_short_label(labels[j]).replace(' ', chr(0xa0))}\u00a0{_weight(w)}"
                      for j, w in zip(index.tolist(), values.tolist()))
    rest = max(0.0, float(row.sum() - values.sum()))
    others = int((row > 0).sum()) - int(live.sum())
    return text, rest, others


def _layer_blocks(per_layer: torch.Tensor, layers, labels: list[str], notes: list[str], level: str, k: int,
                  width: int, digits_total: bool) -> list[str]:
    """Per layer: its top-k keys (wrapped), what they leave out, and a strip over the whole
    sequence with position ticks. per_layer (L, n): the row of each layer."""
    n = per_layer.shape[1]
    cells = width - 4
    lines = []
    for lay in layers:
        row = per_layer[lay]
        text, rest, others = _items(row, labels, k)
        kept = float(row.sum()) - rest
        note = f"   {notes[lay]}" if notes[lay] else ""
        what = (f"top {min(k, n)} hold {_weight(kept)}; the other {others:,} {level}s {_weight(rest)}" if digits_total
                else f"top {min(k, n)} shown; the other {others:,} {level}s sum to {rest:.1f}")
        lines += _wrap(f"layer {lay}   {what}{note}", width)
        lines += _wrap(text, width, "    ")
        squeezed, b = squeeze(row.tolist(), cells)
        lines.append(("    " + _strip(squeezed)).rstrip())  # trailing blanks: weights of 0
        lines.append(("    " + _ticks(n, b, len(squeezed))).rstrip())
    return lines


def _per_layer(result, rows: torch.Tensor, *, method: str, layer: Optional[int], head: Optional[int],
               aggregate: str) -> tuple[torch.Tensor, str, Sequence[int]]:
    """(rows (L, n) of one head or aggregated over heads, what they are, the layers to show) from the
    focus rows (L, H, n) of every layer and head."""
    if head is not None:
        h = result._head_position(result.records[0], head)
        per_layer, what = rows[:, h], f"head {head}"
    else:
        per_layer = _aggregate(rows, dim=1, how=aggregate)
        what = "rollout of the mean over heads" if method == "rollout" else f"{aggregate} over heads"
    if layer is not None:
        result._record(layer)
    return per_layer, what, range(per_layer.shape[0]) if layer is None else [layer]


def _strip_legend(n: int, cells: int, level: str) -> str:
    b = -(-n // max(1, cells)) if n > cells else 1
    return (f"strips: all {n:,} {level}s, each cell the largest weight of {b} {level}s, scaled to the layer's "
            f"largest; numbers under a strip: {level} positions")


def _long_focus(result, focus, rows: torch.Tensor, *, method: str, level: str, hide_special: bool,
                layer: Optional[int], head: Optional[int], top_heads: int, aggregate: str, top_k: int,
                width: int) -> str:
    """render_focus's layout for long inputs: rows (L, H, n) the focus row of every layer and head."""
    labels = result.labels(level, hide_special)
    all_labels, special, _ = result.units(level)
    index = result.focus_index(focus, level)
    shown = [i for i, s in enumerate(special) if not (hide_special and s)]
    at = shown.index(index)
    per_layer, what, layers = _per_layer(result, rows, method=method, layer=layer, head=head, aggregate=aggregate)
    n = len(labels)
    method_name = {"raw": "attention weights", "rollout": "attention rollout",
                   "value-norm": "value-weighted norms ||a f(v)||"}[method]
    lines = _wrap(f"{_quote(result.text)} on {result.model_name}: {result.num_layers} layers x {result.num_heads} "
                  f"heads, {method_name}, {level} level" + (", special tokens hidden" if hide_special else "")
                  + f"; {n:,} {level}s", width)
    lines += _wrap(f"from {all_labels[index]!r} (#{at}) to each {level} ({what}): the top {min(top_k, n)} "
                   f"{level}s of its row, largest first, as #position {level} weight", width)
    lines += _wrap(_strip_legend(n, width - 4, level), width)
    lines.append("")
    notes = layer_notes(result)
    lines += _layer_blocks(per_layer, layers, labels, notes, level, top_k, width, method != "value-norm")
    if any("window" in note for note in notes):
        lines += _wrap(_LEGEND, width)
    if method == "raw" and head is None and top_heads:
        lines += ["", *_wrap(f"sharpest heads for {all_labels[index]!r} (lowest entropy of its row):", width)]
        for item in result.sharpest_heads(focus, top_heads, level, hide_special):
            if layer is not None and item["layer"] != layer:
                continue
            h = result._head_position(result.records[item["layer"]], item["head"])
            text, _, _ = _items(rows[item["layer"], h], labels, 3)
            lines += _wrap(f"layer {item['layer']} head {item['head']:<3} entropy {item['entropy']:.2f} nats   "
                           f"{text}", width, "  ")
    return "\n".join(lines)


def _matrix(title: str, values: torch.Tensor, heads: list[int], names: list[str], fmt: str, layers,
            width: int) -> list[str]:
    """A layers x heads table under `title`, its heads split into groups that fit `width`."""
    cell = max(len(fmt.format(x)) for x in values.flatten().tolist()) + 1
    cell = max(cell, max(len(f"h{name}") for name in names) + 1)
    per_line = max(1, (width - 6) // cell)
    lines = _wrap(title, width)
    for start in range(0, len(heads), per_line):
        group = heads[start:start + per_line]
        lines.append("layer " + "".join(f"h{names[h]}".rjust(cell) for h in group))
        for lay in layers:
            lines.append(f"{lay:>5} " + "".join(fmt.format(values[lay, h]).rjust(cell) for h in group))
    return lines


def _long_overview(result, *, method: str, level: str, hide_special: bool, layer: Optional[int],
                   head: Optional[int], aggregate: str, top_k: int, width: int) -> str:
    """render_overview's layout for long inputs: per-layer/head summaries, a minimap, and the last
    word's top keys."""
    from .rows import default_rows, units

    u = units(result, level, hide_special)
    labels, n = u.shown_labels(), u.n
    summary = result.summaries(level, hide_special)
    layers = range(result.num_layers) if layer is None else [layer]
    if layer is not None:
        result._record(layer)
    names = [str(int(h)) for h in result.records[0].heads]
    heads = list(range(len(names))) if head is None else [result._head_position(result.records[0], head)]
    method_name = {"raw": "attention weights", "rollout": "attention rollout",
                   "value-norm": "value-weighted norms ||a f(v)||"}[method]
    lines = _wrap(f"{_quote(result.text)} on {result.model_name}: {result.num_layers} layers x {result.num_heads} "
                  f"heads, {level} level" + (", special tokens hidden" if hide_special else "")
                  + f"; {n:,} {level}s: a summary of every row (--focus WORD shows one {level}'s row)", width)
    lines.append("")
    lines += _matrix("mean entropy of each head's rows (nats, low = focused), raw weights:", summary["entropy"],
                     heads, names, "{:.2f}", layers, width)
    lines += [""] + _matrix(f"mean attention distance (sum of weight x |query - key|, in {level}s):",
                            summary["distance"], heads, names, "{:.1f}", layers, width)
    sink = labels[0] if labels else ""
    lines += [""] + _matrix(f"weight on the first {level} ({sink!r}, a sink when large):", summary["sink"], heads,
                            names, "{:.2f}", layers, width)
    cells = width - 6
    lines += [""] + _wrap(f"minimap: weight each {level} receives, mean over heads and rows, per layer "
                          f"(each cell the largest of {-(-n // cells) if n > cells else 1} {level}s):", width)
    b = 1
    for lay in layers:
        squeezed, b = squeeze(summary["received"][lay].tolist(), cells)
        lines.append((f"{lay:>5} " + _strip(squeezed)).rstrip())
    lines.append(("      " + _ticks(n, b, len(squeeze([0.0] * n, cells)[0]))).rstrip())
    at = default_rows(u)[0]
    rows = result.focus_rows(u.shown[at], method, level, hide_special)  # (L, H, n)
    if head is not None and method != "rollout":
        per_layer, what = rows[:, heads[0]], f"head {head}"
    else:
        per_layer = _aggregate(rows, dim=1, how=aggregate)
        what = "rollout of the mean over heads" if method == "rollout" else f"{aggregate} over heads"
    lines += [""] + _wrap(f"the last {level} {labels[at]!r} (#{at}): its top {min(top_k, n)} keys per layer "
                          f"({method_name}, {what})", width)
    lines += _layer_blocks(per_layer, layers, labels, layer_notes(result), level, top_k, width,
                           method != "value-norm")
    return "\n".join(lines)


_LEGEND = ("window (left, right): each token sees at most `left` keys before it and `right` after it; "
           "global: no window")


def render_focus(result, focus, *, method: str = "raw", level: str = "word", hide_special: bool = False,
                 layer: Optional[int] = None, head: Optional[int] = None, color: bool = False,
                 top_heads: int = 5, aggregate: str = "mean", top_k: int = TOP_K,
                 columns: Optional[int] = None) -> str:
    """The focus word's attention per layer (mean or max over heads, or one head), and its sharpest heads.

    A long input (more than SHORT_UNITS units, its table wider than `columns`, default the
    terminal's width) shows instead, per layer, the focus row's `top_k` keys with their positions
    and a strip over the whole sequence, every line within `columns`."""
    labels = result.labels(level, hide_special)
    rows = result.focus_rows(focus, method, level, hide_special)  # (L, H, n)
    cols = terminal_width(columns)
    if is_long(len(labels), 6 + len(labels) * (max(6, min(10, max(len(lab) for lab in labels) + 1)) + 1) + 2, cols):
        if head is not None and method == "rollout":
            raise ValueError("rollout averages the heads; drop --head or use --method raw")
        return _long_focus(result, focus, rows, method=method, level=level, hide_special=hide_special, layer=layer,
                           head=head, top_heads=top_heads, aggregate=aggregate, top_k=top_k, width=cols)
    index = result.focus_index(focus, level)
    focus_label = result.units(level)[0][index]
    if head is not None and method == "rollout":
        raise ValueError("rollout averages the heads; drop --head or use --method raw")
    per_layer, what, layers = _per_layer(result, rows, method=method, layer=layer, head=head, aggregate=aggregate)
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
                    aggregate: str = "mean", top_k: int = TOP_K, columns: Optional[int] = None) -> str:
    """Without a focus word: for one layer (default the last), each word's row as a table.

    A long input (more than SHORT_UNITS units, its table wider than `columns`, default the
    terminal's width) shows instead the per-layer/head summaries (entropy, distance, sink), a
    minimap of the weight each unit receives, and the last unit's `top_k` keys per layer."""
    if head is not None and method == "rollout":
        raise ValueError("rollout averages the heads; drop --head or use --method raw")
    cols = terminal_width(columns)
    shown = result.labels(level, hide_special)
    if is_long(len(shown), (len(shown) + 1) * max(6, min(10, max(len(lab) for lab in shown) + 1)) + 2, cols):
        return _long_overview(result, method=method, level=level, hide_special=hide_special, layer=layer, head=head,
                              aggregate=aggregate, top_k=top_k, width=cols)
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


def render_compare(a, b, comparison: dict, focus, level: str = "word", columns: Optional[int] = None) -> str:
    """Jensen-Shannon divergence of the focus rows per layer and head between two sentences, and the
    largest change in any weight: of the whole maps when `comparison` has them ("difference"),
    else (long inputs, whose maps are not built) of the focus rows. A long input's lines fit
    `columns` (default: the terminal's width)."""
    jsd = comparison["jsd"]  # (L, H)
    index = a.focus_index(focus, level)
    label = a.units(level)[0][index]
    n = len(a.labels(level))
    cols = terminal_width(columns)
    title = f"comparison with {b.text!r}: Jensen-Shannon divergence (bits) of {label!r}'s row, layers x heads"
    long = n > SHORT_UNITS and len(title) > cols
    if long:
        title = f"comparison with {_quote(b.text)}: Jensen-Shannon divergence (bits) of {label!r}'s row, layers x heads"
    lines = [""] + (_wrap(title, cols) if long else [title])
    for lay in range(jsd.shape[0]):
        lines.append(f"{lay:>5} " + " ".join(f"{x:4.2f}" for x in jsd[lay].tolist())
                     + f"   max {jsd[lay].max().item():.2f}")
    if comparison.get("difference") is not None:
        diff = comparison["difference"].abs().amax(dim=(-1, -2))  # (L, H)
        flat = int(torch.argmax(diff))
        lay, head = divmod(flat, diff.shape[1])
        lines.append(f"largest change in any weight: layer {lay} head {head} ({diff[lay, head].item():.2f})")
        return "\n".join(lines)
    delta = (a.focus_rows(index, "raw", level) - b.focus_rows(index, "raw", level)).abs()  # (L, H, n)
    per_head = delta.amax(dim=-1)  # (L, H)
    flat = int(torch.argmax(per_head))
    lay, head = divmod(flat, per_head.shape[1])
    key = int(torch.argmax(delta[lay, head]))
    keys = a.labels(level)
    heads = [int(h) for h in a.records[lay].heads]
    lines += _wrap(f"largest change in {label!r}'s row: layer {lay} head {heads[head]} "
                   f"({per_head[lay, head].item():.2f}, at #{key} {keys[key]!r}); only the focus rows are "
                   "compared", cols)
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


# --------------------------------------------------------------------------- images (a ViT's patch grid)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SHADES = " ░▒▓█"  # an image grid's cell, by weight / the grid's max
_METHOD_NAMES = {"raw": "attention weights", "rollout": "attention rollout",
                 "value-norm": "value-weighted norms ||a f(v)||"}


def shade(x: float, top: float) -> str:
    """The block character of weight x in a grid whose largest weight is `top`: " ░▒▓█", from none to the max."""
    level = 0.0 if top <= 0 else max(0.0, min(1.0, x / top))
    return _SHADES[int(round(level * (len(_SHADES) - 1)))]


def _grid_lines(grid: torch.Tensor, color: bool, cell: int = 2) -> list[str]:
    """grid (rows, columns) -> one line per patch row, each patch `cell` characters wide (2; 1 for a
    grid too wide for the terminal), shaded by its weight over the grid's max ("██" the max); with
    colour, the cells are blanks on the 24-step grey background."""
    top = float(grid.max()) if grid.numel() else 0.0
    lines = []
    for row in grid.tolist():
        if color:
            levels = [0.0 if top <= 0 else max(0.0, min(1.0, x / top)) for x in row]
            lines.append("".join(f"\x1b[48;5;{232 + int(round(v * 23))}m{' ' * cell}\x1b[0m" for v in levels))
        else:
            lines.append("".join(shade(x, top) * cell for x in row))
    return lines


def _where(grid: torch.Tensor, cls_weight: Optional[float], own: Optional[tuple[int, int]], digits: int) -> list[str]:
    """Where a grid's weight goes: its largest patch, the class token's share (or "hidden") and, for a
    patch focus `own` (row, column), the weight on itself."""
    cols = grid.shape[1]
    r, c = divmod(int(torch.argmax(grid)), cols)
    lines = [f"max r{r}c{c} {float(grid[r, c]):.{digits}f}",
             "cls hidden" if cls_weight is None else f"cls {cls_weight:.{digits}f}"]
    if own is not None:
        lines.append(f"self {float(grid[own]):.{digits}f}")
    return lines


def _side_by_side(blocks: list[list[str]], widths: list[int], width: int, gap: int = 2) -> list[str]:
    """Blocks of lines (each block `widths[i]` printable characters wide) placed side by side, as many
    to a band as fit in `width`, bands one under the other."""
    lines: list[str] = []
    start = 0
    while start < len(blocks):
        used, end = widths[start], start + 1
        while end < len(blocks) and used + gap + widths[end] <= width:
            used += gap + widths[end]
            end += 1
        band, band_w = blocks[start:end], widths[start:end]
        height = max(len(b) for b in band)
        for i in range(height):
            parts = []
            for b, w in zip(band, band_w):
                text = b[i] if i < len(b) else ""
                visible = len(_ANSI.sub("", text))
                parts.append(text + " " * (w - visible))
            lines.append((" " * gap).join(parts).rstrip())
        if end < len(blocks):
            lines.append("")
        start = end
    return lines


def _prediction_line(result, k: int = 3) -> Optional[str]:
    top = result.image.prediction(k)
    if not top:
        return None
    return "prediction: " + " · ".join(f"{p['label']} {p['probability'] * 100:.1f}%" for p in top)


def render_image(result, focus=None, *, method: str = "raw", hide_special: bool = False,
                 layer: Optional[int] = None, head: Optional[int] = None, color: bool = False,
                 aggregate: str = "mean", rollout: bool = True, columns: Optional[int] = None) -> str:
    """An image result (`qkv.explain(image=...)`) as block-character heat maps over the patch grid.

    Each grid is the focus unit's row (default the class token's) over the patches, each patch two
    characters wide, shaded " ░▒▓█" by its weight over the grid's max (with `color`, the cells' grey
    background instead); under it, where the weight goes (the largest patch, the class token's own
    share). Without `layer`: one grid per layer (the `aggregate` of heads, or one `head`), plus, with
    `rollout` and a method other than rollout, the attention rollout of the last layer (Abnar &
    Zuidema, 2020: what highlights the object; it needs every row, so not after rows="focus"). With
    `layer`: one grid per head of that layer (or the one `head`). Grids go side by side as far as
    `columns` (default: the terminal's width) allows.

    Args:
        result: an ExplainResult with modality "image".
        focus: "cls" (None: the class token), a patch "r1c2", or a unit index.
        method: "raw", "rollout" (heads = 1) or "value-norm".
        hide_special: hide the class token and renormalise over the patches (needs a patch as focus).
        layer, head: narrow the grids, as above; aggregate: "mean" or "max" over heads.
    """
    if result.image is None:
        raise ValueError("render_image is for image results (qkv.explain(image=...)); use render_focus for text")
    if head is not None and method == "rollout":
        raise ValueError("rollout averages the heads; drop --head or use --method raw")
    focus = "cls" if focus is None else focus
    index = result.focus_index(focus, "token")
    label = result.tokens[index]
    grids = result.image_maps(focus, method, hide_special)  # (L, H, rows, cols); H = 1 for rollout
    rows_full = result.focus_rows(focus, method, "token", hide_special)  # (L, H, n): column 0 the class token
    cls_col = None if hide_special else rows_full[..., 0]  # (L, H)
    gh, gw = result.image.grid
    own = None if index == 0 else divmod(index - 1, gw)  # the focus patch (row, column)
    digits = 3 if method != "value-norm" else 2
    info = result.image
    C, H, W = info.pixels.shape
    lines = [f"{info.name!r} on {result.model_name}: {result.num_layers} layers x {result.num_heads} heads, "
             f"{gw}x{gh} patches of {info.patch}x{info.patch} pixels ({W}x{H}) + class token, "
             f"{_METHOD_NAMES[method]}" + (", class token hidden" if hide_special else "")]
    pred = _prediction_line(result)
    if pred:
        lines.append(pred)
    names = [str(int(h)) for h in result.records[0].heads]
    blocks: list[tuple[str, torch.Tensor, Optional[float]]] = []  # (title, (gh, gw) grid, class token weight)

    def pick(lay: int) -> tuple[torch.Tensor, Optional[torch.Tensor], str]:
        if method == "rollout":
            return grids[lay, 0], None if cls_col is None else cls_col[lay, 0], "rollout"
        if head is not None:
            h = result._head_position(result.records[lay], head)
            return grids[lay, h], None if cls_col is None else cls_col[lay, h], f"h{head}"
        g = _aggregate(grids[lay], dim=0, how=aggregate)  # (H, gh, gw) -> (gh, gw)
        cw = None if cls_col is None else _aggregate(cls_col[lay], dim=0, how=aggregate)
        return g, cw, aggregate

    if layer is None:
        for lay in range(result.num_layers):
            g, cw, what = pick(lay)
            blocks.append((f"layer {lay} {what}", g, None if cw is None else float(cw)))
        heads_what = f"head {head}" if head is not None else f"{aggregate} over heads"
        what_line = "one grid per layer" + ("" if method == "rollout" else f" ({heads_what})")
        if rollout and method != "rollout" and result.rows is None:  # rows="focus" recorded one row: no rollout
            last = result.num_layers - 1
            ro = result.image_maps(focus, "rollout", hide_special)[last, 0]  # (gh, gw)
            ro_cls = None if hide_special else float(result.focus_rows(focus, "rollout", "token")[last, 0, 0])
            blocks.append((f"rollout L{last}", ro, ro_cls))
            what_line += f", then the attention rollout up to layer {last} (mean over heads)"
    else:
        result._record(layer)
        if method == "rollout":
            g, cw, _ = pick(layer)
            blocks.append((f"layer {layer} rollout", g, None if cw is None else float(cw)))
        else:
            heads = range(len(names)) if head is None else [result._head_position(result.records[layer], head)]
            for h in heads:
                cw = None if cls_col is None else float(cls_col[layer, h])
                blocks.append((f"layer {layer} h{names[h]}", grids[layer, h], cw))
        what_line = f"layer {layer}, " + ("rollout" if method == "rollout" else
                                         "one grid per head" if head is None else f"head {head}")
    what = "the class token [CLS]" if index == 0 else f"patch {label}"
    lines.append(f"from {what} to each patch: {what_line}")
    lines.append(f"each patch {'2 characters' if 2 * gw <= terminal_width(columns) else '1 character'}, shaded "
                 f"{_SHADES[1:]!r} by its weight over the grid's max (blank: none); "
                 "under each grid: its largest patch, the weight on the class token"
                 + ("" if own is None else f" and on {label} itself"))
    cols = terminal_width(columns)
    lines = [part for line in lines for part in _wrap(line, cols)]
    lines.append("")
    rendered, widths = [], []
    cell = 2 if 2 * gw <= cols else 1  # a grid wider than the terminal: one character a patch
    for title, g, cw in blocks:
        body = _grid_lines(g, color, cell)
        legend = _where(g, cw, own, digits)
        block = [title, *body, *legend]
        rendered.append(block)
        widths.append(max(len(title), cell * gw, *(len(x) for x in legend)))
    lines += _side_by_side(rendered, widths, cols)
    return "\n".join(lines)
