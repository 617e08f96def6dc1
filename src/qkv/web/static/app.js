/* The explorer page of `qkv serve`: a form, the API (same origin only), and the shared views
 * of explain.js (QKV.mount), plus the step-through of one word in one head.
 * A long text comes back as the compact view (view "rows", with a "session"): the view then
 * fetches each row it shows from POST /api/weights (fetcher below), one layer/head/row at a time.
 * An image model (GET /api/models, "modality": "image") takes an image instead of a sentence: the
 * text box gives way to a file input (the file is read in the browser and sent as a data URL in the
 * JSON body, never stored on the server) and the model's samples as thumbnails (GET /api/samples);
 * the answer is drawn by QKV.mount as any other, and the step-through follows the selected patch.
 * User text (file names too) reaches the page only through textContent and title, never as markup. */
(function () {
  "use strict";
  var el = QKV.el;
  var $ = function (id) { return document.getElementById(id); };
  var form = $("explain-form"), errorEl = $("error"), busyEl = $("busy");
  var viewA = $("view-a"), viewB = $("view-b"), views = $("views");
  var current = null; // {request, data, view}
  var stepsSeq = 0, runSeq = 0;
  var modality = {}; // model name -> "text" or "image"
  var imageLimits = null; // GET /api/models image_limits
  var imageInput = null; // the image model's input: {sample: name} or {image: data URL, image_name: file name}
  var samplesSeq = 0;
  var IMAGE_FIELDS = ["image", "image_name", "sample"];

  function showError(msg) {
    errorEl.textContent = msg || "";
    errorEl.hidden = !msg;
  }

  function api(path, body) {
    var init = body === undefined ? { method: "GET" } :
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    init.credentials = "same-origin";
    init.cache = "no-store";
    return fetch(path, init).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (j) {
        if (!r.ok) {
          var msg = j && j.error ? j.error.message : "the server answered " + r.status;
          throw new Error(msg);
        }
        return j;
      });
    });
  }

  function isImageModel() { return modality[$("model").value] === "image"; }

  function request() {
    var method = form.querySelector("input[name=method]:checked").value;
    var req = {
      model: $("model").value || "minilm",
      method: method,
      level: $("level").value,
      hide_special: $("hide-special").checked
    };
    var focus = $("focus").value.trim();
    if (focus) req.focus = focus;
    if (isImageModel()) {
      if (imageInput) IMAGE_FIELDS.forEach(function (k) { if (k in imageInput) req[k] = imageInput[k]; });
      if ($("interpolate").checked) req.interpolate_pos_encoding = true;
      return { req: req, other: null, image: true };
    }
    req.text = $("text").value;
    var other = $("other").value;
    return { req: req, other: other.trim() ? other : null, image: false };
  }

  // The input fields of a request (its text, or its image or sample), for the step-through.
  function inputOf(req) {
    var out = {};
    ["text", "interpolate_pos_encoding"].concat(IMAGE_FIELDS).forEach(function (k) { if (k in req) out[k] = req[k]; });
    return out;
  }

  function setBusy(on, what) {
    $("go").disabled = on;
    busyEl.textContent = on ? what : "";
    document.body.dataset.busy = on ? "true" : "false";
  }

  function run(keep) {
    var r = request();
    if (r.image && !r.req.image && !r.req.sample) { showError("Pick a sample or upload an image first."); return; }
    if (!r.image && !r.req.text.trim()) { showError("Type a sentence first."); return; }
    showError("");
    var seq = ++runSeq;
    setBusy(true, "Running the model\u2026");
    document.body.dataset.ready = "false";
    var call = r.other === null ? api("/api/explain", r.req)
      : api("/api/compare", Object.assign({ other: r.other }, r.req));
    call.then(function (res) {
      if (seq !== runSeq) return;
      var a = r.other === null ? res : res.a;
      current = { req: r.req, data: a, view: null };
      // the unit stepped through, found again by its label in the new answer (its index there differs
      // when the class token is hidden or the image changed); gone from it, the step-through is closed
      var steps = $("steps"), label = steps.dataset.label, again = label === undefined ? -1 : a.labels.indexOf(label);
      if (again >= 0) steps.dataset.word = String(again);
      else { delete steps.dataset.word; delete steps.dataset.label; steps.hidden = true; }
      var before = keep || null;
      current.view = QKV.mount(viewA, a, {
        prefix: "",
        onChange: onViewChange,
        onReady: function () { viewA.dataset.drawn = "true"; },
        fetchRows: fetcher(r.req, a)
      });
      if (current.view.compact) $("steps").hidden = true;
      if (before) restore(current.view, before, a);
      if (r.other !== null) {
        viewB.hidden = false;
        views.classList.add("compare");
        QKV.mount(viewB, res.b, { prefix: "b-", fetchRows: fetcher(r.req, res.b) });
        showCompare(res, a);
      } else {
        viewB.hidden = true;
        while (viewB.firstChild) viewB.removeChild(viewB.firstChild);
        views.classList.remove("compare");
        $("compare-summary").hidden = true;
      }
      document.body.dataset.ready = "true";
      onViewChange(current.view.state);
    }).catch(function (err) {
      if (seq !== runSeq) return;
      showError(err.message);
      document.body.dataset.ready = "error";
    }).then(function () { if (seq === runSeq) setBusy(false); });
  }

  // Rows of a compact view, fetched from the session its explain answer named (evicted: 410,
  // shown by the view as the server's message, "explain the text again").
  function fetcher(req, data) {
    if (data.view !== "rows" || !data.session) return null;
    return function (q) {
      // At most the server's max_pick layers a request: a model with more layers is asked in parts,
      // the answers joined in order.
      var parts = [];
      for (var i = 0; i < q.layers.length; i += maxPick) parts.push(q.layers.slice(i, i + maxPick));
      return Promise.all(parts.map(function (layers) {
        var body = { session: data.session, layers: layers, rows: q.rows, method: req.method, level: req.level,
                     hide_special: req.hide_special };
        if (req.method !== "rollout") body.heads = [parseInt(data.head_names[q.head], 10)];
        return api("/api/weights", body);
      })).then(function (answers) {
        var joined = answers[0];
        for (var j = 1; j < answers.length; j++) {
          joined.layers = joined.layers.concat(answers[j].layers);
          joined.weights = joined.weights.concat(answers[j].weights);
        }
        return joined;
      });
    };
  }
  var maxPick = 64; // the server's limits.max_pick, read from /api/models

  function restore(view, st, data) {
    if (view.compact || !data.maps) {
      view.setView(Math.min(st.layer, view.layers - 1), typeof st.head === "number" && st.head < view.heads ? st.head : 0);
      if (st.selected >= 0 && st.selected < data.labels.length) view.select(st.selected);
      return;
    }
    var layer = st.layer < data.maps.length ? st.layer : data.maps.length - 1;
    var H = data.maps[0].length;
    var head = (st.head === "mean" && H > 1) || (typeof st.head === "number" && st.head < H) ? st.head : (H > 1 ? "mean" : 0);
    view.setView(layer, head);
    if (st.selected >= 0 && st.selected < data.labels.length) view.select(st.selected);
  }

  function showCompare(res, a) {
    var box = $("compare-summary"), table = $("jsd-table");
    box.hidden = false;
    while (table.firstChild) table.removeChild(table.firstChild);
    var note = res.note || "";
    if (res.largest) {
      note = "Jensen-Shannon divergence (bits) between the two rows of the focus word, per layer and head. " +
        "The largest change: layer " + res.largest.layer + ", head " + res.largest.head + " (" +
        res.largest.jsd.toFixed(3) + " bits).";
    }
    $("compare-note").textContent = note;
    if (!res.jsd) return;
    var thead = el("thead"), tr = el("tr");
    tr.appendChild(el("th", null, ""));
    res.jsd[0].forEach(function (_, h) { tr.appendChild(el("th", null, "head " + h)); });
    thead.appendChild(tr);
    table.appendChild(thead);
    var tbody = el("tbody");
    res.jsd.forEach(function (row, layer) {
      var r = el("tr");
      r.appendChild(el("th", null, "layer " + layer));
      row.forEach(function (v) {
        var td = el("td", null, v.toFixed(2));
        var rgb = QKV.heat(Math.min(1, v));
        td.style.backgroundColor = "rgb(" + rgb.join(",") + ")";
        td.style.color = v > 0.55 ? "#fff" : "";
        r.appendChild(td);
      });
      tbody.appendChild(r);
    });
    table.appendChild(tbody);
  }

  // ------------------------------------------------------------------ steps
  var stepsLayer = $("steps-layer"), stepsHead = $("steps-head");
  function fillSelect(sel, count, label, value) {
    if (sel.options.length !== count) {
      while (sel.firstChild) sel.removeChild(sel.firstChild);
      for (var i = 0; i < count; i++) {
        var o = el("option", null, label + " " + i);
        o.value = String(i);
        sel.appendChild(o);
      }
    }
    sel.value = String(value);
  }

  function onViewChange(st) {
    // what the view shows, for tests and scripts: its layer, head ("mean" or an index) and selected unit
    views.dataset.layer = String(st.layer);
    views.dataset.head = String(st.head);
    views.dataset.selected = String(st.selected);
    if (!current || !current.view || current.view.compact) return; // no step-through of a long text
    if (st.selected < 0) return;
    var layer = st.layer;
    var head = typeof st.head === "number" && current.data.method !== "rollout" ? st.head
      : parseInt(stepsHead.value || "0", 10);
    if (stepsLayer.options.length) stepsLayer.value = String(layer);
    if (stepsHead.options.length) stepsHead.value = String(head);
    loadSteps(st.selected, layer, head);
  }

  function loadSteps(index, layer, head) {
    var req = current.req;
    var seq = ++stepsSeq;
    var body = Object.assign(inputOf(req), { model: req.model, word: index, layer: layer, head: head,
                                             level: req.level, hide_special: req.hide_special });
    $("steps").dataset.ready = "false";
    api("/api/steps", body).then(function (s) {
      if (seq !== stepsSeq) return;
      drawSteps(s, index);
    }).catch(function (err) {
      if (seq !== stepsSeq) return;
      showError(err.message);
    });
  }

  function num(x, d) { return x === null ? "\u2212\u221e" : x.toFixed(d); }
  function vectorText(v) { return "[" + v.map(function (x) { return num(x, 3); }).join(", ") + "]"; }

  function drawSteps(s, index) {
    var sec = $("steps");
    sec.hidden = false;
    sec.dataset.word = String(index);
    sec.dataset.label = current.data.labels[index];
    sec.dataset.layer = String(s.layer);
    sec.dataset.head = String(s.head);
    fillSelect(stepsLayer, s.layers, "layer", s.layer);
    fillSelect(stepsHead, s.heads, "head", s.head);
    $("steps-word").textContent = "query token \u201c" + s.token_label + "\u201d (token " + s.token + ")";
    $("steps-qlabel").textContent = "\u201c" + s.token_label + "\u201d";
    $("steps-dim").textContent = String(s.query.length);
    $("steps-query").textContent = "q = " + vectorText(s.query);
    $("steps-scale").textContent = "1/\u221a" + s.query.length + " = " + s.scale.toFixed(4);
    $("steps-output").textContent = "output = \u03a3\u2c7c weight\u2c7c \u00b7 v\u2c7c = " + vectorText(s.output);
    var table = $("steps-table");
    while (table.firstChild) table.removeChild(table.firstChild);
    var thead = el("thead"), tr = el("tr");
    ["key", "q\u00b7k", "\u00d7 scale = score", "softmax weight", "", "weight \u00d7 v (first 4 of " + s.values[0].length + ")"]
      .forEach(function (h) { tr.appendChild(el("th", null, h)); });
    thead.appendChild(tr);
    table.appendChild(thead);
    var tbody = el("tbody");
    var max = Math.max.apply(null, s.weights);
    s.labels.forEach(function (lab, j) {
      var r = el("tr", s.special[j] ? "special" : null);
      r.dataset.index = String(j);
      r.dataset.weight = String(s.weights[j]);
      r.dataset.score = s.scores[j] === null ? "-inf" : String(s.scores[j]);
      r.appendChild(el("td", null, lab));
      r.appendChild(el("td", null, num(s.dots[j], 4)));
      r.appendChild(el("td", "score", num(s.scores[j], 4)));
      r.appendChild(el("td", "weight", num(s.weights[j], 4)));
      var bar = el("td", "bar"), fill = el("span", "barfill");
      fill.style.width = (max > 0 ? 100 * s.weights[j] / max : 0).toFixed(1) + "%";
      bar.appendChild(fill);
      r.appendChild(bar);
      var wv = s.values[j].slice(0, 4).map(function (v) { return (s.weights[j] * v).toFixed(3); });
      r.appendChild(el("td", null, "[" + wv.join(", ") + ", \u2026]"));
      tbody.appendChild(r);
    });
    table.appendChild(tbody);
    sec.dataset.ready = "true";
  }

  // An image: hovering a patch (or the class token's button) steps through that unit too, once the
  // pointer rests on it a moment; a click selects it in the view below, which steps through it as a
  // word's click does.
  var hoverTimer = null;
  viewA.addEventListener("mouseover", function (ev) {
    var target = ev.target && ev.target.closest ? ev.target.closest(".qkv-patch[data-unit]") : null;
    if (!target || !current || !current.view || current.view.compact || !current.data.image) return;
    var unit = parseInt(target.dataset.unit, 10);
    if (hoverTimer !== null) clearTimeout(hoverTimer);
    hoverTimer = setTimeout(function () {
      hoverTimer = null;
      var panel = viewA.querySelector(".qkv-image");
      var layer = panel && panel.dataset.layer ? parseInt(panel.dataset.layer, 10) : current.view.state.layer;
      var head = panel && /^[0-9]+$/.test(panel.dataset.head || "") && current.data.method !== "rollout"
        ? parseInt(panel.dataset.head, 10) : parseInt(stepsHead.value || "0", 10);
      if ($("steps").dataset.word === String(unit) && $("steps").dataset.layer === String(layer) &&
          $("steps").dataset.head === String(head)) return;
      loadSteps(unit, layer, head);
    }, 150);
  });

  function stepsFromSelects() {
    if (!current || !current.view) return;
    var shown = $("steps").dataset.word; // an image: the unit stepped through (a hovered patch, or the selected one)
    var unit = current.data.image && shown !== undefined && shown !== "" ? parseInt(shown, 10)
      : current.view.state.selected;
    if (unit < 0) return;
    loadSteps(unit, parseInt(stepsLayer.value, 10), parseInt(stepsHead.value, 10));
  }
  stepsLayer.addEventListener("change", stepsFromSelects);
  stepsHead.addEventListener("change", stepsFromSelects);

  // ------------------------------------------------------------------ images
  // The picker of an image model: the text rows hidden (and not required), the file input and
  // the samples shown; a text model the other way round.
  function setMode() {
    var image = isImageModel();
    $("text-row").hidden = image;
    $("other-row").hidden = image;
    $("text").required = !image;
    $("image-row").hidden = !image;
    $("samples-row").hidden = !image;
    // an image's patches are its words and its tokens: no choice of units to make
    $("level").hidden = $("level-label").hidden = image;
    if (image) $("level").value = "word";
    $("hide-special-label").textContent = image ? "hide the class token [CLS]" : "hide [CLS], [SEP]";
    $("focus").placeholder = image ? "optional patch, e.g. r1c2" : "optional word";
    $("steps-unit").textContent = image ? "patch" : "word";
    document.body.dataset.modality = image ? "image" : "text";
    if (image) loadSamples($("model").value);
  }

  function loadSamples(model) {
    var box = $("samples"), seq = ++samplesSeq;
    box.dataset.ready = "false";
    while (box.firstChild) box.removeChild(box.firstChild);
    api("/api/samples?model=" + encodeURIComponent(model)).then(function (res) {
      if (seq !== samplesSeq) return;
      res.samples.forEach(function (sample) {
        var b = el("button", "sample");
        b.type = "button";
        b.title = sample.name;
        b.dataset.name = sample.name;
        b.setAttribute("aria-pressed", imageInput && imageInput.sample === sample.name ? "true" : "false");
        var img = el("img");
        img.src = sample.pixels; // a data: URL from the server
        img.alt = sample.name;
        b.appendChild(img);
        b.addEventListener("click", function () { pickSample(sample.name); });
        box.appendChild(b);
      });
      if (!res.samples.length) box.appendChild(el("span", "note", "this model has no samples; upload an image"));
      box.dataset.ready = "true";
    }).catch(function (err) { showError("cannot list the samples: " + err.message); });
  }

  function markSample(name) {
    Array.prototype.forEach.call($("samples").querySelectorAll("button.sample"), function (b) {
      b.setAttribute("aria-pressed", b.dataset.name === name ? "true" : "false");
    });
  }

  function pickSample(name) {
    imageInput = { sample: name };
    markSample(name);
    $("image-file").value = "";
    $("image-chosen").textContent = "sample " + name;
    run(null);
  }

  $("image-file").addEventListener("change", function () {
    var file = this.files && this.files[0];
    if (!file) return;
    if (imageLimits && file.size > imageLimits.max_image_bytes) {
      showError("\u201c" + file.name + "\u201d has " + file.size + " bytes; this server reads images of at most " +
                imageLimits.max_image_bytes + " bytes");
      return;
    }
    var reader = new FileReader();
    reader.onload = function () {
      imageInput = { image: String(reader.result), image_name: file.name || "image" };
      markSample(null);
      $("image-chosen").textContent = file.name;
      run(null);
    };
    reader.onerror = function () { showError("cannot read the file \u201c" + file.name + "\u201d"); };
    reader.readAsDataURL(file); // the bytes go in the request body only
  });

  $("model").addEventListener("change", function () {
    if (imageInput && imageInput.sample) { // a sample is another model's; an upload is kept
      imageInput = null;
      $("image-chosen").textContent = "";
    }
    setMode();
  });

  // ------------------------------------------------------------------ form
  form.addEventListener("submit", function (ev) { ev.preventDefault(); run(null); });
  Array.prototype.forEach.call(form.querySelectorAll("input[name=method]"), function (radio) {
    radio.addEventListener("change", function () {
      if (current) run(current.view ? current.view.state : null);
    });
  });
  $("hide-special").addEventListener("change", function () { if (current) run(null); });
  $("interpolate").addEventListener("change", function () { if (isImageModel() && imageInput) run(null); });
  $("level").addEventListener("change", function () { if (current) run(null); });

  api("/api/models").then(function (m) {
    var sel = $("model");
    m.models.forEach(function (entry) {
      modality[entry.name] = entry.modality || "text";
      var o = el("option", null, entry.name + (entry.source === "bundled" ? " (bundled)" : "") +
                 (entry.modality === "image" ? ", images" : ""));
      o.value = entry.name;
      sel.appendChild(o);
    });
    sel.value = m["default"];
    $("text").maxLength = m.limits.max_chars;
    $("other").maxLength = m.limits.max_chars;
    if (m.limits.max_pick) maxPick = m.limits.max_pick;
    imageLimits = m.image_limits || null;
    setMode();
    document.body.dataset.models = "ready";
  }).catch(function (err) { showError("cannot list the models: " + err.message); });
})();
