"""The offline HTML page of `qkv explain`: self-contained, escaped, well-formed input checks.

The renderer consumes only the "qkv.explain/1" dict, so these tests build one from random
Dirichlet rows; no model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
from synthetic_explain import MALICIOUS_LABEL, make_data

from qkv.inspect.html import render_html, write_html


def embedded_json(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert m, "the page has no embedded JSON block"
    return json.loads(m.group(1))


def test_page_is_self_contained():
    page = render_html(make_data())
    assert page.startswith("<!DOCTYPE html>")
    low = page.lower()
    assert "http://" not in low and "https://" not in low, "the page names a network address"
    assert "//" + "cdn" not in low
    assert not re.search(r"<script[^>]*\bsrc\s*=", low), "the page loads an external script"
    assert "<link" not in low, "the page has a <link> element"
    assert "@import" not in low and "url(" not in low, "the page's CSS refers to an outside resource"
    assert "<img" not in low and "<iframe" not in low
    # Exactly the two inline scripts: the JSON data and the page script.
    assert len(re.findall(r"<script\b", low)) == 2
    assert "content-security-policy" in low and "default-src 'none'" in page


def test_user_text_is_escaped():
    page = render_html(make_data())
    assert MALICIOUS_LABEL not in page
    assert "</script><b>x</b>" not in page
    assert "<b>x" not in page
    assert "\u2028" not in page and "\u2029" not in page
    # The title is HTML-escaped, the JSON block \u-escaped.
    assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in page
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page
    # Every </script> in the page closes one of the two script elements.
    assert page.lower().count("</script>") == 2


def test_embedded_json_round_trips():
    data = make_data(seed=3)
    got = embedded_json(render_html(data))
    for key in ("format", "model", "text", "method", "level", "labels", "special", "head_names", "focus", "entropy"):
        assert got[key] == data[key], key
    maps = np.asarray(data["maps"])
    err = np.abs(np.asarray(got["maps"]) - maps).max()
    # 6 significant digits: relative error <= 5e-6 of each weight.
    assert err <= 5e-6 * maps.max(), f"embedded weights differ by {err:.3g}"


def test_non_ascii_is_kept_readable():
    page = render_html(make_data())
    assert "été" in page  # written as UTF-8, not \u-escaped
    assert '<meta charset="utf-8">' in page


def test_marker_in_text_is_not_substituted():
    data = make_data()
    data["text"] = "@@STYLE@@ @@SCRIPT@@ @@DATA@@"
    page = render_html(data)
    assert embedded_json(page)["text"] == data["text"]
    assert page.count("@@STYLE@@") == 2  # once in <title>, once in the JSON


@pytest.mark.parametrize("method", ["rollout", "value-norm"])
def test_other_methods_render(method):
    data = make_data(method=method, focus=None)
    if method == "rollout":
        data["maps"] = [[np.mean(layer, axis=0).tolist()] for layer in data["maps"]]
        data["head_names"] = ["rollout"]
        data["entropy"] = [[0.5] for _ in data["maps"]]
    got = embedded_json(render_html(data))
    assert got["method"] == method and len(got["maps"][0]) == len(data["head_names"])


def test_numpy_maps_are_accepted():
    data = make_data()
    data["maps"] = np.asarray(data["maps"])
    assert embedded_json(render_html(data))["labels"] == data["labels"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(format="qkv.explain/9"), "format"),
        (lambda d: d.pop("labels"), "labels"),
        (lambda d: d.update(labels=[]), "labels"),
        (lambda d: d.update(head_names=["0"]), "head_names"),
        (lambda d: d["maps"][1][0].pop(), r"maps'\]\[1\]\[0\]"),
        (lambda d: d["maps"][0][0][0].__setitem__(0, float("nan")), "non-finite"),
        (lambda d: d["focus"].update(index=99), "focus"),
        (lambda d: d.update(special=[True]), "special"),
    ],
)
def test_malformed_data_is_refused(change, message):
    data = make_data()
    change(data)
    with pytest.raises(ValueError, match=message):
        render_html(data)


def test_check_data_is_the_one_format_check():
    """html and png check with qkv.inspect.schema.check_data: (n labels, layers, heads), and the
    optional cross-attention block of encoder-decoder results checked for its shape too."""
    from qkv.inspect.schema import check_data

    data = make_data(n_words=8, layers=3, heads=4)
    assert check_data(data) == (10, 3, 4)
    data["cross"] = {"layers": [1], "source": ["a", "b"], "target": ["c"], "maps": [[[[0.5, 0.5]]] * 4]}
    assert check_data(data) == (10, 3, 4)
    data["cross"]["maps"] = [[[[1.0]]] * 4]
    with pytest.raises(ValueError, match=r"data\['cross'\] must hold maps of shape"):
        render_html(data)


def test_not_a_dict():
    with pytest.raises(TypeError, match="to_dict"):
        render_html([1, 2, 3])


def test_write_html_is_atomic(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    out = write_html(make_data(), target)
    assert out == target
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"], "a temporary file was left behind"


def test_write_html_missing_directory(tmp_path):
    target = tmp_path / "no" / "such" / "page.html"
    with pytest.raises(OSError, match=re.escape(str(target))):
        write_html(make_data(), target)


def test_write_html_onto_directory(tmp_path):
    with pytest.raises(OSError, match="directory"):
        write_html(make_data(), tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_write_html_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OSError, match="ro/page.html"):
            write_html(make_data(), ro / "page.html")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_large_input_renders_quickly():
    import time

    data = make_data(n_words=198, layers=2, heads=2, focus=5)
    t0 = time.perf_counter()
    page = render_html(data)
    elapsed = time.perf_counter() - t0
    assert len(embedded_json(page)["labels"]) == 200
    assert elapsed < 5, f"render_html took {elapsed:.1f} s for 200 labels"


def test_write_html_through_a_symlink_keeps_the_link(tmp_path):
    """The page goes to the link's target (written atomically beside it); the link stays a link."""
    real_dir = tmp_path / "pages"
    real_dir.mkdir()
    real = real_dir / "real.html"
    real.write_text("old")
    link = tmp_path / "page.html"
    link.symlink_to(real)
    assert write_html(make_data(), link) == link
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not [p for d in (tmp_path, real_dir) for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_write_html_refuses_a_fifo_or_a_device(tmp_path, kind):
    """A FIFO or a device node at the path (or behind a link) is refused, named, and left as it is."""
    target = tmp_path / "page.html"
    if kind == "fifo":
        os.mkfifo(target)
        is_kind, words = stat.S_ISFIFO, "a FIFO"
    else:
        try:
            os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except OSError as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
        is_kind, words = stat.S_ISCHR, "a character device"
    link = tmp_path / "link.html"
    link.symlink_to(target)
    for path in (target, link):
        with pytest.raises(OSError, match=f"cannot write HTML to '{path}'.*: it is {words}"):
            write_html(make_data(), path)
    assert is_kind(os.lstat(target).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "page.html"]
