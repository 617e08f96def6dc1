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
 * An image result (data.modality "image", `qkv.explain(image=...)`) gets an image panel above the
 * views: QKV.mountImage, see "images" below for its DOM contract. QKV.mountRows(root, data, options)
 * mounts the compact view of a long input ("rows" view) directly.
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
  // the header's count of units: words (or tokens) of a text; an image's patches and its class token
  function unitCount(data, n) {
    if (!data.image) return [data.level === "token" ? "tokens" : "words", String(n)];
    var g = data.image.grid;
    return ["patches", g[1] + "\u00d7" + g[0] + (data.image.class_token == null ? "" : " + class token")];
  }
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
    if (data.image && data.modality === "image" && !options.noImage) return mountImage(root, data, options);
    if (data.view === "rows" || !data.maps) return mountRows(root, data, options);
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
    [["model", data.model], ["method", data.method]].concat(data.image ? [] : [["level", data.level]]).concat([
     ["layers", String(L)], ["heads", String(H === 1 ? names[0] : H)], unitCount(data, n)]).forEach(function (kv, idx) {
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

  // ================================================================ the compact view
  // A long input's "qkv.explain/1" dict with view "rows" (docs/explain.md, "Long inputs") has no
  // maps: per layer/head summaries, a minimap of the whole sequence (layers x n), the focus row
  // per layer, and the top keys of a few shipped rows. The page draws those; it never makes one
  // DOM node per label (a 4k-token text has 4k labels): the sequence is drawn on canvases, and
  // only the top keys and a few words around the chosen row are text. With options.fetchRows
  // (the web page), any other row is fetched when it is chosen:
  //   options.fetchRows({layers: [l, ...], head: h, rows: [r]}) -> Promise of a "qkv.weights/1"
  //   dict, weights (layers, 1, 1, n).

  // The k largest weights of a full row, largest first, and the exact total and count of the
  // others above 0 (as the core's rows.top_keys).
  function topKeys(row, k) {
    var best = [], total = 0, live = 0, i;
    for (i = 0; i < row.length; i++) {
      var w = row[i];
      total += w;
      if (!(w > 0)) continue;
      live++;
      if (best.length < k || w > row[best[best.length - 1]]) {
        var p = best.length;
        while (p > 0 && row[best[p - 1]] < w) p--;
        best.splice(p, 0, i);
        if (best.length > k) best.pop();
      }
    }
    var kept = 0;
    best.forEach(function (j) { kept += row[j]; });
    return { keys: best, weights: best.map(function (j) { return row[j]; }), rest: Math.max(0, total - kept),
             left_out: live - best.length };
  }

  // Draw `values` (n numbers) on a strip canvas as wide as its box: one pixel column holds the
  // largest value of its units (a lone peak among 8k keys stays visible); colour ~ sqrt(v / max).
  function drawStrip(cv, values, marks) {
    var dpr = window.devicePixelRatio || 1;
    var cssW = Math.max(50, cv.clientWidth || (cv.parentElement && cv.parentElement.clientWidth) || 600);
    var cssH = cv.clientHeight || 14;
    var w = Math.max(1, Math.round(cssW * dpr)), h = Math.max(1, Math.round(cssH * dpr));
    cv.width = w; cv.height = h;
    var ctx = cv.getContext("2d"), n = values.length, img = ctx.createImageData(w, h), px = img.data;
    var max = 0, i, x;
    for (i = 0; i < n; i++) if (values[i] > max) max = values[i];
    var col = new Float32Array(w);
    for (i = 0; i < n; i++) {
      var x0 = Math.floor(i * w / n), x1 = Math.max(x0 + 1, Math.floor((i + 1) * w / n));
      for (x = x0; x < x1 && x < w; x++) if (values[i] > col[x]) col[x] = values[i];
    }
    for (x = 0; x < w; x++) {
      var rgb = heat(max > 0 ? Math.sqrt(col[x] / max) : 0);
      for (var y = 0; y < h; y++) {
        var p = 4 * (y * w + x);
        px[p] = rgb[0]; px[p + 1] = rgb[1]; px[p + 2] = rgb[2]; px[p + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    (marks || []).forEach(function (m) {
      if (m.index < 0 || m.index >= n) return;
      ctx.fillStyle = m.color;
      var mx = Math.floor((m.index + 0.5) * w / n);
      ctx.fillRect(Math.max(0, mx - dpr), 0, Math.max(2, 2 * dpr), h);
    });
  }
  // The unit under a click or the mouse on a strip of n units.
  function stripIndex(cv, ev, n) {
    var box = cv.getBoundingClientRect();
    var x = (ev.clientX - box.left) / Math.max(1, box.width);
    return Math.max(0, Math.min(n - 1, Math.floor(x * n)));
  }

  function mountRows(root, data, options) {
    var P = options.prefix || "";
    while (root.firstChild) root.removeChild(root.firstChild);
    function part(tag, name, cls, text) {
      var e = el(tag, (name + (cls ? " " + cls : "")), text);
      e.id = P + name;
      return e;
    }
    var labels = data.labels, n = labels.length;
    var special = data.special || labels.map(function () { return false; });
    var names = data.head_names, H = names.length;
    var top = data.rows.top, L = top.length, shipped = data.rows.index, K = data.rows.k || 8;
    var focus = data.focus && typeof data.focus.index === "number" ? data.focus : null;
    var fetchRows = options.fetchRows || null;
    var startRow = focus && (fetchRows || shipped.indexOf(focus.index) >= 0) ? focus.index : shipped[0];
    var state = { layer: L - 1, head: 0, selected: startRow, mode: "row",
                  metric: "entropy", mapMetric: "received" };
    var full = {}; // "layer:head:row" -> the whole row (fetched)
    var seq = 0;
    var FOCUS_MARK = "rgba(29, 35, 48, 0.9)", ROW_MARK = "rgba(214, 60, 31, 0.95)";
    function headName(h) { return names[h] === "rollout" ? "rollout" : "head " + names[h]; }
    function quoted(i) { return "\u201c" + labels[i] + "\u201d"; }

    // -------------------------------------------------------------- header
    var header = el("header");
    header.appendChild(el("p", "kicker", "qkv explain \u00b7 " + (data.image ? "compact view" : "long input")));
    // A long text would fill screens as a title: its start, and the whole text folded below.
    var TITLE_CHARS = 160;
    var shortText = data.text.length > TITLE_CHARS ? data.text.slice(0, TITLE_CHARS).replace(/\s+\S*$/, "") + " \u2026"
                                                   : data.text;
    header.appendChild(part("h1", "title-text", "long-title", "\u201c" + shortText + "\u201d"));
    if (shortText !== data.text) {
      var fold = el("details", "full-text");
      fold.appendChild(el("summary", null, "the whole text (" + data.text.length.toLocaleString("en-US") +
                                           " characters)"));
      fold.appendChild(el("p", "full-text-body", data.text));
      header.appendChild(fold);
    }
    var meta = part("p", "meta", "meta");
    [["model", data.model], ["method", data.method]].concat(data.image ? [] : [["level", data.level]]).concat([
     ["layers", String(L)], ["heads", String(H === 1 ? names[0] : H)], unitCount(data, n)]).forEach(function (kv, idx) {
      if (idx) meta.appendChild(document.createTextNode(" \u00b7 "));
      meta.appendChild(document.createTextNode(kv[0] + " "));
      meta.appendChild(el("b", null, kv[1]));
    });
    header.appendChild(meta);
    var om = data.omitted || {};
    header.appendChild(part("p", "compact-note", "note",
      (data.image ? "A compact view" : "A long input") + ": this view holds the summaries of every layer and head, the whole sequence as a minimap, and the top " +
      K + " keys of " + shipped.length + " of " + n + " rows with the exact weight of the keys left out" +
      (typeof om.weights === "number" ? " (" + om.weights.toLocaleString("en-US") + " weights not shipped)" : "") + ". " +
      (fetchRows ? "Pick any row on the minimap or by number: the page fetches it from the server."
                 : "Other rows are not in this file: open the text in qkv serve, or explain with --rows all.")));
    root.appendChild(header);
    var main = el("main", "rows-main");
    root.appendChild(main);

    // -------------------------------------------------------------- summaries: layers x heads
    var sum = data.summary;
    var sp = part("section", "summary-panel", "panel");
    sp.appendChild(el("h2", null, "Layers and heads"));
    var sumControls = el("div", "controls");
    var metricLabel = el("label", null, "Colour by");
    metricLabel.htmlFor = P + "summary-metric";
    sumControls.appendChild(metricLabel);
    var metricSel = part("select", "summary-metric");
    [["entropy", "entropy (nats): low = focused"], ["distance", "distance: how far back it looks"],
     ["sink", "sink: weight on the first word"]].forEach(function (m) {
      var o = el("option", null, m[1]);
      o.value = m[0];
      metricSel.appendChild(o);
    });
    sumControls.appendChild(metricSel);
    sp.appendChild(sumControls);
    var sumWrap = el("div", "scroll"), sumTable = part("table", "summary-table", "focus-table summary-table");
    sumWrap.appendChild(sumTable);
    sp.appendChild(sumWrap);
    var sumCells = [];
    function drawSummary() {
      while (sumTable.firstChild) sumTable.removeChild(sumTable.firstChild);
      sumCells = [];
      if (!sum) {
        sp.appendChild(el("p", "note", "No summaries: only the focus word's rows were recorded (rows focus)."));
        metricSel.disabled = true;
        return;
      }
      var m = sum[state.metric], width = m[0].length, hi = 0;
      m.forEach(function (r) { r.forEach(function (v) { if (v > hi) hi = v; }); });
      var tr = el("tr");
      tr.appendChild(el("th", null, ""));
      for (var h = 0; h < width; h++) tr.appendChild(el("th", null, width === H ? names[h] : String(h)));
      var thead = el("thead");
      thead.appendChild(tr);
      sumTable.appendChild(thead);
      var tbody = el("tbody");
      m.forEach(function (row, l) {
        var r = el("tr"), th = el("th", null, "layer " + l);
        th.scope = "row";
        r.appendChild(th);
        row.forEach(function (v, h) {
          var td = el("td", "cell", v.toFixed(2)), t = hi > 0 ? v / hi : 0;
          td.id = P + "cell-" + l + "-" + h;
          td.dataset.layer = String(l);
          td.dataset.head = String(h);
          td.dataset.value = String(v);
          td.title = "layer " + l + ", head " + h + ": " + state.metric + " " + v.toFixed(3);
          var rgb = heat(t);
          td.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
          td.style.color = t > 0.55 ? "#fff" : "";
          td.addEventListener("click", function () { setView(l, width === H ? h : state.head); });
          r.appendChild(td);
          sumCells.push(td);
        });
        tbody.appendChild(r);
      });
      sumTable.appendChild(tbody);
      markSummary();
    }
    function markSummary() {
      sumCells.forEach(function (td) {
        td.classList.toggle("cur", td.dataset.layer === String(state.layer) && td.dataset.head === String(state.head));
      });
    }
    metricSel.addEventListener("change", function () { state.metric = metricSel.value; drawSummary(); });
    main.appendChild(sp);

    // -------------------------------------------------------------- minimap: the whole sequence
    var mm = data.minimap;
    var mp = part("section", "minimap-panel", "panel");
    mp.appendChild(el("h2", null, "The whole sequence"));
    var mmControls = el("div", "controls");
    var mmLabel = el("label", null, "Show");
    mmLabel.htmlFor = P + "minimap-metric";
    mmControls.appendChild(mmLabel);
    var mmSel = part("select", "minimap-metric");
    [["received", "weight each word receives (mean of heads and rows)"], ["entropy", "entropy of each word's row"]]
      .forEach(function (m) { var o = el("option", null, m[1]); o.value = m[0]; mmSel.appendChild(o); });
    mmControls.appendChild(mmSel);
    mp.appendChild(mmControls);
    mp.appendChild(el("p", "note", "One strip per layer, the first word on the left, the last on the right. " +
      "Click a place to show that word's row below" + (fetchRows ? "" : " (rows of this file only)") +
      ". Red: the row shown; black: the focus word."));
    var mmBox = part("div", "minimap", "minimap");
    var mmStrips = [];
    var mmStatus = part("p", "minimap-status", "status");
    mmStatus.setAttribute("aria-live", "polite");
    if (mm) {
      for (var ml = 0; ml < L; ml++) {
        mmBox.appendChild(el("span", "rowhdr", "layer " + ml));
        var cv = part("canvas", "minimap-" + ml, "strip");
        cv.dataset.layer = String(ml);
        cv.setAttribute("role", "img");
        cv.setAttribute("aria-label", "layer " + ml + ": the whole sequence of " + n + " words");
        (function (layer, c) {
          c.addEventListener("click", function (ev) {
            var i = stripIndex(c, ev, n);
            state.layer = layer;
            pick(i);
          });
          c.addEventListener("mousemove", function (ev) {
            var i = stripIndex(c, ev, n);
            mmStatus.textContent = "layer " + layer + ", word " + i + " " + quoted(i) + ": " +
              (state.mapMetric === "received" ? "receives " : "row entropy ") + fmt(mm[state.mapMetric][layer][i]);
          });
        })(ml, cv);
        mmBox.appendChild(cv);
        mmStrips.push(cv);
      }
    } else {
      mmBox.appendChild(el("p", "note", "No minimap: only the focus word's rows were recorded (rows focus)."));
    }
    mp.appendChild(mmBox);
    mp.appendChild(mmStatus);
    mmSel.addEventListener("change", function () { state.mapMetric = mmSel.value; drawMinimap(); });
    function marks() {
      var out = [];
      if (focus) out.push({ index: focus.index, color: FOCUS_MARK });
      if (state.selected >= 0) out.push({ index: state.selected, color: ROW_MARK });
      return out;
    }
    function drawMinimap() {
      if (!mm) return;
      mmStrips.forEach(function (c, l) { drawStrip(c, mm[state.mapMetric][l], marks()); });
    }
    main.appendChild(mp);

    // -------------------------------------------------------------- the focus word, every layer
    var focusStrips = [], fp = null;
    if (focus) {
      fp = part("section", "focus", "panel");
      fp.appendChild(part("h2", "focus-h", null, "Focus: " + quoted(focus.index) + " (word " + focus.index +
        "), its row in every layer"));
      fp.appendChild(el("p", "note", "Each strip is one layer: the focus word's attention row, mean of heads. " +
        "Click a strip to show that layer's row below."));
      var fbox = el("div", "minimap");
      (focus.per_layer || []).forEach(function (row, l) {
        fbox.appendChild(el("span", "rowhdr", "layer " + l));
        var c = part("canvas", "focus-strip-" + l, "strip");
        c.dataset.layer = String(l);
        c.addEventListener("click", function () { state.layer = l; pick(focus.index); });
        fbox.appendChild(c);
        focusStrips.push([c, row]);
      });
      fp.appendChild(fbox);
      fp.appendChild(el("h3", null, "Sharpest heads (lowest entropy of the focus row)"));
      var ol = part("ol", "sharpest", "sharpest");
      (focus.sharpest_heads || []).forEach(function (sh) {
        var li = el("li");
        var hpos = names.indexOf(String(sh.head));
        var b = el("button", null, "layer " + sh.layer + ", head " + sh.head);
        b.type = "button";
        b.addEventListener("click", function () {
          if (sh.layer >= 0 && sh.layer < L) { state.mode = "row"; setView(sh.layer, hpos >= 0 ? hpos : state.head); pick(focus.index); }
        });
        li.appendChild(b);
        var tops = (sh.top || []).map(function (t) { return t.label + " " + Number(t.weight).toFixed(2); }).join(", ");
        li.appendChild(document.createTextNode(" entropy " + Number(sh.entropy).toFixed(2) + " nats: " + tops));
        ol.appendChild(li);
      });
      fp.appendChild(ol);
    }
    function drawFocus() {
      focusStrips.forEach(function (fs) { drawStrip(fs[0], fs[1], [{ index: focus.index, color: FOCUS_MARK }]); });
    }

    // -------------------------------------------------------------- one row: its top keys
    var rp = part("section", "row-panel", "panel");
    rp.appendChild(part("h2", "row-h", null, "One row: where a word looks"));
    var rc = el("div", "controls");
    var ll = el("label", null, "Layer");
    ll.htmlFor = P + "layer-select";
    rc.appendChild(ll);
    var layerSelect = part("select", "layer-select");
    for (var l0 = 0; l0 < L; l0++) {
      var lo = el("option", null, "layer " + l0);
      lo.value = String(l0);
      layerSelect.appendChild(lo);
    }
    rc.appendChild(layerSelect);
    rc.appendChild(part("span", "head-picker-label", "label", "Head"));
    var picker = part("div", "head-picker");
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-labelledby", P + "head-picker-label");
    var headButtons = names.map(function (nm, h) {
      var b = el("button", "head-btn", nm);
      b.type = "button";
      b.id = P + "head-" + h;
      b.dataset.head = String(h);
      b.addEventListener("click", function () { setView(state.layer, h); });
      picker.appendChild(b);
      return b;
    });
    rc.appendChild(picker);
    rp.appendChild(rc);
    var rc2 = el("div", "controls");
    var rl = el("label", null, "Row (word number)");
    rl.htmlFor = P + "row-input";
    rc2.appendChild(rl);
    var rowInput = part("input", "row-input", "row-input");
    rowInput.type = "number";
    rowInput.min = "0";
    rowInput.max = String(n - 1);
    rc2.appendChild(rowInput);
    var rowGo = part("button", "row-go", "head-btn", "Show");
    rowGo.type = "button";
    rc2.appendChild(rowGo);
    var prev = part("button", "row-prev", "head-btn", "\u2190 previous");
    prev.type = "button";
    var next = part("button", "row-next", "head-btn", "next \u2192");
    next.type = "button";
    rc2.appendChild(prev);
    rc2.appendChild(next);
    var rowSelect = part("select", "row-select");
    rowSelect.setAttribute("aria-label", "rows in this view");
    var o0 = el("option", null, "rows in this view\u2026");
    o0.value = "";
    rowSelect.appendChild(o0);
    shipped.forEach(function (i) {
      var o = el("option", null, "word " + i + " " + quoted(i) + (focus && i === focus.index ? " (focus)" : ""));
      o.value = String(i);
      rowSelect.appendChild(o);
    });
    rc2.appendChild(rowSelect);
    var modeLabel = el("label", "check");
    var modeBox = part("input", "mode-focus");
    modeBox.type = "checkbox";
    modeBox.disabled = !focus;
    modeLabel.appendChild(modeBox);
    modeLabel.appendChild(document.createTextNode(" focus rows: the focus word in every layer"));
    rc2.appendChild(modeLabel);
    rp.appendChild(rc2);
    var rowStatus = part("p", "row-status", "status");
    rowStatus.setAttribute("aria-live", "polite");
    rp.appendChild(rowStatus);
    var rowView = part("div", "row-view", "row-view");
    rp.appendChild(rowView);
    main.appendChild(rp);
    if (fp) main.appendChild(fp); // below the row: the minimap and the row it picks stay together

    rowGo.addEventListener("click", function () { goTo(rowInput.value); });
    rowInput.addEventListener("keydown", function (ev) { if (ev.key === "Enter") { ev.preventDefault(); goTo(rowInput.value); } });
    rowSelect.addEventListener("change", function () { if (rowSelect.value !== "") { state.mode = "row"; pick(parseInt(rowSelect.value, 10)); } });
    prev.addEventListener("click", function () { if (state.selected > 0) pick(state.selected - 1); });
    next.addEventListener("click", function () { if (state.selected < n - 1) pick(state.selected + 1); });
    modeBox.addEventListener("change", function () {
      state.mode = modeBox.checked ? "focus" : "row";
      if (state.mode === "focus") pick(focus.index); else renderRows();
    });
    layerSelect.addEventListener("change", function () { setView(parseInt(layerSelect.value, 10), state.head); });
    function goTo(value) {
      var i = Number(value);
      if (String(value).trim() === "" || !isFinite(i) || Math.floor(i) !== i || i < 0 || i >= n) {
        rowStatus.textContent = "A row is a word number from 0 to " + (n - 1) + ".";
        return;
      }
      state.mode = "row";
      pick(i);
    }

    // What is known of one row now: fetched whole, or its top keys from the file, or nothing.
    function known(layer, head, row) {
      var f = full[layer + ":" + head + ":" + row];
      if (f) { var t = topKeys(f, K); t.full = f; t.source = "fetched"; return t; }
      var at = shipped.indexOf(row);
      if (at >= 0) {
        var s = top[layer][head][at];
        return { keys: s.keys, weights: s.weights, rest: s.rest, left_out: s.left_out, full: null, source: "shipped" };
      }
      return null;
    }
    function rowLayers() {
      if (state.mode !== "focus") return [state.layer];
      var all = [];
      for (var l = 0; l < L; l++) all.push(l);
      return all;
    }
    function renderRows() { strips = []; renderRowsNow(); drawRowStrips(); }
    function renderRowsNow() {
      var row = state.selected, layers = rowLayers();
      modeBox.checked = state.mode === "focus";
      rowInput.value = row >= 0 ? String(row) : "";
      rowSelect.value = shipped.indexOf(row) >= 0 ? String(row) : "";
      while (rowView.firstChild) rowView.removeChild(rowView.firstChild);
      rowView.dataset.row = String(row);
      rowView.dataset.head = String(state.head);
      rowView.dataset.layer = String(state.layer);
      rowView.dataset.mode = state.mode;
      if (row < 0) { rowView.dataset.state = "ready"; return; }
      var ctx = el("p", "row-context");
      ctx.id = P + "row-context";
      var a = Math.max(0, row - 8), b = Math.min(n, row + 9);
      if (a > 0) ctx.appendChild(document.createTextNode("\u2026 "));
      for (var i = a; i < b; i++) {
        ctx.appendChild(el(i === row ? "b" : "span", special[i] ? "special" : null, labels[i]));
        ctx.appendChild(document.createTextNode(" "));
      }
      if (b < n) ctx.appendChild(document.createTextNode("\u2026"));
      rowView.appendChild(ctx);
      var missing = [];
      layers.forEach(function (l) {
        var k = known(l, state.head, row);
        if (!k || !k.full) missing.push(l);
        rowView.appendChild(rowBlock(l, state.head, row, k));
      });
      var what = "word " + row + " " + quoted(row) + ", " + headName(state.head) +
        (state.mode === "focus" ? ", every layer" : ", layer " + state.layer);
      if (fetchRows && missing.length) {
        rowView.dataset.state = "loading";
        rowStatus.textContent = what + ": fetching\u2026";
        var my = ++seq, head = state.head;
        fetchRows({ layers: missing, head: head, rows: [row] }).then(function (w) {
          missing.forEach(function (l, i) { full[l + ":" + head + ":" + row] = w.weights[i][0][0]; });
          if (my === seq) renderRows();
        }, function (err) {
          if (my !== seq) return;
          rowView.dataset.state = "error";
          rowStatus.textContent = what + ": " + (err && err.message ? err.message : "the server did not answer");
        });
        return;
      }
      rowView.dataset.state = "ready";
      var k0 = known(state.layer, state.head, row);
      rowStatus.textContent = what + (k0 ? ": attends most to " + k0.keys.slice(0, 3).map(function (j, x) {
        return quoted(j) + " " + fmt(k0.weights[x]);
      }).join(", ") + "." : ": this row is not in this file (it holds " + shipped.map(function (i) {
        return "word " + i;
      }).join(", ") + ").");
    }
    function rowBlock(layer, head, row, k) {
      var blk = el("div", "row-block");
      blk.dataset.layer = String(layer);
      blk.dataset.head = String(head);
      blk.dataset.row = String(row);
      blk.dataset.source = k ? k.source : "none";
      blk.appendChild(el("h3", null, "layer " + layer + ", " + headName(head) + ": word " + row + " " + quoted(row)));
      if (!k) {
        blk.appendChild(el("p", "note", fetchRows ? "Fetching\u2026" :
          "Not in this file: it ships the top keys of " + shipped.length + " row(s); explain this word as the focus, or open the text in qkv serve."));
        return blk;
      }
      var cv = el("canvas", "strip row-strip");
      cv.setAttribute("role", "img");
      cv.setAttribute("aria-label", "the row over the whole sequence");
      blk.appendChild(cv);
      var values = k.full;
      if (!values) { values = new Array(n).fill(0); k.keys.forEach(function (j, x) { values[j] = k.weights[x]; }); }
      var sum0 = 0;
      values.forEach(function (v) { sum0 += v; });
      if (k.full) blk.dataset.sum = String(sum0);
      strips.push([cv, values, row]);
      cv.addEventListener("click", function (ev) { pick(stripIndex(cv, ev, n)); });
      var ol = el("ol", "row-top");
      k.keys.forEach(function (j, x) {
        var li = el("li", "chip" + (special[j] ? " special" : ""));
        li.dataset.index = String(j);
        li.dataset.weight = String(k.weights[x]);
        li.title = labels[row] + " \u2192 " + labels[j] + " (word " + j + ") " + fmt(k.weights[x]);
        li.appendChild(el("span", "t", labels[j]));
        li.appendChild(el("span", "pos", "#" + j));
        li.appendChild(el("span", "w", fmt(k.weights[x])));
        var rgb = heat(Math.sqrt(Math.min(1, k.weights[x])) * 0.55);
        li.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        ol.appendChild(li);
      });
      blk.appendChild(ol);
      blk.dataset.rest = String(k.rest);
      blk.dataset.leftOut = String(k.left_out);
      blk.appendChild(el("p", "note row-rest", "the other keys: " + k.left_out.toLocaleString("en-US") +
        " with weight above 0, " + fmt(k.rest) + " in all" + (k.full ? "" : " (exact, from the file)")));
      return blk;
    }
    var strips = [];
    function drawRowStrips() {
      strips = strips.filter(function (s) { return s[0].isConnected; });
      strips.forEach(function (s) { drawStrip(s[0], s[1], [{ index: s[2], color: ROW_MARK }]); });
    }

    // -------------------------------------------------------------- view state
    function changed() {
      if (options.onChange) options.onChange({ layer: state.layer, head: state.head, selected: state.selected, mode: state.mode });
    }
    function refresh() {
      layerSelect.value = String(state.layer);
      headButtons.forEach(function (b) { b.setAttribute("aria-pressed", b.dataset.head === String(state.head) ? "true" : "false"); });
      markSummary();
      renderRows();
      drawMinimap();
    }
    function setView(layer, head) {
      state.layer = Math.max(0, Math.min(L - 1, layer));
      state.head = typeof head === "number" && head >= 0 && head < H ? head : 0;
      refresh();
      changed();
    }
    function pick(i) {
      state.selected = i;
      if (state.mode === "focus" && (!focus || i !== focus.index)) state.mode = "row";
      refresh();
      changed();
    }
    drawSummary();
    refresh();
    drawFocus();
    var onResize = function () { drawMinimap(); drawFocus(); drawRowStrips(); };
    window.addEventListener("resize", onResize);
    window.requestAnimationFrame(function () {
      onResize();
      root.dataset.thumbs = "ready";
      if (options.onReady) options.onReady();
    });
    root.dataset.ready = "true";
    root.dataset.view = "rows";
    return {
      state: state, setView: setView, select: pick, labels: labels, heads: H, layers: L, compact: true,
      setMode: function (mode) { if (mode === "focus" && focus) { state.mode = "focus"; pick(focus.index); } else { state.mode = "row"; refresh(); } },
      destroy: function () { window.removeEventListener("resize", onResize); }
    };
  }

  // ================================================================ images
  // An image result (data.modality "image", data.image: the picture as a PNG data URL, the patch
  // grid, the patch side, first_patch = the label index of patch (0, 0), class_token = the class
  // token's label index or null when hidden, the prediction). mountImage mounts the usual view
  // (head view and model view, or the compact view) and puts an image panel above it: the picture
  // with a heat overlay of one unit's attention row over the patches, for the current layer and
  // head (or mean of heads, or rollout). By default the unit is the class token; hovering a patch
  // makes that patch the focus. DOM contract (qkv serve's tests rely on it):
  //   .qkv-image                 the panel
  //   img.qkv-image-picture      the picture
  //   .qkv-patch                 one per patch: data-unit (label index), data-row, data-col and
  //                              data-weight (the weight drawn on it, 4 decimals; absent when the
  //                              focus row is not known)
  //   .qkv-image-focus           names the focus: "[CLS] (class token)" or "r1c2 (row 1, column 2)"
  //   .qkv-image-cls             a button: the class token becomes the focus again
  // Full view: rows come from data.maps[layer][head][row]; compact view (data.view "rows"): from
  // data.rows (for an image every key is shipped, so a shipped row is whole), and a row not shipped
  // is asked of options.fetchRows when given (as mountRows does).
  var IMAGE_SIDE = 288; // CSS pixels of the picture's longer side

  function mountImage(root, data, options) {
    var P = options.prefix || "";
    var im = data.image, labels = data.labels, n = labels.length;
    var gr = im.grid[0], gc = im.grid[1], patch = im.patch, first = im.first_patch;
    var cls = typeof im.class_token === "number" ? im.class_token : null;
    var imgH = im.size[0], imgW = im.size[1];
    var compact = data.view === "rows" || !data.maps;
    var names = data.head_names, H = names.length, L = compact ? data.rows.top.length : data.maps.length;
    var normalised = !!data.normalised;
    var fetchRows = compact ? (options.fetchRows || null) : null;
    var canRollout = !compact && data.method === "raw" && cls !== null;

    var panel = null; // set once built: the base view's onChange may fire while it mounts
    var syncing = false;
    var baseOptions = {};
    Object.keys(options).forEach(function (k) { baseOptions[k] = options[k]; });
    baseOptions.noImage = true;
    baseOptions.onChange = function (st) {
      if (panel && !syncing) panel.follow(st);
      if (options.onChange) options.onChange(st);
    };
    var base = mount(root, data, baseOptions);

    function unitOf(r, c) { return first + r * gc + c; }
    function patchOf(unit) { var k = unit - first; return [Math.floor(k / gc), k % gc]; }
    function isPatch(unit) { return unit >= first && unit < first + gr * gc; }
    function unitName(unit) {
      if (unit === cls) return labels[unit] + " (class token)";
      var rc = patchOf(unit);
      return labels[unit] + " (row " + rc[0] + ", column " + rc[1] + ")";
    }
    function focusWords(unit) { return unit === cls ? "class token" : "patch " + unitName(unit); }

    var focus0 = data.focus && typeof data.focus.index === "number" ? data.focus.index : (cls !== null ? cls : first);
    if (compact && !options.fetchRows && data.rows.index.indexOf(focus0) < 0) {
      // Start on a unit whose row is in the file (hide_special ships other rows than the class token's).
      var firstShipped = data.rows.index.filter(function (i) { return i === cls || (i >= first && i < first + gr * gc); })[0];
      if (firstShipped !== undefined) focus0 = firstShipped;
    }
    var st = {
      layer: L - 1,
      head: !compact && H > 1 ? "mean" : 0,
      method: data.method,
      focus: focus0
    };
    if (compact && H > 1) st.head = "mean";
    st.layer = base.state.layer;

    // -------------------------------------------------------------- rows
    var meanRows = {}, rollout = null, full = {}, pending = {}, failed = {}, seq = 0;
    var shipped = compact ? data.rows.index : null;
    function shippedRow(layer, head, unit) {
      var at = shipped.indexOf(unit);
      if (at < 0) return null;
      var s = data.rows.top[layer][head][at], row = new Array(n).fill(0);
      s.keys.forEach(function (j, x) { row[j] = s.weights[x]; });
      row.partial = s.left_out > 0;
      return row;
    }
    function headRow(layer, head, unit) {
      if (!compact) return data.maps[layer][head][unit];
      return full[layer + ":" + head + ":" + unit] || shippedRow(layer, head, unit);
    }
    function computeRollout() {
      // rollout (Abnar & Zuidema, 2020) of the raw maps: R_l = A~_l R_{l-1}, A~ = (mean of heads + I) / 2,
      // rows renormalised; as qkv.inspect.analysis.rollout. R: (L, n, n) as arrays of rows.
      var out = [], cur = null, l, i, j, k, h;
      for (l = 0; l < L; l++) {
        var a = [];
        for (i = 0; i < n; i++) {
          var row = new Array(n), sum = 0;
          for (j = 0; j < n; j++) {
            var s = 0;
            for (h = 0; h < H; h++) s += data.maps[l][h][i][j];
            row[j] = 0.5 * s / H + (i === j ? 0.5 : 0);
            sum += row[j];
          }
          for (j = 0; j < n; j++) row[j] = sum > 0 ? row[j] / sum : 0;
          a.push(row);
        }
        if (cur === null) cur = a;
        else {
          var next = [];
          for (i = 0; i < n; i++) {
            var r = new Array(n).fill(0), ai = a[i];
            for (k = 0; k < n; k++) {
              var w = ai[k];
              if (w === 0) continue;
              var ck = cur[k];
              for (j = 0; j < n; j++) r[j] += w * ck[j];
            }
            next.push(r);
          }
          cur = next;
        }
        out.push(cur);
      }
      return out;
    }
    // The focus unit's row (n weights) at a layer and head ("mean": mean of heads) under the
    // current method, or null when it is not known (compact view, a row not shipped).
    function rowAt(layer, head, unit, method) {
      if (method === "rollout" && data.method !== "rollout") {
        if (!rollout) rollout = computeRollout();
        return rollout[layer][unit];
      }
      if (head !== "mean") return headRow(layer, head, unit);
      var key = layer + ":" + unit;
      if (meanRows[key]) return meanRows[key];
      var out = new Array(n).fill(0), partial = false;
      for (var h = 0; h < H; h++) {
        var r = headRow(layer, h, unit);
        if (!r) return null;
        if (r.partial) partial = true;
        for (var j = 0; j < n; j++) out[j] += r[j] / H;
      }
      out.partial = partial;
      if (!compact || full[layer + ":0:" + unit] || shipped.indexOf(unit) >= 0) meanRows[key] = out;
      return out;
    }
    function known(unit) { return rowAt(st.layer, st.head, unit, st.method) !== null; }
    function fetchUnit(unit) {
      // Every layer of the row, for each head the mean needs (or the one head shown).
      var heads = st.head === "mean" ? names.map(function (_, h) { return h; }) : [st.head];
      var layers = [];
      for (var l = 0; l < L; l++) layers.push(l);
      var key = unit + ":" + heads.join(",");
      if (pending[key]) return;
      pending[key] = true;
      delete failed[unit];
      var my = ++seq;
      Promise.all(heads.map(function (h) {
        return fetchRows({ layers: layers, head: h, rows: [unit] }).then(function (w) {
          layers.forEach(function (l, i) { full[l + ":" + h + ":" + unit] = w.weights[i][0][0]; });
        });
      })).then(function () {
        delete pending[key];
        if (st.focus === unit) render();
      }, function (err) {
        delete pending[key];
        failed[unit] = err && err.message ? err.message : "the server did not answer";
        if (st.focus === unit && my === seq) render();
      });
    }

    // -------------------------------------------------------------- the panel
    function part(tag, name, cls2, text) {
      var e = el(tag, "qkv-" + name + (cls2 ? " " + cls2 : ""), text);
      e.id = P + name;
      return e;
    }
    var sec = part("section", "image", "panel");
    sec.setAttribute("aria-labelledby", P + "image-h");
    sec.dataset.view = compact ? "rows" : "full";
    sec.appendChild(part("h2", "image-h", null, "The image: where a unit looks"));
    var controls = el("div", "controls");
    var ml = el("label", null, "Method");
    ml.htmlFor = P + "image-method";
    controls.appendChild(ml);
    var methodSel = part("select", "image-method");
    var methods = [[data.method, data.method === "raw" ? "raw weights" : data.method]];
    if (canRollout) methods.push(["rollout", "rollout (from the raw weights)"]);
    methods.forEach(function (m) { var o = el("option", null, m[1]); o.value = m[0]; methodSel.appendChild(o); });
    methodSel.disabled = methods.length < 2;
    controls.appendChild(methodSel);
    var ll = el("label", null, "Layer");
    ll.htmlFor = P + "image-layer";
    controls.appendChild(ll);
    var layerSel = part("select", "image-layer");
    for (var l0 = 0; l0 < L; l0++) { var lo = el("option", null, "layer " + l0); lo.value = String(l0); layerSel.appendChild(lo); }
    controls.appendChild(layerSel);
    controls.appendChild(part("span", "image-head-label", "label", "Head"));
    var picker = part("div", "image-heads", "head-picker");
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-labelledby", P + "image-head-label");
    var headBtns = [];
    function headButton(h, text) {
      var b = el("button", "head-btn qkv-image-head", text);
      b.type = "button";
      b.id = P + "image-head-" + h;
      b.dataset.head = String(h);
      b.addEventListener("click", function () { setView(st.layer, h); });
      picker.appendChild(b);
      headBtns.push(b);
    }
    if (H > 1) headButton("mean", "mean of heads");
    for (var h0 = 0; h0 < H; h0++) headButton(h0, names[h0]);
    controls.appendChild(picker);
    var ol = el("label", null, "Overlay");
    ol.htmlFor = P + "image-opacity";
    controls.appendChild(ol);
    var opacity = part("input", "image-opacity");
    opacity.type = "range";
    opacity.min = "0";
    opacity.max = "100";
    opacity.value = "78";
    opacity.title = "how strongly the weights cover the picture";
    opacity.addEventListener("input", function () { render(); });
    controls.appendChild(opacity);
    sec.appendChild(controls);

    var body = el("div", "qkv-image-body");
    var left = el("div", "qkv-image-left");
    var scale = IMAGE_SIDE / Math.max(imgH, imgW);
    var stage = el("div", "qkv-image-stage");
    stage.style.width = Math.round(imgW * scale) + "px";
    stage.style.height = Math.round(imgH * scale) + "px";
    var img = el("img", "qkv-image-picture");
    img.id = P + "image-picture";
    img.src = im.pixels;
    img.alt = "the image " + im.name + " at the model's size, " + imgW + "x" + imgH + " pixels";
    img.title = im.name;
    img.draggable = false;
    stage.appendChild(img);
    var cells = [];
    for (var r = 0; r < gr; r++) {
      for (var c = 0; c < gc; c++) {
        var u = unitOf(r, c), cell = el("div", "qkv-patch");
        cell.dataset.unit = String(u);
        cell.dataset.row = String(r);
        cell.dataset.col = String(c);
        cell.tabIndex = -1;
        cell.setAttribute("role", "button");
        cell.setAttribute("aria-label", "patch " + unitName(u));
        cell.style.left = (c * patch * scale) + "px";
        cell.style.top = (r * patch * scale) + "px";
        cell.style.width = (patch * scale) + "px";
        cell.style.height = (patch * scale) + "px";
        (function (unit, row, col) {
          cell.addEventListener("mouseenter", function () { setFocus(unit); });
          cell.addEventListener("focus", function () { setFocus(unit); });
          // A click also picks the patch in the view below (its head view or row panel).
          // (and asks again for a row whose fetch failed)
          cell.addEventListener("click", function () {
            if (failed[unit]) { delete failed[unit]; if (st.focus === unit) render(); }
            setFocus(unit);
            pickBelow(unit);
          });
          cell.addEventListener("keydown", function (ev) {
            var to = null;
            if (ev.key === "ArrowRight") to = col < gc - 1 ? unitOf(row, col + 1) : null;
            else if (ev.key === "ArrowLeft") to = col > 0 ? unitOf(row, col - 1) : null;
            else if (ev.key === "ArrowDown") to = row < gr - 1 ? unitOf(row + 1, col) : null;
            else if (ev.key === "ArrowUp") to = row > 0 ? unitOf(row - 1, col) : null;
            else if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pickBelow(unit); return; }
            else if (ev.key === "Escape" && cls !== null) { ev.preventDefault(); setFocus(cls); clsBtn.focus(); return; }
            else return;
            ev.preventDefault();
            if (to !== null) cells[to - first].focus();
          });
        })(u, r, c);
        stage.appendChild(cell);
        cells.push(cell);
      }
    }
    left.appendChild(stage);
    var focusRow = el("div", "controls qkv-image-focus-row");
    focusRow.appendChild(el("span", "label", "Focus"));
    var focusEl = part("span", "image-focus");
    focusRow.appendChild(focusEl);
    var clsBtn = part("button", "image-cls", "head-btn", cls !== null ? "back to the class token [CLS]" : "class token hidden");
    clsBtn.type = "button";
    clsBtn.disabled = cls === null;
    if (cls === null) clsBtn.title = "the class token is hidden (hide_special): explain without it to see its row";
    clsBtn.addEventListener("click", function () { if (cls !== null) { setFocus(cls); pickBelow(cls); } });
    focusRow.appendChild(clsBtn);
    left.appendChild(focusRow);
    body.appendChild(left);

    var right = el("div", "qkv-image-right");
    var caption = part("p", "image-caption");
    caption.setAttribute("aria-live", "polite");
    right.appendChild(caption);
    right.appendChild(el("p", "note", "Hover a patch to see what it attends to (click it to open its row below; " +
      "arrow keys move, Esc returns to the class token). The colour is the weight over the largest patch weight " +
      "of the row (square-root scale). " + (normalised ? "Rows sum to 1 over every unit, the class token included." :
      "Value-weighted norms are not normalised.")));
    var pred = im.prediction || [];
    if (pred.length) {
      right.appendChild(el("h3", null, "Prediction"));
      var pt = part("table", "image-prediction", "focus-table");
      var ph = el("tr");
      ["class", "probability"].forEach(function (t) { var th = el("th", null, t); th.scope = "col"; ph.appendChild(th); });
      var phead = el("thead");
      phead.appendChild(ph);
      pt.appendChild(phead);
      var pb = el("tbody");
      pred.forEach(function (p, i) {
        var tr = el("tr", i === 0 ? "top" : null), th = el("th", null, p.label);
        th.scope = "row";
        tr.appendChild(th);
        var td = el("td", null, (100 * p.probability).toFixed(1) + "%");
        td.dataset.probability = String(p.probability);
        var rgb = heat(p.probability * 0.7);
        td.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        tr.appendChild(td);
        pb.appendChild(tr);
      });
      pt.appendChild(pb);
      right.appendChild(pt);
    } else {
      right.appendChild(el("p", "note", "No prediction: the model has no classifier head."));
    }
    body.appendChild(right);
    sec.appendChild(body);

    // The focus's row in every layer and head: one small picture each, click to show it.
    var thumbsBox = el("div", "qkv-image-thumbs-box");
    thumbsBox.appendChild(el("h3", null, "The focus's attention in every layer and head"));
    var tg = part("div", "image-thumbs", "model-view");
    var thumbHeads = [];
    for (var th0 = 0; th0 < H; th0++) thumbHeads.push(th0);
    if (H > 1) thumbHeads.push("mean");
    var thumbCells = [];
    function buildThumbs() {
      while (tg.firstChild) tg.removeChild(tg.firstChild);
      thumbCells = [];
      var hs = st.method === "rollout" && data.method !== "rollout" ? ["mean"] : thumbHeads;
      tg.style.gridTemplateColumns = "auto repeat(" + hs.length + ", max-content)";
      tg.appendChild(el("span", "hdr", ""));
      hs.forEach(function (h) {
        tg.appendChild(el("span", "hdr", hs.length === 1 && h === "mean" ? "rollout" : (h === "mean" ? "mean" : names[h])));
      });
      for (var l = 0; l < L; l++) {
        tg.appendChild(el("span", "rowhdr", "layer " + l));
        hs.forEach(function (h) {
          var b = el("button", "thumb qkv-image-thumb");
          b.type = "button";
          b.id = P + "image-thumb-" + l + "-" + h;
          b.dataset.layer = String(l);
          b.dataset.head = String(h);
          b.title = "layer " + l + ", " + (h === "mean" ? "mean of heads" : "head " + names[h]);
          var cv = document.createElement("canvas");
          cv.width = gc;
          cv.height = gr;
          b.appendChild(cv);
          (function (layer, head) {
            b.addEventListener("click", function () { setView(layer, head === "mean" && hs.length === 1 ? st.head : head); });
          })(l, h);
          tg.appendChild(b);
          thumbCells.push([b, cv, l, h]);
        });
      }
    }
    thumbsBox.appendChild(tg);
    sec.appendChild(thumbsBox);
    var builtFor = null;

    function patchWeights(row) {
      // row (n) -> the patches' weights (gr * gc) and their largest
      var w = new Array(gr * gc), m = 0;
      for (var k = 0; k < gr * gc; k++) { w[k] = row[first + k]; if (w[k] > m) m = w[k]; }
      return { w: w, max: m };
    }
    function drawThumbs() {
      var key = st.method;
      if (builtFor !== key) { buildThumbs(); builtFor = key; }
      thumbCells.forEach(function (t) {
        var b = t[0], cv = t[1], layer = t[2], head = t[3];
        var row = rowAt(layer, head, st.focus, st.method);
        b.classList.toggle("cur", layer === st.layer && (String(head) === String(st.head) ||
          (st.method === "rollout" && data.method !== "rollout")));
        var ctx = cv.getContext("2d"), imgData = ctx.createImageData(gc, gr), px = imgData.data;
        var pw = row ? patchWeights(row) : null;
        for (var k = 0; k < gr * gc; k++) {
          var t2 = pw && pw.max > 0 ? Math.sqrt(pw.w[k] / pw.max) : 0;
          var rgb = pw ? heat(t2) : [236, 238, 242];
          px[4 * k] = rgb[0]; px[4 * k + 1] = rgb[1]; px[4 * k + 2] = rgb[2]; px[4 * k + 3] = 255;
        }
        ctx.putImageData(imgData, 0, 0);
      });
    }

    // -------------------------------------------------------------- drawing
    function headWords() {
      if (st.method === "rollout") return "rollout";
      return st.head === "mean" ? "mean of heads" : "head " + names[st.head];
    }
    function render() {
      var row = rowAt(st.layer, st.head, st.focus, st.method);
      sec.dataset.layer = String(st.layer);
      sec.dataset.head = String(st.head);
      sec.dataset.method = st.method;
      sec.dataset.focus = String(st.focus);
      layerSel.value = String(st.layer);
      methodSel.value = st.method;
      var rolled = st.method === "rollout" && data.method !== "rollout";
      headBtns.forEach(function (b) {
        b.setAttribute("aria-pressed", !rolled && b.dataset.head === String(st.head) ? "true" : "false");
        b.disabled = rolled;
      });
      focusEl.textContent = unitName(st.focus);
      clsBtn.setAttribute("aria-pressed", st.focus === cls ? "true" : "false");
      var where = "layer " + st.layer + ", " + headWords();
      var pw = row ? patchWeights(row) : null;
      var alpha = Math.max(0, Math.min(100, Number(opacity.value) || 0)) / 100;
      var tabTo = isPatch(st.focus) ? st.focus - first : 0; // one patch in the tab order; arrows move
      cells.forEach(function (cell, k) {
        cell.classList.toggle("cur", first + k === st.focus);
        cell.tabIndex = k === tabTo ? 0 : -1;
        if (!pw) {
          delete cell.dataset.weight;
          cell.style.backgroundColor = "";
          cell.title = labels[first + k];
          return;
        }
        var w = pw.w[k], t = pw.max > 0 ? Math.sqrt(Math.max(0, w) / pw.max) : 0;
        cell.dataset.weight = w.toFixed(4);
        cell.style.backgroundColor = "rgba(255, 96, 24, " + (alpha * t).toFixed(3) + ")";
        cell.title = labels[first + k] + ": " + w.toFixed(4);
      });
      if (!pw) {
        sec.dataset.state = "missing";
        if (fetchRows) {
          if (failed[st.focus]) caption.textContent = "Focus: " + focusWords(st.focus) + ". " + failed[st.focus];
          else {
            sec.dataset.state = "loading";
            caption.textContent = "Focus: " + focusWords(st.focus) + ", " + where + ": fetching its row\u2026";
            fetchUnit(st.focus);
          }
        } else {
          caption.textContent = "Focus: " + focusWords(st.focus) + ". Its row is not in this file (it holds the rows of " +
            shipped.map(function (i) { return labels[i]; }).join(", ") + "): explain with rows='all' " +
            "(qkv explain --rows all) to hover every patch.";
        }
      } else {
        sec.dataset.state = "ready";
        var order = pw.w.map(function (_, k) { return k; }).sort(function (a, b) { return pw.w[b] - pw.w[a]; });
        var tops = order.slice(0, 3).filter(function (k) { return pw.w[k] > 0; }).map(function (k) {
          return labels[first + k] + " " + fmt(pw.w[k]);
        });
        var text = "Focus: " + focusWords(st.focus) + ", " + where + ": attends most to " +
          (tops.length ? tops.join(", ") : "no patch") + ".";
        if (cls !== null) text += " The class token gets " + fmt(row[cls]) + (st.focus === cls ? " (itself)." : ".");
        if (row.partial) text += " Only the top " + data.rows.k + " keys of this row are in the file.";
        caption.textContent = text;
      }
      drawThumbs();
    }

    // -------------------------------------------------------------- state
    function setFocus(unit) {
      if (unit !== cls && !isPatch(unit)) return;
      if (unit === st.focus) return;
      st.focus = unit;
      render();
    }
    function setView(layer, head) {
      st.layer = Math.max(0, Math.min(L - 1, layer));
      st.head = head === "mean" && H > 1 ? "mean" : (typeof head === "number" && head >= 0 && head < H ? head : st.head);
      render();
      // The views below follow: the head view takes "mean"; the compact view only whole heads.
      syncing = true;
      try {
        if (!compact) base.setView(st.layer, st.head);
        else base.setView(st.layer, st.head === "mean" ? base.state.head : st.head);
      } finally { syncing = false; }
    }
    function pickBelow(unit) {
      syncing = true;
      try { base.select(unit); } finally { syncing = false; }
      lastSelected = unit;
    }
    function setMethod(m) {
      if (!methods.some(function (x) { return x[0] === m; })) return;
      st.method = m;
      render();
    }
    layerSel.addEventListener("change", function () { setView(parseInt(layerSel.value, 10), st.head); });
    methodSel.addEventListener("change", function () { setMethod(methodSel.value); });

    // The view below changed its layer, head or selected unit: show the same.
    var lastSelected = base.state.selected;
    panel = {
      follow: function (bs) {
        if (typeof bs.layer === "number") st.layer = bs.layer;
        if (bs.head === "mean" || typeof bs.head === "number") st.head = bs.head;
        if (bs.selected !== lastSelected) {
          lastSelected = bs.selected;
          if (bs.selected === cls || isPatch(bs.selected)) st.focus = bs.selected;
        }
        render();
      }
    };
    var mainEl = root.querySelector("main");
    if (mainEl) mainEl.insertBefore(sec, mainEl.firstChild);
    else root.appendChild(sec);
    render();
    root.dataset.image = "ready";
    base.image = {
      state: st,
      setView: setView,
      setFocus: setFocus,
      setMethod: setMethod,
      focusClassToken: function () { if (cls !== null) setFocus(cls); }
    };
    return base;
  }

  global.QKV = { mount: mount, mountRows: mountRows, mountImage: mountImage, heat: heat, el: el, topKeys: topKeys };

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
