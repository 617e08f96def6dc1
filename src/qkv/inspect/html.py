"""One self-contained, offline HTML page for a `qkv explain` result ("qkv.explain/1" dict).

The page has a head view (queries on the left, keys on the right, a line from each word to
the words it attends to, thickness and opacity by weight; after bertviz, Vig 2019) and a
model view (a layers x heads grid of small heatmaps drawn on <canvas>). Everything is inline:
no script, style, font or image is fetched, and a Content-Security-Policy forbids any request,
so the file opens from disk with no network.

Safety: the data travels as JSON in a `<script type="application/json">` block with `<`, `>`,
`&`, U+2028 and U+2029 escaped, so text such as `</script>` cannot end the block; the page
shows every user string with `textContent`, never as markup.

    from qkv.inspect.html import render_html, write_html
    page = render_html(result.to_dict())      # str: the whole document
    write_html(result.to_dict(), "cat.html")  # atomic: temp file + os.replace
"""

from __future__ import annotations

import base64
import hashlib
import html as _html
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_html", "write_html"]

FORMAT = "qkv.explain/1"

# Weights are embedded with 6 significant digits: the page shows 3 decimals, and a 60-word,
# 6x12-head result stays near 2 MB instead of 4 (the JSON output keeps full precision).
_DIGITS = 6


# --------------------------------------------------------------------------- validation


def _check_data(data: Any) -> tuple[int, int, int]:
    """Check the parts of a "qkv.explain/1" dict that the renderers read.

    Returns (n labels, layers in maps, heads in maps). Raises ValueError (TypeError for a
    non-mapping) whose message names the field, what was found and what was expected.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"expected the dict of a qkv explain result (to_dict()), got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ValueError(f"expected data['format'] == {FORMAT!r}, got {fmt!r}")
    for key in ("labels", "maps", "head_names", "method", "level", "model", "text"):
        if key not in data:
            raise ValueError(f"the explain data has no {key!r} field (format {FORMAT})")
    labels = data["labels"]
    if not isinstance(labels, Sequence) or isinstance(labels, str) or len(labels) == 0:
        raise ValueError(f"data['labels'] must be a non-empty list of strings, got {labels!r:.80}")
    if not all(isinstance(s, str) for s in labels):
        raise ValueError("data['labels'] must contain only strings")
    n = len(labels)
    special = data.get("special")
    if special is not None and len(special) != n:
        raise ValueError(f"data['special'] has {len(special)} entries for {n} labels; give one bool per label")
    maps = _as_list(data["maps"])
    if len(maps) == 0:
        raise ValueError("data['maps'] is empty; expected maps[layer][head][query][key]")
    heads = len(_as_list(maps[0]))
    names = data["head_names"]
    if heads == 0 or len(names) != heads:
        raise ValueError(
            f"data['maps'][0] has {heads} heads but data['head_names'] has {len(names)}; "
            "give one name per head in maps"
        )
    for layer, per_layer in enumerate(maps):
        per_layer = _as_list(per_layer)
        if len(per_layer) != heads:
            raise ValueError(f"data['maps'][{layer}] has {len(per_layer)} heads, expected {heads} (as maps[0])")
        for head, amap in enumerate(per_layer):
            amap = _as_list(amap)
            if len(amap) != n or any(len(row) != n for row in amap):
                raise ValueError(
                    f"data['maps'][{layer}][{head}] must be {n} x {n} (one row and column per label), "
                    f"got {len(amap)} rows of lengths {sorted({len(r) for r in amap})[:4]}"
                )
    focus = data.get("focus")
    if focus is not None:
        index = focus.get("index")
        if not isinstance(index, int) or not 0 <= index < n:
            raise ValueError(f"data['focus']['index'] must be a label index in 0..{n - 1}, got {index!r}")
        per_layer = focus.get("per_layer")
        if per_layer is not None and (len(per_layer) != len(maps) or any(len(r) != n for r in per_layer)):
            raise ValueError(f"data['focus']['per_layer'] must be {len(maps)} rows of {n} weights")
    return n, len(maps), heads


def _as_list(x: Any) -> Any:
    """Lists pass through; numpy arrays and tensors become nested lists."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- JSON payload


