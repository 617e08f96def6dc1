"""Explain results in Jupyter (qkv.inspect.notebook), and the notebooks of docs/notebooks/.

Unit tests of `repr_html`/`repr_png` on the bundled MiniLM; then every `docs/notebooks/*.ipynb`
(parametrized over the folder, so a notebook added later is run too) executed afresh by
nbclient in a real kernel, its outputs checked; then, in headless Chromium, the notebook's
HTML export (nbconvert's "basic" template, which references no CDN, in a minimal page):
every qkv frame is clicked, the weights it shows must be its own data's row, a click in one
frame must leave the other frames as they were, and the page may make no network request.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

import qkv
from qkv.inspect import notebook
from qkv.inspect.html import render_html

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "docs" / "notebooks").glob("*.ipynb"))
SENTENCE = "The cat sat on the mat."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALLOWED_SCHEMES = {"file", "data", "blob", "about"}
DATA_BLOCK = re.compile(r'<script type="application/json" id="qkv-data">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def cat(minilm):
    return qkv.explain(SENTENCE, minilm, focus="cat", name="minilm")


def srcdoc(fragment: str) -> str:
    """The page held by the one <iframe srcdoc="..."> of a repr_html fragment, unescaped."""
    m = re.fullmatch(r'<iframe [^<>]*srcdoc="([^"<>]*)"></iframe>', fragment, re.S)
    assert m, f"not one iframe with a srcdoc attribute: {fragment[:200]!r}"
    return html.unescape(m.group(1))


def page_data(page: str) -> dict:
    """The "qkv.explain/1" JSON a page embeds."""
    (block,) = DATA_BLOCK.findall(page)
    return json.loads(block)


# --------------------------------------------------------------------------- repr_html / repr_png


def test_repr_html_is_the_offline_page_in_a_sandboxed_frame(cat):
    fragment = cat._repr_html_()
    assert fragment == notebook.repr_html(cat)
    # The page of `qkv explain --html`, byte for byte, escaped as an attribute.
    assert srcdoc(fragment) == render_html(cat.to_dict())
    tag = fragment[: fragment.index(" srcdoc=")]
    assert re.search(r'\bsandbox="allow-scripts"', tag), tag  # scripts only: no same origin, no popups, no forms
    assert "allow-same-origin" not in tag
    # Outside the frame there is nothing but the frame: no element ids, no script, no style sheet.
    assert fragment.count("<") == 2, "markup outside the iframe's attribute"
    assert " id=" not in tag
    assert not re.search(r"https?://", fragment), "a URL in the notebook output"
    data = page_data(srcdoc(fragment))
    assert data["labels"] == cat.labels() and data["focus"] is None


def test_user_text_cannot_leave_the_frame(minilm):
    text = 'The cat </iframe><script>alert(1)</script> sat on the "mat" & été.'
    r = qkv.explain(text, minilm, name="minilm")
    fragment = notebook.repr_html(r)
    assert fragment.count("<") == 2 and fragment.count('"') == 10, "the text broke out of an attribute"
    page = srcdoc(fragment)
    assert page == render_html(r.to_dict())
    assert page_data(page)["text"] == text


def test_view_passes_the_options(cat):
    shown = notebook.view(cat, focus="mat", method="rollout", layer=2)
    data = page_data(srcdoc(shown._repr_html_()))
    assert data["method"] == "rollout" and data["head_names"] == ["rollout"]
    assert data["focus"]["label"] == "mat" and data["selected"] == {"layer": 2, "head": None}
    expected = cat.maps("rollout").numpy()  # (L, 1, n, n)
    assert np.allclose(np.asarray(data["maps"]), expected, atol=1e-5, rtol=0)
    assert "focus='mat'" in repr(shown)
    # The picture takes the same layer: the view's PNG is the one render_png draws for it.
    from qkv.inspect.png import render_png_bytes

    assert shown._repr_png_() == render_png_bytes(cat.to_dict(focus="mat", method="rollout", layer=2), layer=2)


def test_bad_arguments_are_named(cat):
    with pytest.raises(TypeError, match="ExplainResult"):
        notebook.repr_html(cat.to_dict())
    with pytest.raises(TypeError, match="unknown option.*colour"):
        notebook.repr_html(cat, colour="red")
    with pytest.raises(TypeError, match="unknown option.*max_bytes"):
        notebook.repr_png(cat, max_bytes=10)
    for bad in (0, -5, 2.5, True, "4MB"):
        with pytest.raises(ValueError, match="max_bytes must be a positive int or None"):
            notebook.repr_html(cat, max_bytes=bad)
    # A bad value fails when the view is made, not later inside Jupyter's formatter.
    with pytest.raises(ValueError, match="focus word 'dog' is not in the text"):
        notebook.view(cat, focus="dog")
    with pytest.raises(ValueError, match="method"):
        notebook.view(cat, method="gradients")


def test_a_large_result_gives_a_note_instead_of_megabytes(cat):
    estimate = cat.num_layers * cat.num_heads * len(cat.labels()) ** 2 * 8
    note = notebook.repr_html(cat, max_bytes=estimate - 1)
    assert note.startswith('<div class="qkv-note"') and "<iframe" not in note
    assert "save_html" in note and "max_bytes=None" in note and "6 layers x 12 heads" in note
    assert notebook.repr_html(cat, max_bytes=estimate).startswith("<iframe")  # the limit is inclusive
    assert srcdoc(notebook.repr_html(cat, max_bytes=None)) == render_html(cat.to_dict())
    # Rollout has one map per layer, so its page is 12 times smaller and fits.
    assert notebook.repr_html(cat, max_bytes=estimate // 2, method="rollout").startswith("<iframe")


def test_focus_rows_only_result_shows_its_compact_page(minilm):
    """rows='focus' records one word's rows: the frame holds the compact page of that word (the
    data of to_dict(), which ships the recorded word), and the PNG draws it."""
    r = qkv.explain(SENTENCE, minilm, focus="cat", rows="focus", name="minilm")
    frame = r._repr_html_()
    assert frame.startswith('<iframe class="qkv-explain"')
    data = r.to_dict()
    assert data["view"] == "rows" and data["focus"]["label"] == "cat" and data["rows"]["index"] == [2]
    assert page_data(srcdoc(frame)) == json.loads(json.dumps(data))
    assert r._repr_png_()[:8] == PNG_MAGIC


def test_repr_png_is_the_png_file(cat, tmp_path):
    png = cat._repr_png_()
    assert png[:8] == PNG_MAGIC
    cat.save_png(tmp_path / "cat.png")
    assert (tmp_path / "cat.png").read_bytes() == png


def test_repr_png_is_none_without_matplotlib(cat, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert cat._repr_png_() is None
    assert cat._repr_html_().startswith("<iframe")  # the page needs no matplotlib


# --------------------------------------------------------------------------- the notebooks, executed


_EXECUTED: dict[Path, object] = {}


def execute(path: Path, tmp_path_factory):
    """The notebook at `path` executed afresh by nbclient in a python3 kernel (once per session),
    with a fresh folder as its working directory and this test's qkv on the kernel's path."""
    if path not in _EXECUTED:
        import nbclient
        import nbformat

        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:  # the committed outputs must not leak into the checks
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        src = str(Path(qkv.__file__).resolve().parents[1])
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([src] + ([old] if old else []))
        try:
            cwd = tmp_path_factory.mktemp(path.stem)
            nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                    resources={"metadata": {"path": str(cwd)}}).execute()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        _EXECUTED[path] = nb
    return _EXECUTED[path]


def qkv_outputs(nb) -> list[dict]:
    """The display data of every output that is a qkv frame (an ExplainResult or a View)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            page = out.get("data", {}).get("text/html", "")
            if page.startswith('<iframe class="qkv-explain"'):
                found.append(out["data"])
    return found


