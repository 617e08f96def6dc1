"""A PNG picture of a `qkv explain` result ("qkv.explain/1" dict), drawn with matplotlib.

Panels: (a) the focus word's attention row in every layer (mean of heads) and (b) in every
head of the chosen layer, when the result has a focus word; (c) the token-by-token map of one
layer and head (default: the last layer, mean of heads), words on both axes. Weights that are
not normalised (value norms, Kobayashi et al., 2020) are coloured per row max.

Long inputs stay readable and small: a map of more than MAP_CELLS words is drawn downsampled,
each cell the max of a b x b block (said in its title), strips of more than STRIP_CELLS words
likewise, at most MAX_TICKS labels per axis in a fixed font, and the picture is at most
MAX_PIXELS x MAX_PIXELS at any length. The compact view of a long input ("view": "rows", no
"maps") is drawn as strips over the whole sequence: the focus row per layer, each head's top
keys of the shipped row in one layer, and the minimap (weight received, row entropy);
`save_png` adds a downsampled map of one layer, built a chunk of rows at a time from the
recorded queries and keys.

An image result ("modality": "image") is drawn as its picture (data["image"]["pixels"], upscaled
with nearest neighbour) with the focus unit's row over the patches overlaid (default the class
token's; the focus patch outlined), a grid of layers (rows) x heads (columns) plus a column of the
attention rollout up to each layer, titled with the focus and the prediction; the compact view's
shipped row (every patch, by default) draws the same.

matplotlib is an optional dependency (`pip install 'qkv[viz]'`), imported only here, with the
Agg canvas: no display, no pyplot state, only the fonts matplotlib ships (DejaVu Sans).

    from qkv.inspect.png import render_png
    render_png(result.to_dict(), "cat.png")                  # last layer, mean of heads
    render_png(result.to_dict(), "l3h7.png", layer=3, head=7)
    png = render_png_bytes(result.to_dict())                # the same file as bytes
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .._files import check_target, write_bytes
from .schema import check_data

__all__ = ["MAX_PIXELS", "render_png", "render_png_bytes", "save_png"]

DPI = 150
MAX_PIXELS = 2400  # the picture's width and height at most, at any length
MAX_INCHES = MAX_PIXELS / DPI
MAX_TICKS = 40  # labels per axis at most; a longer axis shows every k-th word
MAP_CELLS = 400  # a map of more words is drawn as blocks, each the max of b x b weights
STRIP_CELLS = 1200  # a strip of more words is drawn as buckets, each the max of b weights
TICK_FONT = 7.0  # the labels' size when they are subsampled (points)

_NEEDS = "PNG output needs matplotlib: pip install 'qkv[viz]'"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def render_png(
    data: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layer: int | None = None,
    head: int | str | None = None,
) -> Path:
    """Draw a "qkv.explain/1" result as a PNG and write it to `path` atomically.

    Args:
        data: the JSON-ready dict of an explain result (`to_dict()`): labels (n),
            maps[layer][head][query][key] (n x n each), head_names, focus, ...
        path: the PNG file to write (by `qkv._files`: a temporary file beside the target, then
            os.replace; a symbolic link is written through, a non-regular target refused).
        layer: the layer of the token-by-token map, 0 .. layers-1; None: the last layer.
            Negative values count from the end, as in Python. An image result ("modality":
            "image") draws a grid of layers (rows) x heads (columns): None = every layer.
        head: the head of that map: an index 0 .. heads-1, a name from data['head_names'],
            or None / "mean" for the mean of heads. An image result: None = every head.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: malformed data, or a layer or head out of range (the message gives the range).
        OSError: the path cannot be written (a `qkv._files.FileWriteError` naming it).
    """
    _, n_layers, _ = check_data(data)
    layer_i = _pick_layer(layer, n_layers, every=_is_image(data))
    head_i = _pick_head(head, data["head_names"])
    target = Path(path)
    check_target(target, what="PNG")  # before the drawing, which takes a while
    write_bytes(target, _png(data, layer_i, head_i), what="PNG")
    return target


def render_png_bytes(
    data: Mapping[str, Any],
    *,
    layer: int | None = None,
    head: int | str | None = None,
) -> bytes:
    """Draw a "qkv.explain/1" result as a PNG and return the file's bytes (for Jupyter's
    `_repr_png_`, or to send elsewhere); `render_png` writes the same bytes to a file.

    Args:
        data, layer, head: as in `render_png`.

    Returns:
        The PNG file as bytes (it starts with the PNG signature b"\\x89PNG\\r\\n\\x1a\\n").

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: malformed data, or a layer or head out of range (the message gives the range).
    """
    _, n_layers, _ = check_data(data)
    return _png(data, _pick_layer(layer, n_layers, every=_is_image(data)), _pick_head(head, data["head_names"]))


def save_png(result, path: str | os.PathLike[str], *, layer: int | None = None, head: int | None = None,
             method: str = "raw", level: str = "word", hide_special: bool = False, focus=None, rows=None,
             top_k: int | None = None) -> Path:
    """Draw an `ExplainResult` as a PNG at any length and write it to `path` atomically.

    A short input's full maps are drawn as `render_png(result.to_dict(...))` draws them. A long one
    (the compact view, or full maps of more than MAP_CELLS words) is drawn from its compact dict
    (`to_dict(rows=...)`, `top_k` keys per shipped row) plus, when every row was recorded and the
    method is not rollout, the map of `layer` (default the last; `head` one head, else the mean)
    downsampled to at most MAP_CELLS x MAP_CELLS blocks (each the max of its b x b weights), built
    a chunk of rows at a time: never every full map at once.

    Args:
        result: what `qkv.explain` returned.
        path: the PNG file to write.
        layer, head: as in `render_png`.
        method, level, hide_special, focus, rows, top_k: as in `ExplainResult.to_dict` (top_k
            None: 8 for a text, every patch for an image).

    An image result (`qkv.explain(image=...)`) is drawn as the picture with the focus unit's
    attention (default the class token's) overlaid, layers (rows) x heads (columns) plus a column
    of the attention rollout up to each layer (`ExplainResult.image_maps`), in any view: the
    compact view's shipped row holds every patch. `layer` and `head` narrow the grid to one row
    or one head column.

    Returns:
        The path written.
    """
    from . import rows as _rows

    if result.image is not None:
        return _save_image_png(result, path, layer=layer, head=head, method=method, level=level,
                               hide_special=hide_special, focus=focus, rows=rows, top_k=top_k)
    top_k = 8 if top_k is None else top_k
    options = dict(method=method, level=level, hide_special=hide_special, focus=focus, top_k=top_k)
    compact = result.compact_view(level, hide_special) if rows is None else rows != "all"
    u = _rows.units(result, level, hide_special)
    if result.roles is not None or (not compact and u.n <= MAP_CELLS):
        return render_png(result.to_dict(rows=rows, **options), path, layer=layer, head=head)
    data = result.to_dict(rows=rows if compact else "focus", **options)
    _, n_layers, _ = check_data(data)
    layer_i = _pick_layer(layer, n_layers)
    head_i = _pick_head(head, data["head_names"])
    target = Path(path)
    check_target(target, what="PNG")
    block = None
    if result.rows is None and method != "rollout":
        block = _block_map(result, layer_i, head_i, method, u)
    write_bytes(target, _png(data, layer_i, head_i, block), what="PNG")
    return target


def _block_map(result, layer: int, head: int | None, method: str, u) -> tuple[Any, int]:
    """(the (m, m) map of one layer, mean of heads or one head position, each cell the max of a
    b x b block of weights, b): built a chunk of query rows at a time (qkv.inspect.rows)."""
    import numpy as np

    from . import rows as _rows

    n = u.n
    b = max(1, math.ceil(n / MAP_CELLS))
    m = math.ceil(n / b)
    out = np.zeros((m, m))
    step = max(b, (_rows.chunk_rows(result) // b) * b)  # whole blocks of rows per chunk
    starts = np.arange(0, n, b)
    for start in range(0, n, step):
        rows = list(range(start, min(n, start + step)))
        w = _rows.unit_rows(result, layer, rows, u, method, None if head is None else [head])  # (nh, r, n)
        grid = (w.mean(dim=0) if head is None else w[0]).double().numpy()  # (r, n)
        grid = np.maximum.reduceat(grid, starts, axis=1)  # (r, m)
        grid = np.maximum.reduceat(grid, np.arange(0, len(rows), b), axis=0)  # (r / b, m)
        out[start // b:start // b + grid.shape[0]] = grid
    return out, b


def _png(data: Mapping[str, Any], layer_i: Any, head_i: int | None, block: tuple[Any, int] | None = None,
         on_figure=None, rollout: Any = None) -> bytes:
    """The drawing, on checked data and a checked layer and head (None: the mean of heads; for an
    image, None is every layer or every head); `block` (a downsampled map, its block size) is drawn
    beside a compact view; `rollout` (layers, rows, columns): an image's rollout grids, when the
    result gave them; `on_figure(fig)` is called once it is drawn (the tests read its axes)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_NEEDS) from e
    import numpy as np  # a dependency of matplotlib

    compact = data.get("maps") is None
    maps = None if compact else np.asarray(data["maps"], dtype=np.float64)  # (L, H, n, n)
    if maps is not None and not np.isfinite(maps).all():
        raise ValueError("data['maps'] holds non-finite weights; weights must be finite")
    normalised = bool(data.get("normalised", data.get("method") != "value-norm"))
    labels = [_tick_text(s) for s in data["labels"]]
    special = list(data.get("special") or [False] * len(labels))
    focus = data.get("focus")

    rc = {"text.parse_math": False} if "text.parse_math" in matplotlib.rcParams else {}
    with matplotlib.rc_context(rc) if rc else nullcontext(), warnings.catch_warnings():
        # Labels in scripts DejaVu Sans lacks (CJK, ...) draw as boxes rather than warn.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from", category=UserWarning)
        if not rc:  # old matplotlib: a '$' would start mathtext
            labels = [s.replace("$", r"\$") for s in labels]
        fig = Figure(layout="constrained")
        FigureCanvasAgg(fig)
        if _is_image(data):
            _draw_image(fig, np, data, layer_i, head_i, rollout)
        elif compact:
            _draw_rows(fig, np, data, labels, special, normalised, layer_i, head_i, block)
        elif data.get("cross"):
            # Encoder-decoder: the picture that matters is cross-attention, an alignment of
            # target words (rows) over source words (columns), one panel per cross layer.
            _draw_cross(fig, np, data, head_i)
        else:
            _draw(fig, np, data, maps, labels, special, focus, normalised, layer_i, head_i)
        buf = io.BytesIO()
        if on_figure is not None:
            on_figure(fig)
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "qkv explain"})
    return buf.getvalue()


