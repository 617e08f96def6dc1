"""`qkv explain` results in Jupyter: IPython's rich display protocol (`_repr_html_`, `_repr_png_`).

An `ExplainResult` left as the last expression of a notebook cell shows itself:

- text/html: the very page of `qkv explain --html` (`qkv.inspect.html.render_html`), inside an
  `<iframe srcdoc="...">` sandboxed with `allow-scripts` only. The frame is the isolation: the
  page's element ids (`#qkv-root`, `#keys`, ...), its script state and its
  Content-Security-Policy stay inside its own document, so two results in one notebook never
  clash, and the notebook's styles and scripts cannot reach in. The sandbox gives the page an
  opaque origin: it cannot read the notebook, its cookies or its server. Nothing is loaded
  from anywhere: script, style and data are inline, and the page's policy forbids requests.
- image/png: the picture of `qkv explain --png` (`qkv.inspect.png.render_png_bytes`) where
  matplotlib is installed, else none. Frontends show the page when they may run it and fall
  back to the picture where they may not (an untrusted notebook in JupyterLab, nbviewer,
  GitHub's preview).

This follows IPython's display protocol (IPython.core.formatters: a `_repr_<mime>_` method
returns the data, or None for "no such representation"). The peer, bertviz (Vig 2019), writes
its script into the notebook's own page and loads require.js and d3 from a CDN; the frame
needs neither, and works offline in any frontend that runs HTML outputs.

    r = qkv.explain("The cat sat on the mat.", focus="cat")
    r                                                    # the page (and the PNG)
    from qkv.inspect.notebook import view
    view(r, focus="cat", method="rollout")               # the same, with to_dict's options
"""

from __future__ import annotations

import html as _html
import re
from typing import Any, Optional

from .html import render_html
from .rows import answer_bytes

__all__ = ["repr_html", "repr_png", "view", "View", "MAX_PAGE_BYTES"]

# The page embeds every weight (about 8 bytes each): 6 layers x 12 heads of 60 words is ~2 MB.
# Larger outputs make notebooks slow to save and open, and trip Jupyter's output rate limit
# (iopub_data_rate_limit), so beyond this the output is a note saying how to see the page.
MAX_PAGE_BYTES = 4_000_000
_BYTES_PER_WEIGHT = 8  # 6 significant digits and a comma, on average

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TO_DICT = ("method", "level", "hide_special", "focus", "layer", "head", "rows", "top_k")


def repr_html(result, *, max_bytes: Optional[int] = MAX_PAGE_BYTES, **options: Any) -> str:
    """The notebook's HTML for an explain result: its offline page in a sandboxed frame.

    Args:
        result: an `ExplainResult` (what `qkv.explain` returns).
        max_bytes: the largest page embedded (default MAX_PAGE_BYTES, 4 MB); a larger result
            gives a short note naming its size and how to see it instead. None: no limit.
        **options: `result.to_dict` options: method ("raw", "rollout", "value-norm"), level
            ("word", "token"), hide_special, focus (a word or index), layer, head (the
            layer and head shown first), rows, top_k (a long input's compact view, as
            `to_dict` gives it by default; docs/explain.md, "Long inputs").

    Returns:
        An HTML fragment: one `<iframe>` whose `srcdoc` holds the whole page, escaped as an
        attribute value (html.escape with quote=True), or the note (`<div class="qkv-note">`)
        for a result too large.

    Raises:
        TypeError: `result` is not an ExplainResult, or an unknown option.
        ValueError: a bad option value (an unknown method, a focus word not in the text, ...).
    """
    _check("repr_html", result, options, max_bytes)
    level = options.get("level", "word")
    hide = bool(options.get("hide_special", False))
    n = len(result.labels(level, hide))
    heads = 1 if options.get("method") == "rollout" else result.num_heads
    compact = result.compact_view(level, hide) if options.get("rows") is None else options.get("rows") != "all"
    if compact:  # a long input (or rows='focus'): the compact page, linear in the length
        estimate = answer_bytes(n, result.num_layers, heads, "rows")
    else:
        estimate = result.num_layers * heads * n * n * _BYTES_PER_WEIGHT
    if max_bytes is not None and estimate > max_bytes:
        return _note(
            f"The page for \u201c{_short(result.text)}\u201d would be about {_size(estimate)} "
            f"({n} {level}s, {result.num_layers} layers x {heads} heads of {n} x {n} weights), more than "
            f"the {_size(max_bytes)} a notebook output is allowed here. Write it to a file and open that: "
            "result.save_html('page.html'); or explain fewer layers (qkv.explain(..., layers=[...])); or show it "
            "anyway with qkv.inspect.notebook.view(result, max_bytes=None)."
        )
    page = render_html(result.to_dict(**options))
    title = " ".join(_CONTROL.sub(" ", f"qkv explain: {result.text}").split())
    # Height: the head view grows by one row (~26 px) per word; at a notebook's width the 9 words
    # of "The cat sat on the mat." make a page ~1,100 px tall (the model view last). The frame
    # scrolls inside, and can be dragged taller (resize).
    height = min(960, 700 + 28 * n)
    return (
        f'<iframe class="qkv-explain" sandbox="allow-scripts" title="{_html.escape(title, quote=True)}" '
        f'style="width: 100%; height: {height}px; border: 1px solid #d9dde5; border-radius: 6px; '
        f'resize: vertical; overflow: auto;" srcdoc="{_html.escape(page, quote=True)}"></iframe>'
    )