def test_the_notebook_folder_is_not_empty():
    assert any(p.name == "explain.ipynb" for p in NOTEBOOKS), "docs/notebooks/explain.ipynb is missing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_results(path, tmp_path_factory):
    committed = json.loads(path.read_text(encoding="utf-8"))
    # Committed with the outputs of a real run, so that it reads well where it is not run.
    for cell in committed["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"], f"{path.name}: a code cell was committed without its outputs"
            assert all(o["output_type"] != "error" for o in cell["outputs"]), f"{path.name}: an error was committed"
    nb = execute(path, tmp_path_factory)
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{path.name}: {errors}"
            stderr = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")
            assert not stderr.strip(), f"{path.name}: a cell wrote to stderr: {stderr[:500]}"
    shown = qkv_outputs(nb)
    assert shown, f"{path.name} displays no explain result"
    for data in shown:
        page = srcdoc(data["text/html"])
        assert page_data(page)["format"] == "qkv.explain/1"
        assert "image/png" in data, "matplotlib is installed here, so the PNG must be there too"
        import base64

        assert base64.b64decode(data["image/png"])[:8] == PNG_MAGIC


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "docs/notebooks/explain.ipynb").exists(), reason="no explain notebook")
def test_the_explain_notebook_shows_the_seed_sentence(minilm, tmp_path_factory):
    nb = execute(ROOT / "docs" / "notebooks" / "explain.ipynb", tmp_path_factory)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # The seed's numpy sample through qkv: reference, auto and the sample agree to rounding.
    diffs = [float(x) for x in re.findall(r"max \|[^|]+\|\s*=\s*(\S+)", text)]
    assert len(diffs) == 3 and max(diffs) <= 1e-12, diffs
    assert "layer 5, head 11, query token 'cat'" in text
    first, second = (page_data(srcdoc(d["text/html"])) for d in qkv_outputs(nb))
    # The first frame holds MiniLM's real weights for the sentence, the second the compared one.
    r = qkv.explain(SENTENCE, minilm, name="minilm")
    assert first["text"] == SENTENCE and first["labels"] == r.labels()
    # to_dict keeps 5 decimals (and the page 6 significant digits of those): within 1e-5, plus float noise
    np.testing.assert_allclose(np.asarray(first["maps"]), r.maps().numpy(), atol=1e-5, rtol=0)
    assert second["text"] == "The dog sat on the mat." and second["focus"]["label"] == "dog"


