"""`qkv explain --image FILE`: the grids, the prediction, the PNG, HTML and JSON files (offline, the
JSON checked by the schema), --steps, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import qkv
from cli_checks import one_line_error
from qkv import cli
from qkv.inspect.schema import check_data
from qkv.models import bundled_path

Image = pytest.importorskip("PIL.Image")

DIGIT = str(bundled_path("digits") / "samples" / "digit-3.png")


def run(capsys, argv) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"exit {code}; stderr {err[:500]!r}"
    return out


@pytest.fixture(scope="module")
def reference():
    return qkv.explain(image=DIGIT, model="digits")


def test_explain_image_prints_the_prediction_and_grids(capsys, reference):
    out = run(capsys, ["explain", "--image", DIGIT])
    top = reference.image.prediction(1)[0]
    assert f"prediction: {top['label']} {top['probability'] * 100:.1f}%" in out
    for lay in range(reference.num_layers):
        assert f"layer {lay} mean" in out
    assert f"rollout L{reference.num_layers - 1}" in out
    maps = reference.image_maps()  # (L, H, rows, cols)
    mean = maps[1].mean(dim=0)
    r, c = divmod(int(mean.argmax()), mean.shape[1])
    assert f"max r{r}c{c} {float(mean[r, c]):.3f}" in out
    out = run(capsys, ["explain", "--image", DIGIT, "--focus", "r1c2", "--layer", "2"])
    assert "from patch r1c2" in out and "layer 2 h3" in out and "layer 1 mean" not in out


def test_explain_image_writes_png_html_json(tmp_path, capsys, reference):
    files = {kind: tmp_path / f"digit.{kind}" for kind in ("png", "html", "json")}
    argv = ["explain", "--image", DIGIT, "--model", "digits"]
    for kind, path in files.items():
        argv += [f"--{kind}", str(path)]
    out = run(capsys, argv)
    for path in files.values():
        assert f"wrote {path}" in out
    data = json.loads(files["json"].read_text())
    check_data(data)
    assert data["modality"] == "image" and data["image"]["grid"] == [4, 4] and data["view"] == "full"
    assert data["image"]["pixels"].startswith("data:image/png;base64,")
    np.testing.assert_allclose(np.asarray(data["maps"])[:, :, 0, 1:].reshape(reference.image_maps().shape),
                               reference.image_maps().numpy(), atol=1e-5)
    png = files["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = files["html"].read_text(encoding="utf-8")
    for text in (data["text"], data["image"]["name"]):  # the user's text may hold anything
        page = page.replace(text, "")
    low = page.lower()
    assert "http://" not in low and "https://" not in low, "the page names a network address"
    assert not re.search(r"<script[^>]*\bsrc\s*=", low), "the page loads an external script"


def test_file_names_are_user_text(tmp_path, capsys):
    """A file name with markup and a URL: the page escapes it and loads nothing."""
    odd = tmp_path / "<img src=x onerror=alert(1)> https:evil.example.png"
    odd.write_bytes((bundled_path("digits") / "samples" / "digit-5.png").read_bytes())
    run(capsys, ["explain", "--image", str(odd), "--html", str(tmp_path / "p.html"), "--png",
                 str(tmp_path / "p.png")])
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page


def test_options_reach_the_files(tmp_path, capsys, reference):
    path = tmp_path / "r.json"
    run(capsys, ["explain", "--image", DIGIT, "--focus", "r2c1", "--method", "rollout", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["method"] == "rollout" and data["focus"]["label"] == "r2c1"
    run(capsys, ["explain", "--image", DIGIT, "--focus", "r2c1", "--hide-special", "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["image"]["class_token"] is None and data["image"]["first_patch"] == 0
    run(capsys, ["explain", "--image", DIGIT, "--rows", "focus", "--json", str(path)])
    data = json.loads(path.read_text())
    check_data(data)
    assert data["view"] == "rows" and data["rows"]["k"] == len(data["labels"]), "the row must ship whole"
    run(capsys, ["explain", "--image", DIGIT, "--rows", "all", "--top-k", "3", "--level", "token",
                 "--aggregate", "max", "--png", str(tmp_path / "r.png")])


def test_steps(capsys, reference):
    out = run(capsys, ["explain", "--image", DIGIT, "--steps", "3,1"])
    steps = reference.steps("cls", 3, 1)
    assert "layer 3, head 1, query token '[CLS]'" in out
    for label, w in zip(steps.labels, steps.weights.tolist()):
        assert re.search(rf"{re.escape(label)}\s+\S+\s+{w:.4f}\b", out), label
    out = run(capsys, ["explain", "--image", DIGIT, "--focus", "r0c3", "--steps", "0,2"])
    assert "query token 'r0c3'" in out
    out = run(capsys, ["explain", "The cat sat on the mat.", "--focus", "cat", "--steps", "2,3"])
    assert "layer 2, head 3, query token 'cat'" in out


def test_interpolate(tmp_path, capsys):
    big = tmp_path / "sixteen.png"
    Image.fromarray((np.arange(256).reshape(16, 16) % 251).astype(np.uint8), mode="L").save(big)
    one_line_error(capsys, ["explain", "--image", str(big)], "16x16", "takes 8x8", "--interpolate")
    path = tmp_path / "i.json"
    run(capsys, ["explain", "--image", str(big), "--interpolate", "--json", str(path)])
    assert json.loads(path.read_text())["image"]["grid"] == [8, 8]


def _bad_images(tmp_path) -> dict:
    paths = {}
    paths["text"] = tmp_path / "notes.png"
    paths["text"].write_text("not a picture")
    paths["sixteen"] = tmp_path / "deep.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(paths["sixteen"])
    paths["alpha"] = tmp_path / "alpha.png"
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, mode="RGBA").save(paths["alpha"])
    paths["colour"] = tmp_path / "colour.png"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(paths["colour"])
    paths["small"] = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 6), np.uint8), mode="L").save(paths["small"])
    return paths


def test_bad_images_one_line(tmp_path, capsys):
    bad = _bad_images(tmp_path)
    one_line_error(capsys, ["explain", "--image", str(bad["text"])], "notes.png", "not an image")
    one_line_error(capsys, ["explain", "--image", str(bad["sixteen"])], "16-bit")
    one_line_error(capsys, ["explain", "--image", str(bad["alpha"])], "transparent")
    one_line_error(capsys, ["explain", "--image", str(bad["colour"])], "colour", "grayscale")
    one_line_error(capsys, ["explain", "--image", str(bad["small"])], "6x4 pixels", "8x8")
    one_line_error(capsys, ["explain", "--image", str(tmp_path / "missing.png")], "missing.png", "does not exist")
    one_line_error(capsys, ["explain", "--image", str(tmp_path)], "is a folder")


@pytest.mark.parametrize("argv,needles", [
    ([], ["give the TEXT to explain, or --image FILE"]),
    (["The cat.", "--image", DIGIT], ["not both"]),
    (["--image", DIGIT, "--model", "minilm"], ["'minilm' reads text", "--image needs a vision transformer"]),
    (["The cat sat.", "--model", "digits"], ["'digits' reads images: pass --image FILE"]),
    (["--image", DIGIT, "--compare", "The dog."], ["--compare", "drop it with --image"]),
    (["--image", DIGIT, "--truncate"], ["--truncate", "drop it with --image"]),
    (["--image", DIGIT, "--hide-special"], ["--hide-special", "--focus r1c2"]),
    (["--image", DIGIT, "--focus", "r9c9"], ["'r9c9' is not a patch", "r0c0 to r3c3"]),
    (["--image", DIGIT, "--focus", "cat"], ["not a patch"]),
    (["--image", DIGIT, "--layer", "4"], ["--layer 4", "layers 0..3"]),
    (["--image", DIGIT, "--head", "4"], ["--head 4", "heads 0..3"]),
    (["--image", DIGIT, "--steps", "9,0"], ["--steps 9,0", "layers 0..3"]),
    (["--image", DIGIT, "--steps", "1"], ["--steps", "LAYER,HEAD"]),
    (["--image", DIGIT, "--method", "rollout", "--head", "1"], ["--method rollout", "--head"]),
    (["The cat sat.", "--interpolate"], ["--interpolate is for images"]),
    (["The cat sat.", "--steps", "0,0"], ["--steps needs --focus WORD"]),
    (["--image", DIGIT, "--json", "{tmp}/a.json", "--png", "{tmp}/a.json"], ["name the same file"]),
])
def test_bad_flags_one_line(tmp_path, capsys, argv, needles):
    one_line_error(capsys, ["explain", *[a.replace("{tmp}", str(tmp_path)) for a in argv]], *needles)


def test_a_vit_folder(tmp_path, capsys):
    """A Hugging Face ViTForImageClassification folder (random weights, RGB, 16x16, patch 4, no
    preprocessor: other sizes are refused unless --interpolate)."""
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=16, patch_size=4, num_labels=3,
                                    id2label={"0": "zero", "1": "one", "2": "two"})
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).eval().save_pretrained(tmp_path / "vit")
    picture = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), mode="RGB").save(picture)
    path = tmp_path / "v.json"
    out = run(capsys, ["explain", "--image", str(picture), "--model", str(tmp_path / "vit"), "--json", str(path)])
    assert "prediction:" in out and "layer 1 mean" in out
    data = json.loads(path.read_text())
    check_data(data)
    assert data["image"]["grid"] == [4, 4] and data["image"]["channels"] == 3
    small = tmp_path / "s.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(small)
    one_line_error(capsys, ["explain", "--image", str(small), "--model", str(tmp_path / "vit")], "8x8",
                   "takes 16x16", "--interpolate")
    # a grayscale file for this RGB model: explained, its grey repeated over the channels, and said in one line
    grey = tmp_path / "g.png"
    Image.fromarray((np.random.default_rng(1).random((16, 16)) * 255).astype(np.uint8), mode="L").save(grey)
    gpath = tmp_path / "g.json"
    assert cli.main(["explain", "--image", str(grey), "--model", str(tmp_path / "vit"), "--json", str(gpath)]) == 0
    out, err = capsys.readouterr()
    assert "prediction:" in out and json.loads(gpath.read_text())["image"]["channels"] == 3
    assert err.count("\n") == 1 and "is a grayscale image" in err and "repeated over the three channels" in err


def test_color_always(capsys):
    out = run(capsys, ["explain", "--image", DIGIT, "--color", "always", "--layer", "0"])
    assert "\x1b[48;5;" in out
    plain = run(capsys, ["explain", "--image", DIGIT, "--color", "never", "--layer", "0"])
    assert "\x1b[" not in plain and "█" in plain