def _draw_cross(fig, np, data, head) -> None:
    """Cross-attention alignments: for each cross layer, target words over source words."""
    cross = data["cross"]
    maps = np.asarray(cross["maps"], dtype=np.float64)  # (C, H, target, source), shapes checked by check_data
    if not np.isfinite(maps).all():
        raise ValueError("data['cross']['maps'] holds non-finite weights; weights must be finite")
    source = [_tick_text(s) for s in cross["source"]]
    target = [_tick_text(s) for s in cross["target"]]
    n_cross, n_heads, n_t, n_s = maps.shape
    if head is not None and head >= n_heads:
        raise ValueError(f"head {head} is out of range: the cross-attention layers have heads 0..{n_heads - 1}")
    cell = min(0.42, max(0.12, 6.0 / max(n_t, n_s)))
    font = min(9.0, max(4.0, cell * 72 * 0.5))
    fig.set_size_inches(min(n_cross * (n_s * cell + 1.4) + 1.0, MAX_INCHES), min(n_t * cell + 2.4, MAX_INCHES))
    what = "mean of heads" if head is None else f"head {head}"
    fig.suptitle(f"\u201c{_short(data.get('text', ''))}\u201d  \u00b7  model {_short(str(data.get('model', '')), 40)}\n"
                 f"cross-attention: target words (rows) over source words (columns), {what}", fontsize=9)
    axes = fig.subplots(1, n_cross, squeeze=False)[0]
    for i, ax in enumerate(axes):
        grid = maps[i].mean(0) if head is None else maps[i, head]  # (target, source)
        _heatmap(ax, np, grid, True, font, annotate=n_t * n_s <= 400, aspect="equal")
        ax.set_title(f"cross layer {cross['layers'][i]}", fontsize=font + 1)
        ax.set_xticks(range(n_s))
        ax.set_xticklabels(source, rotation=60, ha="right", fontsize=font)
        ax.set_yticks(range(n_t))
        ax.set_yticklabels(target if i == 0 else [""] * n_t, fontsize=font)
        ax.set_xlabel("source", fontsize=font)
    axes[0].set_ylabel("target", fontsize=font)


