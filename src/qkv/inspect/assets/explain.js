/* qkv explain: the drawing code shared by the offline HTML file (`qkv explain --html`, which
 * inlines this file) and the local web page (`qkv serve`, which serves it as
 * /static/explain.js).
 *
 *   QKV.mount(root, data, options) -> view
 *
 * builds a head view (after bertviz, Vig 2019), a model view (layers x heads heatmaps) and, when
 * data.focus is set, the focus table inside `root` from one "qkv.explain/1" dict. Element ids are
 * `options.prefix + name` (prefix "" in the offline file), so two views can share a page.
 * options.onChange(view state) is called after every selection; options.onReady() when every
 * thumbnail is drawn. The returned view has .state, .setView(layer, head) and .select(i).
 *
 * No user string is ever parsed as markup: labels and text go through textContent / title, and
 * numbers through toFixed. Colours are set through the CSSOM (element.style), which a
 * Content-Security-Policy without 'unsafe-inline' styles allows.
 *
 * When the document has a JSON data block with id "qkv-data" (the offline file), the data in it
 * is mounted into #qkv-root on load.
 */
(function (global) {
  "use strict";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(w) { return w.toFixed(3); }
  function heat(t) {
    // white -> accent blue
    t = Math.max(0, Math.min(1, t));
    return [Math.round(255 - t * (255 - 22)), Math.round(255 - t * (255 - 78)), Math.round(255 - t * (255 - 190))];
  }

  // The skeleton of one view. Every part gets id prefix+name and class name.
  function skeleton(root, P) {
    function part(tag, name, cls, text) {
      var e = el(tag, (name + (cls ? " " + cls : "")), text);
      e.id = P + name;
      return e;
    }
    var header = el("header");
    header.appendChild(el("p", "kicker", "qkv explain"));
    header.appendChild(part("h1", "title-text"));
    header.appendChild(part("p", "meta", "meta"));
    header.appendChild(part("p", "method-note", "note"));
    root.appendChild(header);

    var main = el("main");
    var focus = part("section", "focus", "panel");
    focus.hidden = true;
    focus.setAttribute("aria-labelledby", P + "focus-h");
    focus.appendChild(part("h2", "focus-h"));
    focus.appendChild(el("p", "note", "Each row is one layer: the focus word's attention row, mean of heads. Click a row to show that layer."));
    var fs = el("div", "scroll");
    fs.appendChild(part("table", "focus-table"));
    focus.appendChild(fs);
    focus.appendChild(el("h3", null, "Sharpest heads (lowest entropy of the focus row)"));
    focus.appendChild(part("ol", "sharpest"));
    main.appendChild(focus);

    var views = el("div", "views");
    var hp = part("section", "head-panel", "panel");
    hp.setAttribute("aria-labelledby", P + "head-h");
    hp.appendChild(part("h2", "head-h", null, "Head view"));
    var controls = el("div", "controls");
    var lab = el("label", null, "Layer");
    lab.htmlFor = P + "layer-select";
    controls.appendChild(lab);
    controls.appendChild(part("select", "layer-select"));
    controls.appendChild(part("span", "head-picker-label", "label", "Head"));
    var picker = part("div", "head-picker");
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-labelledby", P + "head-picker-label");
    controls.appendChild(picker);
    hp.appendChild(controls);
    var note = el("p", "note", "Left: queries. Right: keys. Hover or click a word on the left to see where it looks; " +
      "arrow keys move, Esc shows all rows. ");
    note.appendChild(part("span", "scale-note"));
    hp.appendChild(note);
    var status = part("p", "status", "status");
    status.setAttribute("aria-live", "polite");
    hp.appendChild(status);
    var hv = part("div", "head-view");
    hv.dataset.selected = "-1";
    hv.appendChild(part("div", "queries", "col q-col"));
    var cv = part("canvas", "lines");
    cv.setAttribute("aria-hidden", "true");
    hv.appendChild(cv);
    hv.appendChild(part("div", "keys", "col k-col"));
    hp.appendChild(hv);
    hp.appendChild(part("h3", "attended-h", null, "Attended by"));
    hp.appendChild(part("div", "attended", "attended"));
    views.appendChild(hp);

    var mp = part("section", "model-panel", "panel");
    mp.setAttribute("aria-labelledby", P + "model-h");
    mp.appendChild(part("h2", "model-h", null, "Model view"));
    mp.appendChild(el("p", "note", "Every layer and head, query rows down, key columns across (square-root colour scale). " +
      "Click one to open it in the head view."));
    var ms = el("div", "scroll");
    ms.appendChild(part("div", "model-view"));
    mp.appendChild(ms);
    views.appendChild(mp);
    main.appendChild(views);
    root.appendChild(main);
  }

  function mount(root, data, options) {
    options = options || {};
    var P = options.prefix || "";
    while (root.firstChild) root.removeChild(root.firstChild);
    skeleton(root, P);
    function $(name) { return root.querySelector("#" + P + name); }

    var labels = data.labels, n = labels.length;
    var special = data.special || labels.map(function () { return false; });
    var maps = data.maps, L = maps.length, H = maps[0].length;
    var names = data.head_names;
    var normalised = !!data.normalised;
    var ROW = 22;
    var state = { layer: L - 1, head: H > 1 ? "mean" : 0, selected: -1, hover: -1 };
    if (data.focus && typeof data.focus.index === "number") state.selected = data.focus.index;
    function headName(h) { return h === "mean" ? "mean of heads" : "head " + names[h]; }
    // How each layer attended (the optional data.attention): its sliding window ("global" beside
    // windowed layers) and score_mod, e.g. "window (3, 0), soft_cap(cap=50.0)"; "" for nothing.
    var attn = Array.isArray(data.attention) && data.attention.length === L ? data.attention : null;
    var windowed = !!attn && attn.some(function (a) { return a && Array.isArray(a.window); });
    function layerNote(l) {
      var a = attn && attn[l], parts = [];
      if (!a) return "";
      if (windowed) {
        parts.push(Array.isArray(a.window) ? "window (" + a.window.map(function (x) {
          return x === null ? "\u221e" : String(x);
        }).join(", ") + ")" : "global");
      }
      if (typeof a.score_mod === "string" && a.score_mod) parts.push(a.score_mod);
      return parts.join(", ");
    }
    function layerName(l) { var note = layerNote(l); return "layer " + l + (note ? " (" + note + ")" : ""); }

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

    // -------------------------------------------------------------- header
    $("title-text").textContent = "\u201c" + data.text + "\u201d";
    var meta = $("meta");
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
    $("method-note").textContent = notes[data.method] || "";
    $("scale-note").textContent = normalised
      ? "Line opacity and thickness grow with the weight (square-root scale)."
      : "Weights are not normalised: lines and colours follow weight / row max.";

    // -------------------------------------------------------------- head view
    var headView = $("head-view");
    var qCol = $("queries"), kCol = $("keys");
    var canvas = $("lines");
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

    var layerSelect = $("layer-select");
    for (var l = 0; l < L; l++) {
      var opt = el("option", null, layerName(l));
      opt.value = String(l);
      layerSelect.appendChild(opt);
    }
    layerSelect.addEventListener("change", function () { setView(parseInt(layerSelect.value, 10), state.head); });

    var picker = $("head-picker");
    var headButtons = [];
    function addHeadButton(h, text) {
      var b = el("button", "head-btn", text);
      b.type = "button";
      b.id = P + "head-" + (h === "mean" ? "mean" : h);
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

    // What attends to the active word: its column, one chip per query word.
    var attended = $("attended"), attendedH = $("attended-h");
    function renderAttended(amap, active) {
      while (attended.firstChild) attended.removeChild(attended.firstChild);
      attended.dataset.index = String(active);
      if (active < 0) {
        attendedH.textContent = "Attended by";
        attended.appendChild(el("span", "note", "Pick a word to see which words attend to it."));
        return;
      }
      attendedH.textContent = "What attends to \u201c" + labels[active] + "\u201d (its column)";
      var col = amap.map(function (row) { return row[active]; });
      var m = 0;
      col.forEach(function (v) { if (v > m) m = v; });
      col.forEach(function (v, i) {
        var chip = el("span", "chip" + (special[i] ? " special" : ""));
        chip.dataset.index = String(i);
        chip.dataset.weight = String(v);
        chip.title = labels[i] + " \u2192 " + labels[active] + " " + fmt(v);
        chip.appendChild(el("span", "t", labels[i]));
        chip.appendChild(el("span", "w", fmt(v)));
        var rgb = heat((normalised ? v : (m > 0 ? v / m : 0)) * 0.55);
        chip.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        attended.appendChild(chip);
      });
    }

    var statusEl = $("status");
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
        statusEl.textContent = "L" + layerName(state.layer).slice(1) + ", " + headName(state.head) + ": \u201c" + labels[active] +
          "\u201d attends most to " + (parts.length ? parts.join(", ") : "nothing (an empty row)") + ".";
      } else {
        for (var k = 0; k < n; k++) {
          kSpans[k].style.backgroundColor = "";
          delete kSpans[k].dataset.weight;
          kSpans[k].classList.remove("top");
          kW[k].textContent = "";
        }
        statusEl.textContent = "L" + layerName(state.layer).slice(1) + ", " + headName(state.head) + ": all rows. Pick a word on the left.";
      }
      drawLines(amap, active);
      renderAttended(amap, active);
    }

    function changed() {
      if (options.onChange) options.onChange({ layer: state.layer, head: state.head, selected: state.selected });
    }
    function select(i) {
      state.selected = i;
      renderHeadView();
      changed();
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
    root.addEventListener("keydown", function (ev) {
      if (ev.key === "Escape" && state.selected >= 0) select(-1);
    });
    if (options.escapeOnDocument) {
      document.addEventListener("keydown", function (ev) {
        if (ev.key === "Escape" && state.selected >= 0 && !root.contains(ev.target)) select(-1);
      });
    }

    // -------------------------------------------------------------- model view
    var mv = $("model-view");
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
      var rowhdr = el("span", "rowhdr", "layer " + ly);
      if (layerNote(ly)) rowhdr.title = layerName(ly);
      mv.appendChild(rowhdr);
      headOrder.forEach(function (h) {
        var b = el("button", "thumb");
        b.type = "button";
        b.id = P + "thumb-" + ly + "-" + h;
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
          b.addEventListener("click", function () { setView(layer, head); $("head-panel").scrollIntoView({ block: "nearest" }); });
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
      else {
        root.dataset.thumbs = "ready";
        if (options.onReady) options.onReady();
      }
    }

    // -------------------------------------------------------------- focus
    var focusRows = [];
    if (data.focus) {
      var f = data.focus, sec = $("focus");
      sec.hidden = false;
      $("focus-h").textContent = "Focus: \u201c" + (f.label !== undefined ? f.label : labels[f.index]) + "\u201d, its row in every layer";
      var table = $("focus-table");
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
      var ol = $("sharpest");
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

    // -------------------------------------------------------------- view state
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
      changed();
    }

    // -------------------------------------------------------------- cross-attention
    // Encoder-decoder models: each cross-attention layer as an alignment table, target words
    // (what the decoder wrote) over source words, mean of heads.
    if (data.cross && data.cross.maps && data.cross.maps.length) {
      var cx = data.cross, cross = el("section", "cross panel");
      cross.id = P + "cross";
      cross.appendChild(el("h2", null, "Cross-attention: target words over source words"));
      cross.appendChild(el("p", "note", "Each row is a word the decoder wrote, each column a source word; " +
        "mean of heads. A reordering shows as weight off the diagonal."));
      var crossSelect = el("select");
      crossSelect.id = P + "cross-layer";
      crossSelect.setAttribute("aria-label", "cross-attention layer");
      cx.layers.forEach(function (ly, i) {
        var o = el("option", null, "layer " + ly);
        o.value = String(i);
        crossSelect.appendChild(o);
      });
      cross.appendChild(crossSelect);
      var crossWrap = el("div", "scroll"), crossTable = el("table", "cross-table");
      crossTable.id = P + "cross-table";
      crossWrap.appendChild(crossTable);
      cross.appendChild(crossWrap);
      var drawCross = function (i) {
        while (crossTable.firstChild) crossTable.removeChild(crossTable.firstChild);
        var heads = cx.maps[i], hr = el("tr");
        hr.appendChild(el("th", null, ""));
        cx.source.forEach(function (w) { var th = el("th", null, w); th.scope = "col"; hr.appendChild(th); });
        crossTable.appendChild(hr);
        cx.target.forEach(function (word, t) {
          var r = el("tr"), th = el("th", null, word);
          th.scope = "row";
          r.appendChild(th);
          cx.source.forEach(function (_, j) {
            var w = 0;
            for (var h = 0; h < heads.length; h++) w += heads[h][t][j];
            w /= heads.length;
            var td = el("td", null, w.toFixed(2)), rgb = heat(Math.sqrt(w));
            td.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
            if (w > 0.45) td.style.color = "#fff";
            td.dataset.weight = String(w);
            r.appendChild(td);
          });
          crossTable.appendChild(r);
        });
      };
      crossSelect.addEventListener("change", function () { drawCross(parseInt(crossSelect.value, 10)); });
      crossSelect.value = String(cx.layers.length - 1);
      drawCross(cx.layers.length - 1);
      var mainEl = root.querySelector("main");
      mainEl.insertBefore(cross, mainEl.firstChild);
    }

    setView(state.layer, state.head);
    var onResize = function () { fitThumbs(); renderHeadView(); };
    window.addEventListener("resize", onResize);
    window.requestAnimationFrame(drainQueue);
    root.dataset.ready = "true";
    return {
      state: state, setView: setView, select: select, labels: labels, heads: H, layers: L,
      destroy: function () { window.removeEventListener("resize", onResize); }
    };
  }

  global.QKV = { mount: mount, heat: heat, el: el };

  // The offline file: its data block is mounted at once.
  var block = document.getElementById("qkv-data");
  var target = document.getElementById("qkv-root");
  if (block && target) {
    mount(target, JSON.parse(block.textContent), {
      escapeOnDocument: true,
      onReady: function () { document.body.dataset.thumbs = "ready"; }
    });
    document.body.dataset.ready = "true";
  }
})(window);