def _maps_json(maps: Any) -> str:
    """maps[l][h][i][j] as compact JSON numbers with _DIGITS significant digits."""
    spec = f".{_DIGITS}g"
    layers = []
    for per_layer in _as_list(maps):
        heads = []
        for amap in _as_list(per_layer):
            rows = []
            for row in _as_list(amap):
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
            labels (n), maps[layer][head][query][key] (n x n each), head_names, focus, ...

    Returns:
        The document as a str (UTF-8 when written). It makes no network request.

    Raises:
        ValueError: the dict is not a well-formed "qkv.explain/1" result (the message says
            which field and what was expected).
    """
    _check_data(data)
    payload = _payload(data)
    # The <title> is one line: control characters and line separators become spaces.
    text = " ".join(_CONTROL.sub(" ", str(data.get("text", ""))).split())
    short = text if len(text) <= 80 else text[:79] + "\u2026"
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


def write_html(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render `data` (see render_html) and write it to `path` atomically.

    The page goes to a temporary file in the same directory, then os.replace puts it in
    place, so a reader never sees half a file.

    Returns:
        The path written.

    Raises:
        ValueError: malformed data.
        OSError: the path cannot be written (its message names the path and the reason).
    """
    page = render_html(data)
    target = Path(path)
    _atomic_write(target, page.encode("utf-8"), what="HTML")
    return target


def _check_target(target: Path, *, what: str) -> Path:
    """Fail early, naming the path, when target cannot be a file; returns its directory."""
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {what} to '{target}': it is a directory; give a file name")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {what} to '{target}': directory '{parent}' does not exist")
    return parent


def _atomic_write(target: Path, payload: bytes, *, what: str) -> None:
    """Write bytes to target through a temporary file in the same directory + os.replace."""
    parent = _check_target(target, what=what)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(e.errno, f"cannot write {what} to '{target}': {reason}", str(target)) from e
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


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
<header>
  <p class="kicker">qkv explain</p>
  <h1 id="title-text"></h1>
  <p id="meta" class="meta"></p>
  <p id="method-note" class="note"></p>
</header>
<noscript><p>This page draws attention maps with JavaScript; please enable it.</p></noscript>
<main>
  <section id="focus" class="panel" hidden aria-labelledby="focus-h">
    <h2 id="focus-h"></h2>
    <p class="note">Each row is one layer: the focus word's attention row, mean of heads. Click a row to show that layer.</p>
    <div class="scroll"><table id="focus-table"></table></div>
    <h3>Sharpest heads (lowest entropy of the focus row)</h3>
    <ol id="sharpest"></ol>
  </section>
  <div class="views">
    <section id="head-panel" class="panel" aria-labelledby="head-h">
      <h2 id="head-h">Head view</h2>
      <div class="controls">
        <label for="layer-select">Layer</label>
        <select id="layer-select"></select>
        <span class="label" id="head-picker-label">Head</span>
        <div id="head-picker" role="group" aria-labelledby="head-picker-label"></div>
      </div>
      <p class="note">Left: queries. Right: keys. Hover or click a word on the left to see where it looks;
        arrow keys move, Esc shows all rows. <span id="scale-note"></span></p>
      <p id="status" class="status" aria-live="polite"></p>
      <div id="head-view" data-selected="-1">
        <div id="queries" class="col q-col"></div>
        <canvas id="lines" aria-hidden="true"></canvas>
        <div id="keys" class="col k-col"></div>
      </div>
    </section>
    <section id="model-panel" class="panel" aria-labelledby="model-h">
      <h2 id="model-h">Model view</h2>
      <p class="note">Every layer and head, query rows down, key columns across (square-root colour scale). Click one to open it in the head view.</p>
      <div class="scroll"><div id="model-view"></div></div>
    </section>
  </div>