def _pick_layer(layer: int | None, n_layers: int, every: bool = False) -> Any:
    """A checked layer index (negative counts from the end); None: the last layer, or with `every`
    None (every layer: an image result's grid)."""
    if layer is None:
        return None if every else n_layers - 1
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int in 0..{n_layers - 1} or None, got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: this result has layers 0..{n_layers - 1}")
    return layer % n_layers


def _pick_head(head: int | str | None, names: list[str]) -> int | None:
    """None means the mean of heads."""
    if head is None or head == "mean":
        return None
    if isinstance(head, str):
        if head in names:
            return names.index(head)
        if head.lstrip("-").isdigit():
            head = int(head)
        else:
            raise ValueError(f"unknown head {head!r}: give an index 0..{len(names) - 1}, "
                             f"a name from {names}, or 'mean'")
    if isinstance(head, bool) or not isinstance(head, int):
        raise ValueError(f"head must be an int, a head name or 'mean', got {head!r}")
    if not 0 <= head < len(names):
        raise ValueError(f"head {head} is out of range: this result has heads 0..{len(names) - 1} (or 'mean')")
    return head


def _tick_text(label: str, limit: int = 16) -> str:
    s = " ".join(_CONTROL.sub(" ", str(label)).split()) or "\u2423"  # an empty or blank label shows as ␣
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def _short(text: str, limit: int = 90) -> str:
    s = " ".join(_CONTROL.sub(" ", str(text)).split())
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def _draw(fig, np, data, maps, labels, special, focus, normalised, layer, head) -> None:
    n_layers, n_heads, n = maps.shape[0], maps.shape[1], maps.shape[2]
    names = [str(h) for h in data["head_names"]]
    amap = maps[layer].mean(0) if head is None else maps[layer, head]  # (n, n)
    head_text = "mean of heads" if head is None else f"head {names[head]}"
    if n_heads == 1:
        head_text = names[0]

    # Cell size in inches: large for a sentence; a long input's map is drawn in blocks (b x b
    # weights, their max) and its axes show at most MAX_TICKS labels in a fixed font.
    cell = min(0.42, max(0.075, 6.0 / n))
    font = min(9.0, max(4.0, cell * 72 * 0.5)) if n <= MAX_TICKS else TICK_FONT
    every = _every(n)
    with_focus = focus is not None
    show_heads = with_focus and n_heads > 1
    b = max(1, math.ceil(n / MAP_CELLS))
    if b > 1:
        amap = _block(np, _block(np, amap, b, axis=1), b, axis=0)  # (n / b, n / b)

    side = min(n * cell, 7.0 if with_focus else 12.0)
    left_rows = (n_layers + (n_heads if show_heads else 0)) * max(cell, 0.16)
    width = side + (side + 1.6 if with_focus else 0) + 2.2
    height = max(side, left_rows + (1.2 if show_heads else 0.6)) + 2.0
    fig.set_size_inches(min(width, MAX_INCHES), min(height, MAX_INCHES))

    title = f"\u201c{_short(data.get('text', ''))}\u201d"
    sub = f"model {data.get('model')} \u00b7 method {data.get('method')} \u00b7 level {data.get('level')}"
    fig.suptitle(f"{title}\n{sub}", fontsize=10, x=0.01, ha="left")

    if with_focus:
        gs = fig.add_gridspec(2, 2, width_ratios=[1, 1],
                              height_ratios=[n_layers, n_heads] if show_heads else [1, 0.001])
        ax_c = fig.add_subplot(gs[:, 1])
        ax_a = fig.add_subplot(gs[0, 0])
        ax_b = fig.add_subplot(gs[1, 0]) if show_heads else None
    else:
        ax_c, ax_a, ax_b = fig.add_subplot(1, 1, 1), None, None

    fi = focus["index"] if with_focus else None
    if with_focus:
        per_layer = focus.get("per_layer")
        if per_layer is None:
            per_layer = maps[:, :, fi].mean(1)
        per_layer = np.asarray(per_layer, dtype=np.float64)  # (L, n)
        word = labels[fi]
        _heatmap(ax_a, np, _block(np, per_layer, _strip_block(n), axis=1), normalised, font, annotate=n <= 20,
                 extent=_extent(n, n_layers))
        ax_a.set_title(f"(a) \u201c{word}\u201d \u2192 each word, per layer (mean of heads)",
                       fontsize=max(8.0, font + 1), loc="left")
        _ticks(ax_a, labels, special, font, every, x=True)
        _yticks(ax_a, [f"layer {i}" for i in range(n_layers)], font, bold=layer)
        if ax_b is not None:
            rows = maps[layer, :, fi]  # (H, n)
            _heatmap(ax_b, np, _block(np, rows, _strip_block(n), axis=1), normalised, font, annotate=n <= 14,
                     extent=_extent(n, n_heads))
            ax_b.set_title(f"(b) \u201c{word}\u201d \u2192 each word, layer {layer}, every head",
                           fontsize=max(8.0, font + 1), loc="left")
            _ticks(ax_b, labels, special, font, every, x=True)
            _yticks(ax_b, [f"head {h}" for h in names], font, bold=head)

    im = _heatmap(ax_c, np, amap, normalised, font, annotate=n <= 14, aspect="equal", extent=_extent(n, n))
    prefix = "(c) " if with_focus else ""
    blocks = f"; each cell the max of {b}\u00d7{b} weights" if b > 1 else ""
    ax_c.set_title(f"{prefix}layer {layer}, {head_text}: query (row) \u2192 key (column){blocks}",
                   fontsize=max(8.0, font + 1), loc="left")
    _ticks(ax_c, labels, special, font, every, x=True)
    _ticks(ax_c, labels, special, font, every, x=False)
    ax_c.set_xlabel("key", fontsize=max(7.0, font))
    ax_c.set_ylabel("query", fontsize=max(7.0, font))
    if fi is not None:
        from matplotlib.patches import Rectangle

        ax_c.add_patch(Rectangle((-0.5, fi - 0.5), n, 1, fill=False, edgecolor="#d62728", linewidth=1.2))
    bar = fig.colorbar(im, ax=ax_c, shrink=0.6, pad=0.02)
    bar.set_label("weight" if normalised else "norm / row max", fontsize=max(7.0, font))
    bar.ax.tick_params(labelsize=font)