def repr_png(result, **options: Any) -> Optional[bytes]:
    """The notebook's PNG for an explain result, or None where matplotlib is not installed.

    Args:
        result: an `ExplainResult`.
        **options: as in `repr_html` (layer and head also choose the token-by-token map).

    Returns:
        The PNG file's bytes (`qkv explain --png`'s picture; a long input's compact view), or None
        without matplotlib.
    """
    _check("repr_png", result, options)
    try:
        import matplotlib  # noqa: F401  (the optional dependency: pip install 'qkv[viz]')
    except ImportError:
        return None
    from .png import render_png_bytes

    return render_png_bytes(result.to_dict(**options), layer=options.get("layer"), head=options.get("head"))


class View:
    """An explain result with display options, shown by Jupyter as `repr_html`/`repr_png` draw it.

    Build it with `view(result, **options)`.
    """

    def __init__(self, result, max_bytes: Optional[int] = MAX_PAGE_BYTES, **options: Any):
        _check("View", result, options, max_bytes)
        self.result, self.max_bytes, self.options = result, max_bytes, options

    def _repr_html_(self) -> str:
        return repr_html(self.result, max_bytes=self.max_bytes, **self.options)

    def _repr_png_(self) -> Optional[bytes]:
        return repr_png(self.result, **self.options)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"View({_short(self.result.text, 40)!r}{', ' if shown else ''}{shown})"


def view(result, *, max_bytes: Optional[int] = MAX_PAGE_BYTES, **options: Any) -> View:
    """`result` shown with options: `view(r, focus="cat", method="rollout", layer=5, head=11)`.

    Args:
        result: an `ExplainResult`.
        max_bytes: as in `repr_html` (None: embed a page of any size).
        **options: `result.to_dict` options (method, level, hide_special, focus, layer, head).

    Returns:
        A `View`, which a notebook displays as the page (and the PNG).
    """
    shown = View(result, max_bytes=max_bytes, **options)
    if result.rows is None:
        result.to_dict(**options)  # a bad option value (a focus word not in the text, ...) fails now, not at display
    return shown


def _check(who: str, result, options: dict, max_bytes: Optional[int] = MAX_PAGE_BYTES) -> None:
    # what an ExplainResult has (checked by shape: explain.py imports this module for its _repr_ methods)
    if not all(hasattr(result, name) for name in ("to_dict", "records", "rows", "tokens")):
        raise TypeError(f"{who} shows an ExplainResult (what qkv.explain returns); got {type(result).__name__}")
    unknown = sorted(set(options) - set(_TO_DICT))
    if unknown:
        raise TypeError(f"{who}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(_TO_DICT)}"
                        + (" and max_bytes" if who != "repr_png" else ""))
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"{who}: max_bytes must be a positive int or None (no limit); got {max_bytes!r}")


def _note(text: str) -> str:
    return ('<div class="qkv-note" style="padding: 8px 12px; border: 1px solid #d9dde5; border-radius: 6px;">'
            f"{_html.escape(text, quote=True)}</div>")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n} bytes"


def _short(text: str, limit: int = 60) -> str:
    s = " ".join(_CONTROL.sub(" ", str(text)).split())
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"