</main>
<footer class="note">Made by qkv. This file is self-contained and makes no network request.</footer>
<script type="application/json" id="qkv-data">@@DATA@@</script>
<script>@@SCRIPT@@</script>
</body>
</html>
"""

_STYLE = """
:root {
  --fg: #1d2330; --muted: #5b6474; --line: #d8dde6; --bg: #ffffff; --panel: #f7f8fa;
  --accent: #1f5fd6; --accent-soft: rgba(31, 95, 214, 0.14); --special: #8a93a3;
  --row: 22px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans",
    "Liberation Sans", "DejaVu Sans", sans-serif;
  color: var(--fg); background: var(--bg);
}
body { margin: 0 auto; padding: 16px 24px 32px; max-width: 1500px; font-size: 14px; line-height: 1.4; }
header { margin-bottom: 12px; }
.kicker { margin: 0; color: var(--muted); font-size: 12px; letter-spacing: 0.08em; text-transform: uppercase; }
h1 { margin: 2px 0 4px; font-size: 22px; font-weight: 600; overflow-wrap: anywhere; }
h2 { margin: 0 0 6px; font-size: 16px; }
h3 { margin: 12px 0 4px; font-size: 13px; color: var(--muted); font-weight: 600; }
.meta { margin: 0; color: var(--muted); }
.meta b { color: var(--fg); font-weight: 600; }
.note { margin: 4px 0 8px; color: var(--muted); font-size: 12.5px; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; margin-bottom: 14px; }
.views { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.views > .panel { margin-bottom: 0; }
#head-panel { flex: 0 1 auto; min-width: 0; max-width: 680px; }
#model-panel { flex: 1 1 380px; min-width: 0; }
.scroll { overflow: auto; max-width: 100%; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 10px; margin-bottom: 4px; }
.controls .label, .controls label { font-weight: 600; font-size: 13px; }
select, button { font: inherit; color: inherit; }
select { padding: 2px 6px; border: 1px solid var(--line); border-radius: 5px; background: #fff; }
#head-picker { display: flex; flex-wrap: wrap; gap: 4px; }
.head-btn { border: 1px solid var(--line); background: #fff; border-radius: 5px; padding: 1px 7px; cursor: pointer; font-size: 12.5px; min-width: 26px; }
.head-btn[aria-pressed="true"] { background: var(--accent); border-color: var(--accent); color: #fff; }
.head-btn:focus-visible, .word:focus-visible, .thumb:focus-visible, #sharpest button:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
/* Fixed height: hovering a word rewrites this line, and the words below must not move. */
.status { height: 2.8em; overflow: hidden; display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; margin: 2px 0 6px; font-size: 13px; }
#head-view { display: grid; grid-template-columns: minmax(60px, max-content) minmax(120px, 240px) minmax(60px, max-content); align-items: start; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 8px; width: max-content; max-width: 100%; overflow-x: auto; }
.col { display: flex; flex-direction: column; }
.word { display: block; height: var(--row); line-height: var(--row); padding: 0 6px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: 14em; border-radius: 4px; cursor: default; font-variant-numeric: tabular-nums; }
.word.q { text-align: right; cursor: pointer; }
.word.q:hover { background: var(--accent-soft); }
.word.q.sel { background: var(--accent); color: #fff; }
.word.q.dim { color: var(--special); }
.word.special { color: var(--special); font-style: italic; }
.word.q.sel.special { color: #fff; }
.word.k { display: flex; gap: 8px; justify-content: space-between; }
.word.k .t { overflow: hidden; text-overflow: ellipsis; }
.word.k .w { color: var(--muted); font-size: 12px; min-width: 3.2em; text-align: right; }
.word.k.top .t { font-weight: 700; }
.word.k.top .w { color: var(--fg); font-weight: 600; }
#lines { display: block; width: 100%; }
#model-view { display: grid; gap: 3px; align-items: center; width: max-content; }
#model-view .hdr { font-size: 11px; color: var(--muted); text-align: center; white-space: nowrap; }
#model-view .rowhdr { font-size: 11px; color: var(--muted); text-align: right; padding-right: 4px; white-space: nowrap; }
.thumb { padding: 0; border: 2px solid transparent; border-radius: 3px; background: #fff; cursor: pointer; line-height: 0; }
.thumb canvas { width: var(--thumb, 52px); height: var(--thumb, 52px); image-rendering: pixelated; display: block; box-shadow: 0 0 0 1px var(--line); }
.thumb.cur { border-color: var(--accent); }
.thumb:hover { border-color: #9db7ea; }
.thumb.cur:hover { border-color: var(--accent); }
#focus-table { border-collapse: collapse; font-size: 12px; font-variant-numeric: tabular-nums; }
#focus-table th { font-weight: 600; padding: 2px 4px; white-space: nowrap; max-width: 8em; overflow: hidden; text-overflow: ellipsis; }
#focus-table thead th { color: var(--fg); }
#focus-table thead th.special { color: var(--special); font-style: italic; }
#focus-table tbody th { text-align: right; color: var(--muted); }
#focus-table td { min-width: 2.6em; padding: 2px 4px; text-align: center; border: 1px solid #fff; }
#focus-table tbody tr { cursor: pointer; }
#focus-table tbody tr.cur th { color: var(--accent); }
#focus-table tbody tr:hover th { color: var(--fg); }
#sharpest { margin: 0; padding-left: 22px; }
#sharpest li { margin: 2px 0; }
#sharpest button { border: 1px solid var(--line); background: #fff; border-radius: 5px; padding: 0 6px; cursor: pointer; font-size: 12.5px; }
footer { margin-top: 16px; }
"""

# The page script. No user string is ever parsed as markup: labels and text go through
# textContent / title, and numbers through toFixed.
_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("qkv-data").textContent);
  var labels = data.labels, n = labels.length;
  var special = data.special || labels.map(function () { return false; });
  var maps = data.maps, L = maps.length, H = maps[0].length;
  var names = data.head_names;
  var normalised = !!data.normalised;
  var ROW = 22;
  var state = { layer: L - 1, head: H > 1 ? "mean" : 0, selected: -1, hover: -1 };
  if (data.focus && typeof data.focus.index === "number") state.selected = data.focus.index;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(w) { return w.toFixed(3); }
  function headName(h) { return h === "mean" ? "mean of heads" : "head " + names[h]; }

  var meanCache = {};
  function getMap(layer, head) {
    if (head !== "mean") return maps[layer][head];
    if (meanCache[layer]) return meanCache[layer];
    var out = [], i, j, h;
    for (i = 0; i < n; i++) {
      var row = new Array(n);
      for (j = 0; j < n; j++) {
        var s = 0;
        for (h = 0; h < H; h++) s += maps[layer][h][i][j];
        row[j] = s / H;
      }
      out.push(row);
    }
    meanCache[layer] = out;
    return out;
  }
  function rowScale(row) {
    // Normalised rows: intensity is the weight itself. Value norms: per-row max.
    if (normalised) return 1;
    var m = 0;
    for (var j = 0; j < row.length; j++) if (row[j] > m) m = row[j];
    return m > 0 ? 1 / m : 0;
  }
  function entropyOf(layer, h) {
    var e = data.entropy;
    return e && e[layer] && typeof e[layer][h] === "number" ? e[layer][h] : null;
  }

  // ---------------------------------------------------------------- header
  document.getElementById("title-text").textContent = "\u201c" + data.text + "\u201d";
  var meta = document.getElementById("meta");
  [["model", data.model], ["method", data.method], ["level", data.level],
   ["layers", String(L)], ["heads", String(H === 1 ? names[0] : H)], ["words", String(n)]].forEach(function (kv, idx) {
    if (idx) meta.appendChild(document.createTextNode(" \u00b7 "));
    meta.appendChild(document.createTextNode(kv[0] + " "));
    meta.appendChild(el("b", null, kv[1]));
  });
  var notes = {
    "raw": "Raw attention weights softmax(q\u00b7k/\u221ad) of each head; rows sum to 1.",
    "rollout": "Attention rollout (Abnar & Zuidema, 2020): mean of heads plus the residual identity, multiplied through the layers up to each layer.",
    "value-norm": "Value-weighted norms \u2016\u03b1\u00b7f(v)\u2016 (Kobayashi et al., 2020): how much each key's value moves the query, not normalised."
  };
  document.getElementById("method-note").textContent = notes[data.method] || "";
  document.getElementById("scale-note").textContent = normalised
    ? "Line opacity and thickness grow with the weight (square-root scale)."
    : "Weights are not normalised: lines and colours follow weight / row max.";

  // ---------------------------------------------------------------- head view
  var headView = document.getElementById("head-view");
  var qCol = document.getElementById("queries"), kCol = document.getElementById("keys");
  var canvas = document.getElementById("lines");
  var qSpans = [], kSpans = [], kW = [];
  labels.forEach(function (lab, i) {
    var q = el("span", "word q" + (special[i] ? " special" : ""), lab);
    q.dataset.index = String(i);
    q.title = lab;
    q.tabIndex = 0;
    q.setAttribute("role", "button");
    qCol.appendChild(q);
    qSpans.push(q);
    var k = el("span", "word k" + (special[i] ? " special" : ""));
    k.dataset.index = String(i);
    k.title = lab;
    k.appendChild(el("span", "t", lab));
    var w = el("span", "w", "");
    k.appendChild(w);
    kCol.appendChild(k);
    kSpans.push(k);
    kW.push(w);
  });

  var layerSelect = document.getElementById("layer-select");
  for (var l = 0; l < L; l++) {
    var opt = el("option", null, "layer " + l);
    opt.value = String(l);
    layerSelect.appendChild(opt);
  }
  layerSelect.addEventListener("change", function () { setView(parseInt(layerSelect.value, 10), state.head); });

  var picker = document.getElementById("head-picker");
  var headButtons = [];
  function addHeadButton(h, text) {
    var b = el("button", "head-btn", text);
    b.type = "button";
    b.id = "head-" + (h === "mean" ? "mean" : h);
    b.dataset.head = String(h);
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", function () { setView(state.layer, h); });
    picker.appendChild(b);
    headButtons.push(b);
  }
  if (H > 1) addHeadButton("mean", "mean of heads");
  for (var h0 = 0; h0 < H; h0++) addHeadButton(h0, names[h0]);

  function sizeCanvas() {
    var dpr = window.devicePixelRatio || 1;
    var cssW = canvas.clientWidth || 200, cssH = n * ROW;
    canvas.style.height = cssH + "px";
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return { ctx: ctx, w: cssW };
  }

  function drawLines(amap, active) {
    var c = sizeCanvas(), ctx = c.ctx, w = c.w, pad = 4;
    ctx.clearRect(0, 0, w, n * ROW);
    ctx.lineCap = "round";
    if (active >= 0) {
      var row = amap[active], s = rowScale(row);
      for (var j = 0; j < n; j++) {
        // Square root: a 0.05 weight stays visible next to a 0.6 one.
        var t = Math.sqrt(Math.min(1, row[j] * s));
        if (t < 0.07) continue;
        ctx.strokeStyle = "rgba(31, 95, 214, " + (0.12 + 0.88 * t).toFixed(3) + ")";
        ctx.lineWidth = 0.6 + 5 * t;
        ctx.beginPath();
        ctx.moveTo(pad, active * ROW + ROW / 2);
        ctx.lineTo(w - pad, j * ROW + ROW / 2);
        ctx.stroke();
      }
      return;
    }
    // All rows at once: bucket by weight so n*n lines cost a few dozen strokes.
    var BUCKETS = 12, paths = [];
    for (var b = 0; b < BUCKETS; b++) paths.push(new Path2D());
    for (var i = 0; i < n; i++) {
      var r = amap[i], sc = rowScale(r);
      for (var jj = 0; jj < n; jj++) {
        var tt = Math.sqrt(Math.min(1, r[jj] * sc));
        if (tt < 0.2) continue;
        var bi = Math.min(BUCKETS - 1, Math.floor(tt * BUCKETS));
        paths[bi].moveTo(pad, i * ROW + ROW / 2);
        paths[bi].lineTo(w - pad, jj * ROW + ROW / 2);
      }
    }
    for (var bb = 0; bb < BUCKETS; bb++) {
      var tb = (bb + 0.5) / BUCKETS;
      ctx.strokeStyle = "rgba(31, 95, 214, " + (0.05 + 0.55 * tb).toFixed(3) + ")";
      ctx.lineWidth = 0.5 + 2.5 * tb;
      ctx.stroke(paths[bb]);
    }
  }

  function heat(t) {
    // white -> accent blue
    t = Math.max(0, Math.min(1, t));
    return [Math.round(255 - t * (255 - 22)), Math.round(255 - t * (255 - 78)), Math.round(255 - t * (255 - 190))];
  }

  var statusEl = document.getElementById("status");
  function renderHeadView() {
    var amap = getMap(state.layer, state.head);
    var active = state.hover >= 0 ? state.hover : state.selected;
    headView.dataset.selected = String(state.selected);
    headView.dataset.shown = String(active);
    headView.dataset.layer = String(state.layer);
    headView.dataset.head = String(state.head);
    qSpans.forEach(function (q, i) {
      var on = i === state.selected;
      q.classList.toggle("sel", on);
      q.setAttribute("aria-pressed", on ? "true" : "false");
      q.classList.toggle("dim", active >= 0 && i !== active && !on);
    });
    if (active >= 0) {
      var row = amap[active], s = rowScale(row);
      var order = row.map(function (w, j) { return j; }).sort(function (a, b) { return row[b] - row[a]; });
      var top = {};
      order.slice(0, Math.min(3, n)).forEach(function (j) { if (row[j] > 0) top[j] = true; });
      for (var j = 0; j < n; j++) {
        var t = Math.min(1, row[j] * s), rgb = heat(t * 0.55);
        kSpans[j].style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        kSpans[j].dataset.weight = String(row[j]);
        kSpans[j].classList.toggle("top", !!top[j]);
        kW[j].textContent = fmt(row[j]);
      }
      var parts = order.slice(0, 3).filter(function (j) { return row[j] > 0; })
        .map(function (j) { return labels[j] + " " + fmt(row[j]); });
      statusEl.textContent = "Layer " + state.layer + ", " + headName(state.head) + ": \u201c" + labels[active] +
        "\u201d attends most to " + (parts.length ? parts.join(", ") : "nothing (an empty row)") + ".";
    } else {
      for (var k = 0; k < n; k++) {
        kSpans[k].style.backgroundColor = "";
        delete kSpans[k].dataset.weight;
        kSpans[k].classList.remove("top");
        kW[k].textContent = "";
      }
      statusEl.textContent = "Layer " + state.layer + ", " + headName(state.head) + ": all rows. Pick a word on the left.";
    }
    drawLines(amap, active);
  }

  function select(i) {
    state.selected = i;
    renderHeadView();
  }
  qSpans.forEach(function (q, i) {
    q.addEventListener("mouseenter", function () { state.hover = i; renderHeadView(); });
    q.addEventListener("mouseleave", function () { state.hover = -1; renderHeadView(); });
    q.addEventListener("click", function () { state.hover = -1; select(i); });
    q.addEventListener("keydown", function (ev) {
      var to = null;
      if (ev.key === "Enter" || ev.key === " ") to = i;
      else if (ev.key === "ArrowDown") to = Math.min(n - 1, i + 1);
      else if (ev.key === "ArrowUp") to = Math.max(0, i - 1);
      else if (ev.key === "Escape") { ev.preventDefault(); select(-1); return; }
      if (to === null) return;
      ev.preventDefault();
      select(to);
      qSpans[to].focus();
    });
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape" && state.selected >= 0) select(-1);
  });

  // ---------------------------------------------------------------- model view
  var mv = document.getElementById("model-view");
  var cols = H > 1 ? H + 1 : H;
  function fitThumbs() {
    // Fit the grid to the panel's width: row header ~56px, 7px of border and gap per thumb.
    var avail = (mv.parentElement.clientWidth || 600) - 60;
    var px = Math.max(24, Math.min(56, Math.floor(avail / cols) - 7));
    mv.style.setProperty("--thumb", px + "px");
  }
  fitThumbs();
  mv.style.gridTemplateColumns = "auto repeat(" + cols + ", max-content)";
  var thumbs = {};
  var headOrder = [];
  for (var hh = 0; hh < H; hh++) headOrder.push(hh);
  if (H > 1) headOrder.push("mean");
  mv.appendChild(el("span", "hdr", ""));
  headOrder.forEach(function (h) { mv.appendChild(el("span", "hdr", h === "mean" ? "mean" : names[h])); });
  var queue = [];
  for (var ly = 0; ly < L; ly++) {
    mv.appendChild(el("span", "rowhdr", "layer " + ly));
    headOrder.forEach(function (h) {
      var b = el("button", "thumb");
      b.type = "button";
      b.id = "thumb-" + ly + "-" + h;
      b.dataset.layer = String(ly);
      b.dataset.head = String(h);
      var e = h === "mean" ? null : entropyOf(ly, h);
      var label = "layer " + ly + ", " + headName(h) + (e === null ? "" : ", entropy " + e.toFixed(2) + " nats");
      b.title = label;
      b.setAttribute("aria-label", label);
      var cv = document.createElement("canvas");
      var m = Math.min(n, 128);
      cv.width = m; cv.height = m;
      b.appendChild(cv);
      (function (layer, head) {
        b.addEventListener("click", function () { setView(layer, head); document.getElementById("head-panel").scrollIntoView({ block: "nearest" }); });
      })(ly, h);
      mv.appendChild(b);
      thumbs[ly + ":" + h] = b;
      queue.push([cv, ly, h]);
    });
  }
  function drawThumb(cv, layer, head) {
    var amap = getMap(layer, head), m = cv.width;
    var ctx = cv.getContext("2d"), img = ctx.createImageData(m, m), px = img.data;
    var grid = new Float32Array(m * m);
    for (var i = 0; i < n; i++) {
      var row = amap[i], s = rowScale(row), gi = Math.floor(i * m / n) * m;
      for (var j = 0; j < n; j++) {
        var t = Math.sqrt(Math.min(1, row[j] * s)), g = gi + Math.floor(j * m / n);
        if (t > grid[g]) grid[g] = t; // max-pool when n > m
      }
    }
    for (var p = 0; p < m * m; p++) {
      var rgb = heat(grid[p]);
      px[4 * p] = rgb[0]; px[4 * p + 1] = rgb[1]; px[4 * p + 2] = rgb[2]; px[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  // Draw the thumbnails a few per frame so a large model never freezes the page.
  function drainQueue() {
    var t0 = Date.now();
    while (queue.length && Date.now() - t0 < 12) {
      var job = queue.shift();
      drawThumb(job[0], job[1], job[2]);
    }
    if (queue.length) window.requestAnimationFrame(drainQueue);
    else document.body.dataset.thumbs = "ready";
  }

  // ---------------------------------------------------------------- focus
  var focusRows = [];
  if (data.focus) {
    var f = data.focus, sec = document.getElementById("focus");
    sec.hidden = false;
    var fh = document.getElementById("focus-h");
    fh.textContent = "Focus: \u201c" + (f.label !== undefined ? f.label : labels[f.index]) + "\u201d, its row in every layer";
    var table = document.getElementById("focus-table");
    var thead = el("thead"), tr = el("tr");
    tr.appendChild(el("th", null, ""));
    labels.forEach(function (lab, j) {
      var th = el("th", special[j] ? "special" : null, lab);
      th.title = lab;
      th.scope = "col";
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    table.appendChild(thead);
    var tbody = el("tbody");
    var perLayer = f.per_layer || [];
    perLayer.forEach(function (row, ly2) {
      var r = el("tr"), s = rowScale(row);
      var th = el("th", null, "layer " + ly2);
      th.scope = "row";
      r.appendChild(th);
      row.forEach(function (wv, j) {
        var t = Math.min(1, wv * s), td = el("td", null, wv.toFixed(2));
        var rgb = heat(t);
        td.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        td.style.color = t > 0.55 ? "#fff" : "";
        td.title = "layer " + ly2 + ": " + labels[f.index] + " \u2192 " + labels[j] + " " + fmt(wv);
        r.appendChild(td);
      });
      r.addEventListener("click", function () { setView(ly2, H > 1 ? "mean" : 0); select(f.index); });
      tbody.appendChild(r);
      focusRows.push(r);
    });
    table.appendChild(tbody);
    var ol = document.getElementById("sharpest");
    (f.sharpest_heads || []).forEach(function (sh) {
      var li = el("li");
      var b = el("button", null, "layer " + sh.layer + ", head " + (names[sh.head] !== undefined ? names[sh.head] : sh.head));
      b.type = "button";
      b.addEventListener("click", function () {
        if (sh.head >= 0 && sh.head < H && sh.layer >= 0 && sh.layer < L) { setView(sh.layer, sh.head); select(f.index); }
      });
      li.appendChild(b);
      var tops = (sh.top || []).map(function (t) { return t.label + " " + Number(t.weight).toFixed(2); }).join(", ");
      li.appendChild(document.createTextNode(" entropy " + Number(sh.entropy).toFixed(2) + " nats: " + tops));
      ol.appendChild(li);
    });
  }

  // ---------------------------------------------------------------- view state
  function setView(layer, head) {
    state.layer = layer;
    state.head = head;
    layerSelect.value = String(layer);
    headButtons.forEach(function (b) {
      var on = b.dataset.head === String(head);
      b.setAttribute("aria-pressed", on ? "true" : "false");
      var e = b.dataset.head === "mean" ? null : entropyOf(layer, parseInt(b.dataset.head, 10));
      b.title = (b.dataset.head === "mean" ? "mean of heads" : "head " + names[parseInt(b.dataset.head, 10)]) +
        (e === null ? "" : ", entropy " + e.toFixed(2) + " nats");
    });
    Object.keys(thumbs).forEach(function (key) { thumbs[key].classList.toggle("cur", key === layer + ":" + head); });
    focusRows.forEach(function (r, i) { r.classList.toggle("cur", i === layer); });
    renderHeadView();
  }

  setView(state.layer, state.head);
  window.addEventListener("resize", function () { fitThumbs(); renderHeadView(); });
  window.requestAnimationFrame(drainQueue);
  document.body.dataset.ready = "true";
})();
"""