def _sparse(np, tops, n: int):
    """Rows of top keys [{"keys", "weights", ...}, ...] as (R, n) weights, 0 for the keys left out."""
    out = np.zeros((len(tops), n))
    for r, top in enumerate(tops):
        out[r, top["keys"]] = top["weights"]
    return out


def _draw_rows(fig, np, data, labels, special, normalised, layer, head, block) -> None:
    """The compact view of a long input: strips over the whole sequence (the focus row per layer,
    each head's top keys in `layer`, the minimap) and, with `block`, a downsampled map of `layer`."""
    n = len(labels)
    names = [str(h) for h in data["head_names"]]
    top = data["rows"]["top"]  # (L, H, R) of {"keys", "weights", "rest", "left_out"}
    n_layers, n_heads = len(top), len(names)
    ship, k = data["rows"]["index"], data["rows"]["k"]
    focus = data.get("focus")
    row = focus["index"] if focus else ship[0]  # the row drawn: the focus word's, else the first shipped
    r = ship.index(row) if row in ship else None  # its place among the shipped rows (None: not shipped)
    word = labels[row]
    sb = _strip_block(n)
    per = f"; each cell the max of {sb} words" if sb > 1 else ""
    level = data.get("level", "word")
    panels = []  # (title, (rows, n) values, y labels, bold row, the focus column or None)
    if focus:
        panels.append((f"\u201c{word}\u201d (#{focus['index']}) \u2192 each {level}, per layer (mean of heads){per}",
                       np.asarray(focus["per_layer"], dtype=np.float64), [f"layer {i}" for i in range(n_layers)],
                       layer, focus["index"]))
    else:
        mean = np.mean([_sparse(np, [top[lay][h][r] for h in range(n_heads)], n) for lay in range(n_layers)], axis=1)
        panels.append((f"\u201c{word}\u201d (#{row}): each head's top {k} keys, mean of heads, per layer (other "
                       f"weights not drawn){per}", mean, [f"layer {i}" for i in range(n_layers)], layer, row))
    if n_heads > 1 and r is not None:
        panels.append((f"\u201c{word}\u201d in layer {layer}: each head's top {k} keys (other weights not drawn){per}",
                       _sparse(np, [top[layer][h][r] for h in range(n_heads)], n), [f"head {h}" for h in names],
                       head, row))
    minimap = data.get("minimap")
    if minimap:
        panels.append((f"minimap: weight each {level} receives, mean of heads and rows, per layer{per}",
                       np.asarray(minimap["received"], dtype=np.float64), [f"layer {i}" for i in range(n_layers)],
                       layer, None))
        panels.append((f"minimap: entropy of each {level}'s row (nats), mean of heads, per layer{per}",
                       np.asarray(minimap["entropy"], dtype=np.float64), [f"layer {i}" for i in range(n_layers)],
                       layer, None))
    heights = [max(1.0, 0.2 * len(p[2])) + 0.7 for p in panels]
    stack = sum(heights) + 1.3
    width = MAX_INCHES if block is not None else 14.0
    fig.set_size_inches(width, min(MAX_INCHES, max(stack, 8.0 if block is not None else 4.0)))
    title = f"\u201c{_short(data.get('text', ''))}\u201d"
    sub = (f"model {_short(str(data.get('model')), 40)} \u00b7 method {data.get('method')} \u00b7 level {level} "
           f"\u00b7 {n:,} {level}s \u00b7 compact view (top {k} keys per row)")
    fig.suptitle(f"{title}\n{sub}", fontsize=10, x=0.01, ha="left")
    if block is not None:
        gs = fig.add_gridspec(len(panels), 2, width_ratios=[1.25, 1], height_ratios=heights)
        axes = [fig.add_subplot(gs[i, 0]) for i in range(len(panels))]
        ax_map = fig.add_subplot(gs[:, 1])
    else:
        gs = fig.add_gridspec(len(panels), 1, height_ratios=heights)
        axes = [fig.add_subplot(gs[i, 0]) for i in range(len(panels))]
        ax_map = None
    every = _every(n)
    idx = list(range(0, n, every))
    for i, (ax, (text, values, ylabels, bold, mark)) in enumerate(zip(axes, panels)):
        letter = "abcdefgh"[i]
        norm = normalised and not text.startswith("minimap: entropy")
        _heatmap(ax, np, _block(np, values, sb, axis=1), norm, TICK_FONT, annotate=False,
                 extent=_extent(n, len(ylabels)))
        ax.set_title(f"({letter}) {text}", fontsize=8.5, loc="left")
        _yticks(ax, ylabels, TICK_FONT, bold=bold if bold is not None and bold < len(ylabels) else None)
        if mark is not None:
            ax.axvline(mark, color="#d62728", linewidth=0.8)
        if i == len(panels) - 1:
            _ticks(ax, [f"{j} {labels[j]}" for j in range(n)], special, TICK_FONT, every, x=True)
        else:
            ax.set_xticks(idx, [str(j) for j in idx], fontsize=TICK_FONT - 1, rotation=90)
    if ax_map is not None:
        grid, b = block
        what = "mean of heads" if head is None else f"head {names[head]}"
        # each row coloured by its own max: a long causal map's first rows (weight 1 on few keys)
        # would otherwise wash out every later row
        im = _heatmap(ax_map, np, grid, False, TICK_FONT, annotate=False, aspect="equal", extent=_extent(n, n))
        blocks = f", each cell the max of {b}\u00d7{b} weights" if b > 1 else ""
        ax_map.set_title(f"({'abcdefgh'[len(panels)]}) layer {layer}, {what}: query (row) \u2192 key (column)"
                         f"{blocks}", fontsize=8.5, loc="left")
        tick_labels = [f"{j} {labels[j]}" for j in range(n)]
        _ticks(ax_map, tick_labels, special, TICK_FONT, every, x=True)
        _ticks(ax_map, tick_labels, special, TICK_FONT, every, x=False)
        if focus:
            ax_map.axhline(focus["index"], color="#d62728", linewidth=0.8)
        bar = fig.colorbar(im, ax=ax_map, shrink=0.6, pad=0.02)
        bar.set_label("weight / row max" if normalised else "norm / row max", fontsize=TICK_FONT)
        bar.ax.tick_params(labelsize=TICK_FONT)


