"""The views of a long input (issue 19): the terminal fits its width and lists the focus row's
top keys with their positions, the PNG stays within MAX_PIXELS with at most MAX_TICKS labels per
axis, and the command line writes --json/--png with --rows focus. A tiny random Llama with 8,192
positions, texts of 4,000 and 8,000 words; every expectation is recomputed from the result."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import qkv
from qkv import cli
from qkv.inspect.terminal import SHORT_UNITS, render_compare, render_focus, render_overview, squeeze

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = "the cat sat on the mat and the dog ran".split()


def long_text(n: int, last: str = "queries", swap: int | None = None) -> str:
    """n words from the tiny model's vocabulary, the last one `last`; `swap` puts "fox" at that index."""
    words = [WORDS[i % len(WORDS)] for i in range(n - 1)] + [last]
    if swap is not None:
        words[swap] = "fox"
    return " ".join(words)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from models.hf_folders import build_folder

    path = tmp_path_factory.mktemp("llama-long")
    build_folder(path, "llama", max_position_embeddings=8192)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return qkv.load(folder)


@pytest.fixture(scope="module")
def r4k(model):
    """4,000 words, every row recorded: the compact view by default (2 x 4 x 4000^2 > FULL_CELLS)."""
    result = qkv.explain(long_text(4000), model, focus="queries")
    assert result.compact_view()
    return result


@pytest.fixture(scope="module")
def r8k(model):
    """8,000 words, only the focus word's rows recorded."""
    return qkv.explain(long_text(8000), model, focus="queries", rows="focus")


def widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def layer_blocks(text: str) -> dict[int, str]:
    """The text of each 'layer L   top ...' block of the long layout, up to the next one."""
    blocks: dict[int, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("layer ") and "top " in line:
            current = int(line.split()[1])
            blocks[current] = ""
        elif current is not None:
            if not line.startswith("    "):
                current = None
                continue
            blocks[current] += line + "\n"
    return blocks


# --------------------------------------------------------------------------- terminal


def test_squeeze_keeps_a_sharp_peak():
    row = [0.0] * 8000
    row[3333] = 1.0
    row[10] = 0.25
    cells = 70
    squeezed, b = squeeze(row, cells)
    reference = [max(row[i:i + b]) for i in range(0, len(row), b)]
    assert len(squeezed) <= cells and squeezed == reference
    assert squeezed[3333 // b] == 1.0, "the peak is kept whole, not averaged over its bucket"
    assert squeeze([0.5, 0.25], 70) == ([0.5, 0.25], 1), "a short row is left as it is"


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("which", ["r4k", "r8k"])
def test_long_focus_fits_the_terminal_and_lists_the_top_keys(which, columns, request, monkeypatch):
    result = request.getfixturevalue(which)
    monkeypatch.setenv("COLUMNS", str(columns))  # read by shutil.get_terminal_size
    k = 5
    text = render_focus(result, "queries", top_k=k)
    assert widest(text) <= columns, text
    rows = result.focus_rows("queries").mean(dim=1)  # (L, n): the reference
    n = rows.shape[1]
    blocks = layer_blocks(text)
    assert sorted(blocks) == list(range(result.num_layers))
    labels = result.labels()
    for layer, block in blocks.items():
        values, index = rows[layer].topk(k)
        found = [int(tok[1:]) for tok in block.split() if tok.startswith("#")]
        assert found == index.tolist(), f"layer {layer}: {found} != {index.tolist()}"
        for j in index.tolist():
            assert f"#{j} {labels[j]}" in " ".join(block.split())
        strip = [line for line in block.splitlines() if set(line.strip()) <= set(" ▁▂▃▄▅▆▇█")][0]
        squeezed, _ = squeeze(rows[layer].tolist(), columns - 4)
        assert len(strip) == 4 + len(squeezed) and len(squeezed) <= columns - 4 < n
    assert f"{n:,} words" in text and "sharpest heads" in text


@pytest.mark.parametrize("columns", [80, 200])
def test_long_overview_shows_the_summaries_and_the_minimap(r4k, columns):
    text = render_overview(r4k, columns=columns, top_k=3)
    assert widest(text) <= columns, text
    summary = r4k.summaries()
    for layer in range(r4k.num_layers):
        entropy = " ".join(f"{x:.2f}" for x in summary["entropy"][layer].tolist())
        assert f"{layer} {entropy}" in " ".join(text.split())
    assert "minimap" in text and "the last word 'queries' (#3999)" in text
    top = r4k.focus_rows(len(r4k.labels()) - 1).mean(dim=1)[0].topk(3).indices.tolist()
    assert [int(t[1:]) for t in layer_blocks(text)[0].split() if t.startswith("#")] == top


def test_a_short_input_keeps_its_table(model):
    """Up to SHORT_UNITS words the table is printed as before, whatever the terminal's width."""
    r = qkv.explain("the quick brown fox jumps over the lazy dog", model, focus="fox")
    narrow, wide = render_focus(r, "fox", columns=40), render_focus(r, "fox", columns=400)
    assert narrow == wide and "strip" in narrow.splitlines()[3]
    assert render_overview(r, columns=40) == render_overview(r, columns=400)
    n = 2 * SHORT_UNITS
    r = qkv.explain(long_text(n), model, focus="queries")
    assert render_focus(r, "queries", columns=4000) != render_focus(r, "queries", columns=80)
    assert widest(render_focus(r, "queries", columns=80)) <= 80


def test_compare_of_long_inputs_names_the_largest_change_in_the_focus_row(r4k, model):
    other = qkv.explain(long_text(4000, swap=5), model)
    comparison = r4k.compare(other, "queries")
    assert comparison["difference"] is None
    text = render_compare(r4k, other, comparison, "queries", columns=80)
    assert widest(text) <= 80, text
    delta = (r4k.focus_rows("queries") - other.focus_rows("queries")).abs()  # (L, H, n)
    per_head = delta.amax(dim=-1)
    layer, head = divmod(int(torch.argmax(per_head)), per_head.shape[1])
    assert f"largest change in 'queries''s row: layer {layer} head {head} ({per_head[layer, head]:.2f}" in \
        " ".join(text.split())
    for layer in range(r4k.num_layers):
        assert f"{layer:>5} " + " ".join(f"{x:4.2f}" for x in comparison["jsd"][layer].tolist()) in text


# --------------------------------------------------------------------------- PNG


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def drawn(data, layer=None, head=None, block=None):
    """(the PNG's bytes, each axis's (title, x labels, y labels)) of _png on checked data."""
    from qkv.inspect.png import _pick_head, _pick_layer, _png
    from qkv.inspect.schema import check_data

    _, n_layers, _ = check_data(data)
    axes = []

    def read(fig):
        fig.canvas.draw()
        for ax in fig.axes:
            axes.append((ax.get_title(loc="left"), [t.get_text() for t in ax.get_xticklabels()],
                         [t.get_text() for t in ax.get_yticklabels()]))

    png = _png(data, _pick_layer(layer, n_layers), _pick_head(head, data["head_names"]), block, on_figure=read)
    return png, axes


@pytest.mark.parametrize("which", ["r4k", "r8k"])
def test_png_of_a_long_input_is_capped_with_subsampled_labels(which, request, tmp_path):
    pytest.importorskip("matplotlib")
    from qkv.inspect.png import MAX_PIXELS, MAX_TICKS, save_png

    result = request.getfixturevalue(which)
    path = save_png(result, tmp_path / "long.png", focus="queries")
    width, height = png_size(path.read_bytes())
    assert width <= MAX_PIXELS and height <= MAX_PIXELS
    data = result.to_dict(focus="queries")
    assert data["view"] == "rows"
    _, axes = drawn(data)
    n = len(data["labels"])
    for title, xs, ys in axes:
        assert len([x for x in xs if x]) <= MAX_TICKS and len([y for y in ys if y]) <= MAX_TICKS, title
    titles = " ".join(t for t, _, _ in axes)
    assert "\u201cqueries\u201d (#" + str(n - 1) + ")" in titles
    assert ("minimap" in titles) == (result.rows is None), "a rows='focus' result has no minimap"
    labelled = [xs for _, xs, _ in axes if any(" " in x for x in xs)]
    assert labelled and labelled[-1][0] == f"0 {data['labels'][0]}", "the last strip names its words"


def test_png_of_a_long_result_draws_a_block_map(r4k, tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np

    from qkv.inspect import rows as qrows
    from qkv.inspect.png import MAP_CELLS, _block_map

    u = qrows.units(r4k, "word", False)
    grid, b = _block_map(r4k, 1, None, "raw", u)
    assert b == -(-4000 // MAP_CELLS) and grid.shape == (-(-4000 // b),) * 2
    full = qrows.full_layer(r4k, 1, "raw", u).mean(dim=0).double().numpy()  # (n, n): the reference
    reference = np.maximum.reduceat(np.maximum.reduceat(full, np.arange(0, 4000, b), axis=1),
                                    np.arange(0, 4000, b), axis=0)
    np.testing.assert_allclose(grid, reference, rtol=1e-6, atol=1e-9)
    _, axes = drawn(r4k.to_dict(focus="queries"), block=(grid, b))
    assert any(f"max of {b}\u00d7{b} weights" in title for title, _, _ in axes)


def test_png_of_long_full_maps_is_downsampled(tmp_path):
    pytest.importorskip("matplotlib")
    from synthetic_explain import make_data

    from qkv.inspect.png import MAP_CELLS, MAX_PIXELS, MAX_TICKS

    data = make_data(n_words=998, layers=1, heads=1, focus=3)  # 1,000 labels
    png, axes = drawn(data)
    assert max(png_size(png)) <= MAX_PIXELS
    b = -(-1000 // MAP_CELLS)
    assert any(f"max of {b}\u00d7{b}" in title for title, _, _ in axes)
    for title, xs, ys in axes:
        assert len([x for x in xs if x]) <= MAX_TICKS and len([y for y in ys if y]) <= MAX_TICKS, title


# --------------------------------------------------------------------------- command line


def test_cli_rows_focus_writes_json_and_png(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from qkv.inspect.png import MAX_PIXELS

    monkeypatch.setenv("COLUMNS", "80")
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    argv = ["explain", long_text(4000), "--model", str(folder), "--focus", "queries", "--rows", "focus",
            "--top-k", "3", "--json", str(out_json), "--png", str(out_png), "--color", "never"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    table = "\n".join(line for line in out.splitlines() if not line.startswith("wrote "))  # paths are paths
    assert widest(table) <= 80
    assert all(len([t for t in block.split() if t.startswith("#")]) == 3 for block in layer_blocks(out).values())
    data = json.loads(out_json.read_text())
    assert data["view"] == "rows" and data["rows"]["k"] == 3 and data["rows"]["index"] == [3999]
    assert out_json.stat().st_size < 1_000_000
    assert max(png_size(out_png.read_bytes())) <= MAX_PIXELS


def test_cli_rows_focus_writes_html(folder, tmp_path, capsys):
    out_html = tmp_path / "a.html"
    argv = ["explain", long_text(4000), "--model", str(folder), "--focus", "queries", "--rows", "focus",
            "--html", str(out_html), "--color", "never"]
    assert cli.main(argv) == 0
    assert out_html.stat().st_size < 2_000_000