# --------------------------------------------------------------------------- the export, in a browser


def export(nb, path: Path) -> Path:
    """The executed notebook as one HTML file: nbconvert's "basic" body (no require.js, MathJax or
    fonts from a CDN, unlike the full templates) inside a minimal page."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="basic").from_notebook_node(nb)
    path.write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{path.stem}</title>'
                    f"</head><body>\n{body}\n</body></html>\n", encoding="utf-8")
    return path


def frame_state(frame) -> dict:
    return frame.eval_on_selector("#head-view", "e => Object.assign({}, e.dataset)")


def frame_shown(frame) -> list[float]:
    return frame.eval_on_selector_all("#keys .word.k", "els => els.map(e => Number(e.dataset.weight))")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_exported_notebook_in_a_browser(path, browser, tmp_path, tmp_path_factory):
    nb = execute(path, tmp_path_factory)
    exported = export(nb, tmp_path / f"{path.stem}.html")
    requests, errors, dialogs = [], [], []
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(exported.as_uri())
    n_frames = len(qkv_outputs(nb))
    page.wait_for_function(f"document.querySelectorAll('iframe.qkv-explain').length === {n_frames}")
    frames = [page.frame_locator("iframe.qkv-explain").nth(i) for i in range(n_frames)]
    handles = [el.content_frame() for el in page.query_selector_all("iframe.qkv-explain")]
    for frame in handles:
        frame.wait_for_selector("body[data-ready=true]", timeout=60_000)
    # The pages' ids live in their frames, not in the notebook's document.
    assert page.query_selector_all("#qkv-root, #head-view, #keys") == []

    for i, (locator, frame) in enumerate(zip(frames, handles)):
        data = json.loads(frame.text_content("#qkv-data"))
        maps = np.asarray(data["maps"])  # (L, H, n, n)
        others = [(frame_state(f), frame_shown(f)) for j, f in enumerate(handles) if j != i]
        before = frame_state(frame)
        target = next(j for j in range(len(data["labels"]) - 1, -1, -1) if str(j) != before["selected"])
        locator.locator(f'#queries .word.q[data-index="{target}"]').click()
        st = frame_state(frame)
        assert st["selected"] == str(target), f"frame {i}: the click did not select word {target}"
        layer = int(st["layer"])
        row = maps[layer].mean(0)[target] if st["head"] == "mean" else maps[layer, int(st["head"]), target]
        shown = np.asarray(frame_shown(frame))
        assert np.abs(shown - row).max() <= 5e-6 * max(1.0, row.max()), f"frame {i}: shown {shown}, data {row}"
        texts = frame.eval_on_selector_all("#keys .word.k .w", "els => els.map(e => e.textContent)")
        assert np.allclose([float(t) for t in texts], row, atol=5e-4 + 1e-9, rtol=0), f"frame {i}: {texts}"
        after_others = [(frame_state(f), frame_shown(f)) for j, f in enumerate(handles) if j != i]
        assert after_others == others, f"a click in frame {i} changed another frame"

    bad = [u for u in requests if urlparse(u).scheme not in ALLOWED_SCHEMES]
    assert not bad, f"the exported notebook made network requests: {bad}"
    assert not errors, f"script errors: {errors}"
    assert not dialogs, f"a dialog fired: {dialogs}"
    page.close()