def _every(n: int) -> int:
    """Show every k-th label of n: at most MAX_TICKS of them."""
    return max(1, math.ceil(n / MAX_TICKS))


def _strip_block(n: int) -> int:
    return max(1, math.ceil(n / STRIP_CELLS))


def _block(np, values, b: int, axis: int):
    """values with `axis` cut into runs of b (the last one shorter) and each run's max: a sharp
    weight survives the downsampling, as it would not in a mean."""
    values = np.asarray(values, dtype=np.float64)
    if b <= 1:
        return values
    return np.maximum.reduceat(values, np.arange(0, values.shape[axis], b), axis=axis)


def _extent(columns: int, rows: int) -> tuple[float, float, float, float]:
    """imshow's extent that puts unit i at x = i and row r at y = r, whatever the downsampling."""
    return (-0.5, columns - 0.5, rows - 0.5, -0.5)


def _heatmap(ax, np, values, normalised, font, *, annotate, aspect="auto", extent=None):
    """values (rows, n); value norms are scaled per row max for colour, printed as they are."""
    values = np.asarray(values, dtype=np.float64)
    if normalised:
        colour = values
        vmax = max(float(values.max()), 1e-12)
    else:
        row_max = values.max(axis=1, keepdims=True)
        colour = np.divide(values, row_max, out=np.zeros_like(values), where=row_max > 0)
        vmax = 1.0
    im = ax.imshow(colour, cmap="Blues", vmin=0.0, vmax=vmax, aspect=aspect, interpolation="nearest", extent=extent)
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            text = f"{v:.2f}".lstrip("0") if v < 1 else f"{v:.1f}"
            if text in (".00", ""):
                continue
            dark = colour[i, j] / vmax > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=font * 0.85, color="white" if dark else "#1d2330")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return im


