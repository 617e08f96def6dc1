"""One self-contained, offline HTML page for a `qkv explain` result ("qkv.explain/1" dict).

The page has a head view (queries on the left, keys on the right, a line from each word to
the words it attends to, thickness and opacity by weight; after bertviz, Vig 2019) and a
model view (a layers x heads grid of small heatmaps drawn on <canvas>). Everything is inline:
no script, style, font or image is fetched, and a Content-Security-Policy forbids any request,
so the file opens from disk with no network.

An image result (data["modality"] == "image", `qkv.explain(image=...)`) adds an image panel above
those views: the picture (data["image"]["pixels"], a PNG data: URL, the only image source the
policy allows) with a heat overlay over its patch grid, the class token's attention by default,
a patch's when the mouse is over it, the prediction, and the focus's attention in every layer and
head. The image's name is user text like any other: escaped in <title>, shown with textContent.

Safety: the data travels as JSON in a `<script type="application/json">` block with `<`, `>`,
`&`, U+2028 and U+2029 escaped, so text such as `</script>` cannot end the block; the page
shows every user string with `textContent`, never as markup.

    from qkv.inspect.html import render_html, write_html
    page = render_html(result.to_dict())      # str: the whole document
    write_html(result.to_dict(), "cat.html")  # atomic: temp file + os.replace (qkv._files)
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import json
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .._files import write_text
from .schema import as_list, check_data

__all__ = ["render_html", "write_html"]

# Weights are embedded with 6 significant digits: the page shows 3 decimals, and a 60-word,
# 6x12-head result stays near 2 MB instead of 4 (the JSON output keeps full precision).
_DIGITS = 6


# --------------------------------------------------------------------------- JSON payload


def _maps_json(maps: Any) -> str:
    """maps[l][h][i][j] as compact JSON numbers with _DIGITS significant digits."""
    spec = f".{_DIGITS}g"
    layers = []
    for per_layer in as_list(maps):
        heads = []
        for amap in as_list(per_layer):
            rows = []
            for row in as_list(amap):
                cells = []
                for w in row:
                    w = float(w)
                    if not math.isfinite(w):
                        raise ValueError(f"data['maps'] holds a non-finite weight ({w}); weights must be finite")
                    cells.append(format(w, spec))
                rows.append("[" + ",".join(cells) + "]")
            heads.append("[" + ",".join(rows) + "]")
        layers.append("[" + ",".join(heads) + "]")
    return "[" + ",".join(layers) + "]"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _escape_json_for_script(text: str) -> str:
    """Make JSON text safe inside <script type="application/json">.

    The five characters only occur inside JSON strings, where \\uXXXX means the same
    character, so JSON.parse gives back the original strings.
    """
    for ch, esc in _JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


def _payload(data: Mapping[str, Any]) -> str:
    rest = {k: v for k, v in data.items() if k != "maps"}
    rest_json = json.dumps(rest, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default)
    if data.get("maps") is None:  # the compact view of a long input (view "rows"): no maps
        return _escape_json_for_script(rest_json)
    body = '{"maps":' + _maps_json(data["maps"]) + ("," + rest_json[1:] if rest_json != "{}" else "}")
    return _escape_json_for_script(body)


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot put {type(x).__name__} into the explain JSON")


# --------------------------------------------------------------------------- the page


def render_html(data: Mapping[str, Any]) -> str:
    """Return one self-contained HTML document showing a "qkv.explain/1" result.

    Args:
        data: the JSON-ready dict of an explain result (`to_dict()`), format "qkv.explain/1":
            labels (n), maps[layer][head][query][key] (n x n each), head_names, focus, ...; or
            the compact view of a long input (view "rows": no maps; summary (layers, heads),
            minimap (layers, n), rows.top[layer][head][row]), drawn as a layers x heads table of
            summaries, a strip per layer over the whole sequence and the shipped rows' top keys.
            An image result also has modality "image" and the image block (name, grid [rows,
            columns], patch P, size [H, W], pixels: a PNG data URL, first_patch, class_token,
            prediction), drawn as the picture with its patches' weights over it.

    Returns:
        The document as a str (UTF-8 when written). It makes no network request.

    Raises:
        ValueError: the dict is not a well-formed "qkv.explain/1" result (the message says
            which field and what was expected).
    """
    check_data(data)
    _check_picture(data)
    payload = _payload(data)
    # The <title> is one line: control characters and line separators become spaces.
    text = " ".join(_CONTROL.sub(" ", str(data.get("text", ""))).split())
    short = text if len(text) <= 80 else text[:79] + "\u2026"
    if data.get("modality") == "image":
        short = "image " + short
    script = _SCRIPT
    # Only this exact script may run: an injected inline script would be refused by the
    # browser even if escaping ever failed.
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (
        "default-src 'none'; "
        f"script-src 'sha256-{digest}'; "
        "style-src 'unsafe-inline'; "
        "img-src data: blob:; "
        "base-uri 'none'; form-action 'none'"
    )
    parts = {
        "CSP": _html.escape(csp, quote=False),  # the policy has no double quote
        "TITLE": _html.escape(f"qkv explain: {short}", quote=False),
        "STYLE": _STYLE,
        "SCRIPT": script,
        "DATA": payload,
    }
    # One pass, so a marker inside the user's text is never substituted.
    return re.sub(r"@@([A-Z]+)@@", lambda m: parts[m.group(1)], _TEMPLATE)


# The picture of an image result: a base64 PNG and nothing else (the schema checks the same), so the
# <img src> the page sets can never name a file or a network address.
_PICTURE = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]*")


def _check_picture(data: Mapping[str, Any]) -> None:
    image = data.get("image")
    if image is None:
        return
    pixels = image.get("pixels") if isinstance(image, Mapping) else None
    if not isinstance(pixels, str) or not _PICTURE.fullmatch(pixels):
        raise ValueError("data['image']['pixels'] must be a PNG data URL ('data:image/png;base64,...'); "
                         "build the dict with ExplainResult.to_dict()")


def write_html(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render `data` (see render_html) and write it to `path` atomically.

    Written by qkv's one writer (`qkv._files`): a temporary file beside the target, then
    os.replace, so a reader never sees half a file; a symbolic link is written through (it
    stays a link), and a target that is not a regular file (a directory, FIFO, device) is
    refused.

    Returns:
        The path written.

    Raises:
        ValueError: malformed data.
        OSError: the path cannot be written (a `qkv._files.FileWriteError`, whose message
            names the path and the reason).
    """
    page = render_html(data)
    target = Path(path)
    write_text(target, page, what="HTML")
    return target


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="@@CSP@@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="qkv explain">
<title>@@TITLE@@</title>
<style>@@STYLE@@</style>
</head>
<body>
<noscript><p>This page draws attention maps with JavaScript; please enable it.</p></noscript>
<div id="qkv-root" class="qkv-view"></div>
<footer class="note">Made by qkv. This file is self-contained and makes no network request.</footer>
<script type="application/json" id="qkv-data">@@DATA@@</script>
<script>@@SCRIPT@@</script>
</body>
</html>
"""


def _asset(name: str) -> str:
    """One of the drawing assets shared with the web page (qkv/inspect/assets/), as text."""
    return resources.files("qkv.inspect").joinpath("assets", name).read_text(encoding="utf-8")


# The styles and the page script live in assets/ so that `qkv serve` serves the very same
# files (one renderer, two uses); this page inlines them.
_STYLE = _asset("explain.css")
_SCRIPT = _asset("explain.js")
# Inlined into <script> and <style>: neither may contain text that would end its element early.
assert "</script" not in _SCRIPT.lower() and "<script" not in _SCRIPT.lower(), "explain.js must not contain script tags"
assert "</style" not in _STYLE.lower(), "explain.css must not contain </style>"