def _ticks(ax, labels, special, font, every, *, x):
    idx = list(range(0, len(labels), every))
    texts = [labels[i] for i in idx]
    if x:
        long_texts = max(map(len, texts)) > 3
        ax.set_xticks(idx, texts, rotation=60 if long_texts else 0, ha="right" if long_texts else "center",
                      rotation_mode="anchor", fontsize=font)
        tick_labels = ax.get_xticklabels()
    else:
        ax.set_yticks(idx, texts, fontsize=font)
        tick_labels = ax.get_yticklabels()
    for i, t in zip(idx, tick_labels):
        if special[i]:
            t.set_color("#8a93a3")
            t.set_fontstyle("italic")


def _yticks(ax, texts, font, *, bold):
    ax.set_yticks(range(len(texts)), texts, fontsize=font)
    if bold is not None:
        ax.get_yticklabels()[bold].set_fontweight("bold")


# --------------------------------------------------------------------------- images (a ViT's patch grid)

IMAGE_PANEL = 1.6  # inches per panel of an image result, at most
OVERLAY_ALPHA = 0.55  # the heat map's opacity over the picture


def _is_image(data: Mapping[str, Any]) -> bool:
    return data.get("modality") == "image" and data.get("image") is not None


def _save_image_png(result, path, *, layer, head, method, level, hide_special, focus, rows, top_k) -> Path:
    """save_png for an image result: the dict's row of the focus unit, and the rollout column from the
    result (`image_maps(method="rollout")`) when every row was recorded."""
    data = result.to_dict(method=method, level=level, hide_special=hide_special, focus=focus, rows=rows, top_k=top_k)
    _, n_layers, _ = check_data(data)
    layer_i = _pick_layer(layer, n_layers, every=True)
    head_i = _pick_head(head, data["head_names"])
    if hide_special and focus is None:
        raise ValueError("the class token is hidden (hide_special), and it is the default focus; "
                         "give a patch as focus (e.g. 'r1c2'), or show the class token")
    target = Path(path)
    check_target(target, what="PNG")
    rollout = None
    if method != "rollout" and result.rows is None:
        grids = result.image_maps("cls" if focus is None else focus, "rollout", hide_special)  # (L, 1, rows, cols)
        rollout = grids[:, 0].double().numpy()  # (L, rows, cols)
    write_bytes(target, _png(data, layer_i, head_i, rollout=rollout), what="PNG")
    return target


def _decode_picture(np, url: str):
    """A "data:image/png;base64,..." URL -> (H, W) or (H, W, 3) float array in [0, 1]."""
    import base64
    import binascii

    from matplotlib.image import imread

    prefix = "data:image/png;base64,"
    if not url.startswith(prefix):
        raise ValueError("data['image']['pixels'] must be a PNG data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(url[len(prefix):], validate=True)
        pic = np.asarray(imread(io.BytesIO(raw), format="png"), dtype=np.float64)
    except (binascii.Error, ValueError, OSError, SyntaxError) as exc:
        raise ValueError(f"data['image']['pixels'] is not a readable PNG ({exc})") from None
    if pic.max() > 1.0:  # an 8-bit array from an imaging library that does not scale
        pic = pic / 255.0
    if pic.ndim == 3 and pic.shape[2] == 4:
        pic = pic[..., :3]
    return pic  # (H, W) or (H, W, 3)


def _numpy_rollout(np, maps):
    """maps (L, H, n, n) raw weights -> (L, n, n) attention rollout with the residual term, as
    `qkv.inspect.analysis.rollout` computes it on the mean over heads."""
    L, _, n, _ = maps.shape
    eye = np.eye(n)
    current = eye
    out = []
    for layer in range(L):
        a = 0.5 * maps[layer].mean(axis=0) + 0.5 * eye
        a = a / np.maximum(a.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
        current = a @ current  # (n, n)
        out.append(current)
    return np.stack(out)


def image_rows(np, data: Mapping[str, Any]):
    """(the focus unit's rows (L, H, n) over every shown unit, its index among the labels, whether
    they are whole) from a checked image dict: the full view's maps, or the compact view's shipped
    row rebuilt from its top keys (whole when k is every unit: the default for an image). The focus
    is data["focus"], else the class token."""
    image = data["image"]
    focus = data.get("focus")
    if focus is not None:
        index = int(focus["index"])
    elif image.get("class_token") is not None:
        index = int(image["class_token"])
    else:
        raise ValueError("the class token is hidden and no focus patch is given; give a patch as focus "
                         "(e.g. 'r1c2'), or show the class token")
    n = len(data["labels"])
    if data.get("maps") is not None:
        maps = np.asarray(data["maps"], dtype=np.float64)  # (L, H, n, n)
        return maps[:, :, index], index, True
    ship = list(data["rows"]["index"])
    if index not in ship:
        raise ValueError(f"the compact view ships rows {ship}, not the focus row {index}; draw it with that focus")
    r = ship.index(index)
    top = data["rows"]["top"]  # (L, H, R) of {"keys", "weights", ...}
    rows = np.stack([_sparse(np, [top[lay][h][r] for h in range(len(top[lay]))], n) for lay in range(len(top))])
    return rows, index, int(data["rows"]["k"]) >= n  # (L, H, n)


def _draw_image(fig, np, data, layer, head, rollout) -> None:
    """An image result: the picture with the focus unit's attention over its patches, layers (rows)
    x heads (columns) plus a rollout column, each panel scaled to its own max."""
    from matplotlib.patches import Rectangle

    image = data["image"]
    pic = _decode_picture(np, image["pixels"])  # (H, W) or (H, W, 3)
    gh, gw = (int(x) for x in image["grid"])
    P = int(image["patch"])
    first = int(image["first_patch"])
    cls = image.get("class_token")
    rows, index, whole = image_rows(np, data)  # (L, H, n)
    if not np.isfinite(rows).all():
        raise ValueError("the image result holds non-finite weights; weights must be finite")
    grids = rows[:, :, first:first + gh * gw].reshape(rows.shape[0], rows.shape[1], gh, gw)  # (L, H, gh, gw)
    method = data.get("method", "raw")
    names = [str(h) for h in data["head_names"]]
    if rollout is None and method == "raw" and data.get("maps") is not None and cls is not None:
        full = _numpy_rollout(np, np.asarray(data["maps"], dtype=np.float64))  # (L, n, n)
        rollout = full[:, index, first:first + gh * gw].reshape(-1, gh, gw)  # (L, gh, gw)
    if method == "rollout":
        rollout = None  # the heads' column is the rollout already
    layers = list(range(grids.shape[0])) if layer is None else [layer]
    heads = list(range(grids.shape[1])) if head is None else [head]
    columns = [(f"h{names[h]}" if method != "rollout" else "rollout", h) for h in heads]
    if rollout is not None:
        columns.append(("rollout", None))
    panel = min(IMAGE_PANEL, (MAX_INCHES - 0.8) / len(columns), (MAX_INCHES - 1.4) / len(layers))
    fig.set_size_inches(len(columns) * panel + 0.8, len(layers) * panel + 1.4)
    font = max(5.0, min(8.0, panel * 5))
    label = data["labels"][index]
    what = "class token [CLS]" if cls is not None and index == cls else f"patch {_tick_text(label)} (outlined)"
    prediction = " \u00b7 ".join(f"{_short(str(p['label']), 20)} {p['probability'] * 100:.1f}%"
                                  for p in image.get("prediction") or [])
    kind = {"raw": "attention weights", "rollout": "attention rollout",
            "value-norm": "value-weighted norms"}.get(method, str(method))
    lines = [f"\u201c{_short(str(image.get('name', '')), 60)}\u201d \u00b7 model {_short(str(data.get('model')), 40)}"
             f" \u00b7 {kind} from the {what}"]
    if prediction:
        lines.append(f"prediction: {prediction}")
    lines.append("each panel scaled to its own max" + ("" if whole else
                                                      f"; only the top {data['rows']['k']} keys of the row drawn"))
    fig.suptitle("\n".join(lines), fontsize=max(7.0, font + 1))
    axes = fig.subplots(len(layers), len(columns), squeeze=False)
    H, W = pic.shape[0], pic.shape[1]
    own = None if cls is not None and index == cls else divmod(index - first, gw)  # the focus patch
    for i, lay in enumerate(layers):
        for j, (title, h) in enumerate(columns):
            ax = axes[i][j]
            grid = grids[lay, h] if h is not None else rollout[lay]  # (gh, gw)
            top = float(grid.max())
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest",
                      extent=(0, W, H, 0))
            ax.imshow(grid / top if top > 0 else grid, cmap="inferno", vmin=0.0, vmax=1.0, alpha=OVERLAY_ALPHA,
                      interpolation="nearest", extent=(0, gw * P, gh * P, 0))
            if max(gh, gw) <= 32:  # the patch grid's lines
                ax.vlines([c * P for c in range(1, gw)], 0, gh * P, colors="white", linewidth=0.3, alpha=0.5)
                ax.hlines([r * P for r in range(1, gh)], 0, gw * P, colors="white", linewidth=0.3, alpha=0.5)
            if own is not None:
                ax.add_patch(Rectangle((own[1] * P, own[0] * P), P, P, fill=False, edgecolor="#00e5ff",
                                       linewidth=1.2))
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            name = f"L{lay} {title}" if title != "rollout" or h is not None else f"rollout to L{lay}"
            ax.set_title(f"{name} \u00b7 max {top:.3g}", fontsize=font)
            if j == 0:
                ax.set_ylabel(f"layer {lay}", fontsize=font)
