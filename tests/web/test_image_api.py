"""`qkv serve` explains images: the API of an image model (the bundled digits, tiny random ViT
folders under --model-dir) through Starlette's TestClient. Its answers are those of
`qkv.explain(image=...)` on the same image; every bad image or wrong input is one 4xx line
that never reaches the catch-all, and a sample is named, never located."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from starlette.testclient import TestClient

import qkv
from qkv.inspect.image import samples as sample_files
from qkv.models import bundled_path
from qkv.web.app import create_app

from .web_helpers import TEXT

Image = pytest.importorskip("PIL.Image")

DIGITS = bundled_path("digits")
SAMPLE = "digit-3.png"


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(raw).decode("ascii")


def png_bytes(img) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def as_json(x):
    return json.loads(json.dumps(x))


@pytest.fixture(scope="module")
def app():
    return create_app()


def assert_error(resp, status, code, says="", asked=""):
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:300]}"
    err = resp.json()["error"]
    assert err["status"] == status and err["code"] == code, err
    assert says in err["message"], err
    assert "\n" not in err["message"] and "Traceback" not in resp.text
    assert str(DIGITS) not in err["message"].replace(asked, ""), "a server path in an answer"
    return err


def answer(resp) -> dict:
    assert resp.status_code == 200, resp.text[:400]
    data = resp.json()
    data.pop("session")
    return data


# --------------------------------------------------------------------------- models and samples


def test_models_say_their_modality_and_image_limits(client):
    m = client.get("/api/models").json()
    modality = {e["name"]: e["modality"] for e in m["models"]}
    assert modality["digits"] == "image" and modality["minilm"] == "text" and modality["recall"] == "text"
    assert m["image_limits"]["max_image_bytes"] == 8 * 2**20 and m["image_limits"]["max_image_pixels"] == 4096**2


def test_samples_are_the_folders_pngs_as_data_urls(client):
    got = client.get("/api/samples", params={"model": "digits"}).json()
    files = sample_files(DIGITS)
    assert got["model"] == "digits" and got["modality"] == "image"
    assert [s["name"] for s in got["samples"]] == [p.name for p in files] and len(files) == 10
    for s, path in zip(got["samples"], files):
        head, b64 = s["pixels"].split(",", 1)
        assert head == "data:image/png;base64" and base64.b64decode(b64) == path.read_bytes()
    assert client.get("/api/samples", params={"model": "minilm"}).json()["samples"] == []
    assert_error(client.get("/api/samples", params={"model": "nope"}), 404, "unknown_model")
    assert_error(client.get("/api/samples"), 422, "missing_field", "'model'")
    assert_error(client.get("/api/samples", params={"model": "../digits"}), 404, "unknown_model")


# --------------------------------------------------------------------------- the answers


@pytest.mark.parametrize("options, core", [
    ({}, {}),
    ({"method": "rollout", "hide_special": True}, {"method": "rollout", "hide_special": True}),
    ({"method": "value-norm", "focus": "r1c2"}, {"method": "value-norm", "focus": 7}),
    ({"focus": "cls", "level": "token"}, {"focus": 0, "level": "token"}),
    ({"rows": "focus", "focus": "r2c0"}, "focus"),
])
def test_a_sample_is_explained_as_qkv_explain_does(client, options, core):
    got = answer(client.post("/api/explain", json={"model": "digits", "sample": SAMPLE, **options}))
    if core == "focus":  # only the focus patch's rows recorded and shipped, as the core does
        result = qkv.explain(image=DIGITS / "samples" / SAMPLE, model="digits", focus="r2c0", rows="focus")
        want = result.to_dict(focus=result.focus_index("r2c0"), rows="focus")
    else:
        want = qkv.explain(image=DIGITS / "samples" / SAMPLE, model="digits").to_dict(**core)
    assert got == as_json(want)
    assert got["modality"] == "image" and got["text"] == SAMPLE and got["image"]["name"] == SAMPLE
    assert got["image"]["grid"] == [4, 4] and got["labels"][got["image"]["first_patch"]] == "r0c0"


def test_an_upload_is_explained_as_its_file(client):
    """The same bytes uploaded (a data URL, or bare base64 wrapped over lines) give the sample's answer;
    the upload is named by image_name (default "image")."""
    raw = (DIGITS / "samples" / SAMPLE).read_bytes()
    want = as_json(qkv.explain(image=DIGITS / "samples" / SAMPLE, model="digits").to_dict())
    got = answer(client.post("/api/explain", json={"model": "digits", "image": data_url(raw), "image_name": SAMPLE}))
    assert got == want
    b64 = base64.encodebytes(raw).decode("ascii")  # lines of 76 characters
    bare = answer(client.post("/api/explain", json={"model": "digits", "image": b64}))
    assert bare["text"] == bare["image"]["name"] == "image"
    assert {k: v for k, v in bare.items() if k not in ("text", "image")} == \
        {k: v for k, v in want.items() if k not in ("text", "image")}
    assert bare["image"]["pixels"] == want["image"]["pixels"]


def test_a_pil_image_uploaded_is_read_as_the_core_reads_it(client):
    """A GIF and a JPEG of a digit: the answer is qkv.explain of the same PIL image."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((8, 8)) * 255).astype(np.uint8)
    for fmt in ("GIF", "JPEG", "BMP"):
        out = io.BytesIO()
        Image.fromarray(pixels, "L").save(out, format=fmt)
        raw = out.getvalue()
        got = answer(client.post("/api/explain", json={"model": "digits", "image": data_url(raw), "image_name": "x"}))
        want = qkv.explain(image=Image.open(io.BytesIO(raw)), model="digits").to_dict()
        want["text"] = want["image"]["name"] = "x"
        assert got == as_json(want), fmt


@pytest.mark.parametrize("word, index", [("r1c2", 7), ("cls", 0), ("R3C3", 16), (5, 5)])
def test_steps_of_a_patch_and_of_the_class_token(client, word, index):
    r = client.post("/api/steps", json={"model": "digits", "sample": SAMPLE, "word": word, "layer": 2, "head": 1})
    assert r.status_code == 200, r.text
    got = r.json()
    result = qkv.explain(image=DIGITS / "samples" / SAMPLE, model="digits")
    s = result.steps(index, 2, 1)
    assert got["token"] == index and got["token_label"] == result.tokens[index] and got["labels"] == result.tokens
    assert got["text"] == SAMPLE
    np.testing.assert_allclose(got["weights"], s.weights.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(got["query"], s.query.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(got["output"], s.output.double().numpy(), atol=1e-6)
    # the weights drawn for that row in the full maps are these
    maps = client.post("/api/explain", json={"model": "digits", "sample": SAMPLE}).json()["maps"]
    np.testing.assert_allclose(maps[2][1][index], got["weights"], atol=1e-5)


def test_steps_count_shown_units_with_the_class_token_hidden(client):
    """An index is among the units shown: with hide_special, 0 is the patch r0c0 (token 1)."""
    r = client.post("/api/steps", json={"model": "digits", "sample": SAMPLE, "word": 0, "layer": 0, "head": 3,
                                        "hide_special": True})
    assert r.status_code == 200, r.text
    s = qkv.explain(image=DIGITS / "samples" / SAMPLE, model="digits").steps(1, 0, 3)
    assert r.json()["token"] == 1 and r.json()["token_label"] == "r0c0"
    np.testing.assert_allclose(r.json()["weights"], s.weights.double().numpy(), atol=1e-6)


def test_a_session_gives_an_image_s_rows(client):
    first = client.post("/api/explain", json={"model": "digits", "sample": SAMPLE})
    assert first.status_code == 200
    rows = client.post("/api/weights", json={"session": first.json()["session"], "rows": [0, 7], "layers": [3],
                                             "heads": [2]})
    assert rows.status_code == 200, rows.text
    np.testing.assert_allclose(rows.json()["weights"][0][0], [first.json()["maps"][3][2][i] for i in (0, 7)],
                               atol=1e-5)


def test_answers_follow_their_models(client):
    from qkv.inspect.schema import check_data
    from qkv.web.schema import ExplainAnswer, StepsData

    data = client.post("/api/explain", json={"model": "digits", "sample": SAMPLE}).json()
    ExplainAnswer.model_validate(data)
    data.pop("session")
    check_data(data)
    StepsData.model_validate(client.post("/api/steps", json={"model": "digits", "sample": SAMPLE, "word": "cls",
                                                             "layer": 0, "head": 0}).json())


# --------------------------------------------------------------------------- refusals


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit grey) and whose data is a few bytes: a
    decompression bomb to anything that decodes before it looks."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _grey(size=(8, 8), value=128):
    return Image.new("L", size, value)


def _noise_png() -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(5).integers(0, 255, (8, 8), dtype=np.uint8), "L"))


def _bad_images() -> list:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    rgba.putpixel((3, 3), (10, 20, 30, 0))
    colour = Image.new("RGB", (8, 8), (200, 10, 10))
    sixteen = Image.new("I;16", (8, 8), 40000)
    return [
        (png_bytes(rgba), 400, "bad_image", "transparent pixels"),
        (png_bytes(colour), 400, "bad_image", "colour (RGB) image but this model reads grayscale"),
        (png_bytes(sixteen), 400, "bad_image", "16-bit"),
        (png_bytes(_grey((10, 10))), 400, "bad_image", "10x10 pixels but this model takes 8x8"),
        (png_bytes(_grey((1, 1))), 400, "bad_image", "1x1 pixels but this model takes 8x8"),
        (b"GIF89a not really", 400, "bad_image", "is not an image this server reads"),
        (b"%PDF-1.4 a document, not an image", 400, "bad_image", "is not an image this server reads"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 400, "bad_image", "is not an image this server reads"),
        (_noise_png()[:-40], 400, "bad_image", "could not be decoded"),  # truncated in its pixel data
    ]


@pytest.mark.parametrize("raw, status, code, says", _bad_images(),
                         ids=["alpha", "colour", "16-bit", "size", "tiny", "bad-gif", "pdf", "svg", "truncated"])
def test_bad_images_are_one_line(client, raw, status, code, says):
    err = assert_error(client.post("/api/explain", json={"model": "digits", "image": data_url(raw)}), status, code,
                       says)
    assert err["message"].startswith("'image'")
    steps = {"model": "digits", "image": data_url(raw), "word": "cls", "layer": 0, "head": 0}
    assert_error(client.post("/api/steps", json=steps), status, code, says)


@pytest.mark.parametrize("image, says", [
    ("", "'image' is empty"),
    ("data:image/png,rawtext", "without base64 data"),
    ("data:image/png;base64", "without base64 data"),
    ("not base64 at all!", "is not base64 text"),
    ("data:image/png;base64,abc", "is not base64 text"),
])
def test_what_is_not_base64_is_refused(client, image, says):
    assert_error(client.post("/api/explain", json={"model": "digits", "image": image}), 400, "bad_image", says)


def test_interpolation_takes_another_size():
    """With interpolate_pos_encoding a 10 x 12 digit is read as a 6x5 grid of patches, as qkv.explain reads it."""
    raw = png_bytes(_grey((10, 12), 90))
    with TestClient(create_app()) as c:
        got = answer(c.post("/api/explain", json={"model": "digits", "image": data_url(raw), "image_name": "x",
                                                  "interpolate_pos_encoding": True}))
    want = qkv.explain(image=Image.open(io.BytesIO(raw)), model="digits", interpolate_pos_encoding=True).to_dict()
    want["text"] = want["image"]["name"] = "x"
    assert got == as_json(want) and got["image"]["grid"] == [6, 5]  # 12 high, 10 wide


def test_too_large_images_are_refused_before_decoding(monkeypatch):
    app = create_app(max_image_mb=1, max_image_pixels=64 * 64)
    raw = png_bytes(_grey()) + b"\0" * 2**20  # a file just over 1 MB
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    with TestClient(app) as c:
        err = assert_error(c.post("/api/explain", json={"model": "digits", "image": data_url(raw)}), 413,
                           "image_too_large", "--max-image-mb")
        assert err["limit"]["name"] == "max_image_bytes" and err["limit"]["limit"] == 2**20
        for w, h in ((65, 64), (100_000, 100_000), (2**31 - 1, 2**31 - 1)):  # bombs: tiny files, huge headers
            err = assert_error(c.post("/api/explain", json={"model": "digits", "image": data_url(_png_header(w, h))}),
                               413, "image_too_large", "--max-image-pixels")
            assert err["limit"]["name"] == "max_image_pixels"
        assert decoded == [], "an image over the limits was decoded"
        ok = c.post("/api/explain", json={"model": "digits", "sample": SAMPLE})
        assert ok.status_code == 200 and decoded, "the sample was not decoded"
    assert app.state.internal_errors == 0


def test_the_cost_budgets_apply_to_images():
    with TestClient(create_app(max_cost=1000)) as c:
        err = assert_error(c.post("/api/explain", json={"model": "digits", "sample": SAMPLE}), 413, "too_costly",
                           "--max-cost")
        assert err["limit"]["estimate"] == 17 * 17 * 4 * 4  # units^2 x layers x heads


@pytest.mark.parametrize("name", ["../x", "../digits/samples/digit-3.png", "/etc/passwd", "samples/digit-3.png",
                                  "digit-3", "DIGIT-3.PNG", str(DIGITS / "samples" / SAMPLE), "..", "."])
def test_sample_names_are_looked_up_never_joined(client, name):
    assert_error(client.post("/api/explain", json={"model": "digits", "sample": name}), 404, "unknown_sample",
                 "has no sample named", asked=name)


@pytest.mark.parametrize("path, body, status, code, says", [
    ("/api/explain", {"model": "digits", "text": TEXT}, 400, "wrong_input", "reads images, not text"),
    ("/api/explain", {"model": "minilm", "sample": SAMPLE}, 400, "wrong_input", "reads text, not images"),
    ("/api/explain", {"model": "minilm", "image": "abc"}, 400, "wrong_input", "pick an image model (digits)"),
    ("/api/steps", {"model": "digits", "text": TEXT, "word": "cat", "layer": 0, "head": 0}, 400, "wrong_input",
     "reads images"),
    ("/api/steps", {"sample": SAMPLE, "word": "cls", "layer": 0, "head": 0}, 400, "wrong_input", "reads text"),
    ("/api/compare", {"model": "digits", "text": TEXT, "other": TEXT}, 400, "wrong_input", "compare takes two"),
    ("/api/explain", {"model": "digits"}, 422, "missing_field", "give 'image'"),
    ("/api/explain", {"model": "digits", "sample": SAMPLE, "image": "abc"}, 422, "bad_value", "give one input"),
    ("/api/explain", {"model": "digits", "sample": SAMPLE, "image_name": "x"}, 422, "bad_value", "'image_name'"),
    ("/api/explain", {"text": TEXT, "interpolate_pos_encoding": True}, 422, "bad_value", "leave it out"),
    ("/api/explain", {"model": "digits", "sample": SAMPLE, "focus": "r9c9"}, 422, "unknown_word",
     "r0c0 to r3c3"),
    ("/api/explain", {"model": "digits", "sample": SAMPLE, "focus": "cat"}, 422, "unknown_word", "not a patch"),
    ("/api/steps", {"model": "digits", "sample": SAMPLE, "word": "r4c0", "layer": 0, "head": 0}, 422,
     "unknown_word", "not a patch"),
    ("/api/steps", {"model": "digits", "sample": SAMPLE, "word": "cls", "layer": 4, "head": 0}, 422,
     "unknown_layer", "layers 0..3"),
    ("/api/explain", {"model": "digits", "sample": 3}, 422, "wrong_type", "'sample' must be a string"),
    ("/api/explain", {"model": "digits", "image": ["x"]}, 422, "wrong_type", "'image' must be a string"),
    ("/api/explain", {"model": "digits", "sample": ""}, 422, "bad_value", "'sample' is empty"),
    ("/api/explain", {"model": "digits", "sample": "x" * 201}, 422, "bad_value", "at most 200"),
    ("/api/explain", {"model": "digits", "image": "x", "image_name": "\ud800"}, 422, "bad_value",
     "'image_name' is not valid"),
    ("/api/explain", {"model": "digits", "sample": "\udc00x"}, 422, "bad_value", "'sample' is not valid"),
    ("/api/explain", {"model": "digits", "level": "x"}, 422, "missing_field", "the field 'text' is required"),
])
def test_wrong_inputs(client, path, body, status, code, says):
    resp = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_error(resp, status, code, says)


def test_a_text_model_still_explains_text(client):
    got = client.post("/api/explain", json={"text": TEXT, "model": "recall"})
    assert got.status_code == 200 and got.json()["modality"] == "text" and "image" not in got.json()


def test_an_image_name_is_returned_as_text_not_markup(client):
    raw = (DIGITS / "samples" / SAMPLE).read_bytes()
    name = '<img src=x onerror=alert(1)>"&.png'
    got = client.post("/api/explain", json={"model": "digits", "image": data_url(raw), "image_name": name}).json()
    assert got["text"] == got["image"]["name"] == name


# --------------------------------------------------------------------------- ViT folders under --model-dir


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from models.test_vit import build  # tiny random transformers ViTs (tests/models/test_vit.py)

    root = tmp_path_factory.mktemp("vit-dir")
    build(root / "vit-cls", processor={"size": {"height": 16, "width": 16}, "do_normalize": True,
                                       "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]})
    build(root / "vit-bare", "ViTModel", num_channels=1, seed=2)
    samples = root / "vit-cls" / "samples"
    samples.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8), "RGB").save(samples / "noise.png")
    (samples / "not-a-png.png").write_bytes(b"hello")
    (samples / "notes.txt").write_text("not an image")
    return root


def test_vit_folders_are_offered_as_image_models(vit_dir):
    app = create_app(model_dir=str(vit_dir))
    reg = app.state.service.registry
    assert reg.skipped == {}, reg.skipped
    rng = np.random.default_rng(4)
    photo = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8), "RGB")  # resized to 16x16
    out = io.BytesIO()
    photo.save(out, format="JPEG")
    raw = out.getvalue()
    with TestClient(app) as c:
        models = {e["name"]: e for e in c.get("/api/models").json()["models"]}
        assert models["vit-cls"] == {"name": "vit-cls", "source": "model-dir", "modality": "image"}
        assert models["vit-bare"]["modality"] == "image"
        listed = c.get("/api/samples", params={"model": "vit-cls"}).json()["samples"]
        assert [s["name"] for s in listed] == ["noise.png"]  # not-a-png.png is left out
        assert c.get("/api/samples", params={"model": "vit-bare"}).json()["samples"] == []

        got = answer(c.post("/api/explain", json={"model": "vit-cls", "image": data_url(raw, "image/jpeg"),
                                                  "image_name": "photo.jpg", "focus": "r1c1"}))
        want = qkv.explain(image=Image.open(io.BytesIO(raw)), model=qkv.load(vit_dir / "vit-cls"), name="vit-cls")
        want_d = want.to_dict(focus=want.focus_index("r1c1"))
        want_d["text"] = want_d["image"]["name"] = "photo.jpg"
        assert got == as_json(want_d)
        assert got["image"]["grid"] == [4, 4] and len(got["image"]["prediction"]) == 5

        sample = answer(c.post("/api/explain", json={"model": "vit-cls", "sample": "noise.png"}))
        want = qkv.explain(image=vit_dir / "vit-cls" / "samples" / "noise.png", model=qkv.load(vit_dir / "vit-cls"),
                           name="vit-cls")
        assert sample == as_json(want.to_dict())

        grey = png_bytes(_grey((16, 16), 77))
        bare = answer(c.post("/api/explain", json={"model": "vit-bare", "image": data_url(grey)}))
        assert bare["image"]["prediction"] == [] and bare["image"]["channels"] == 1
        steps = c.post("/api/steps", json={"model": "vit-bare", "image": data_url(grey), "word": "r0c3", "layer": 1,
                                           "head": 3})
        assert steps.status_code == 200, steps.text
        np.testing.assert_allclose(steps.json()["weights"], bare["maps"][1][3][4], atol=1e-5)
        assert_error(c.post("/api/explain", json={"model": "vit-bare", "image": data_url(png_bytes(_grey((8, 8))))}),
                     400, "bad_image", "8x8 pixels but this model takes 16x16")
    assert app.state.internal_errors == 0


def test_a_big_vit_answers_the_compact_view_and_its_rows(tmp_path):
    """A ViT of 32 x 32 patches (1025 units, 2 layers x 4 heads: over FULL_CELLS) answers the compact
    view, as qkv.explain's to_dict does; the rows of any patch come from its session (/api/weights)."""
    from models.vit_folders import build

    build(tmp_path / "big", "ViTModel", image_size=128, patch_size=4, num_channels=1, seed=3)
    img = Image.fromarray((np.random.default_rng(1).random((128, 128)) * 255).astype(np.uint8), "L")
    app = create_app(model_dir=str(tmp_path))
    with TestClient(app) as c:
        got = c.post("/api/explain", json={"model": "big", "image": data_url(png_bytes(img)), "image_name": "x"})
        assert got.status_code == 200, got.text
        data = got.json()
        sid = data.pop("session")
        result = qkv.explain(image=img, model=qkv.load(tmp_path / "big"), name="big")
        want = result.to_dict()
        want["text"] = want["image"]["name"] = "x"
        assert data == as_json(want) and data["view"] == "rows" and "maps" not in data
        from qkv.web.schema import request_models

        body = request_models(app.state.limits)[0](model="big", image=data_url(png_bytes(img)), image_name="x")
        plan = app.state.service.explain(body)()
        assert len(got.content) <= plan.cost.answer, "the answer is larger than its estimate (rows of every key)"
        unit = data["labels"].index("r17c30")
        rows = c.post("/api/weights", json={"session": sid, "rows": [unit, 0], "layers": [1], "heads": [2]})
        assert rows.status_code == 200, rows.text
        maps = result.maps()  # (L, H, n, n)
        np.testing.assert_allclose(rows.json()["weights"][0][0], maps[1, 2][[unit, 0]].double().numpy(), atol=1e-5)
    assert app.state.internal_errors == 0


def test_an_upload_is_turned_upright_as_its_exif_orientation_says(client, tmp_path):
    """The same EXIF rule as a file given to qkv.explain: the answer equals explain of that file."""
    stored = np.zeros((8, 8), dtype=np.uint8)
    stored[:, 4:] = np.arange(32, dtype=np.uint8).reshape(8, 4) * 8  # (H, W): the left half blank
    img = Image.fromarray(stored, mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to view
    out = io.BytesIO()
    img.save(out, format="PNG", exif=exif)
    (tmp_path / "side.png").write_bytes(out.getvalue())
    got = answer(client.post("/api/explain", json={"model": "digits", "image": data_url(out.getvalue()),
                                                    "image_name": "side.png"}))
    want = as_json(qkv.explain(image=tmp_path / "side.png", model="digits").to_dict())
    assert got == want
    upright = Image.open(io.BytesIO(base64.b64decode(got["image"]["pixels"].split(",", 1)[1])))
    assert np.array_equal(np.asarray(upright), np.rot90(stored, k=-1))


def test_an_interpolated_grid_is_costed_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    """A 4096 x 4096 black PNG is 16 KB; with interpolated positions the digits model would read it as
    2048 x 2048 patches. The cost of that grid is refused from the file's header: no pixel is decoded."""
    from PIL import ImageFile

    big = png_bytes(Image.new("L", (4096, 4096)))
    assert len(big) < 64 * 1024
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    app = create_app()
    with TestClient(app) as c:
        err = assert_error(c.post("/api/explain", json={"model": "digits", "image": data_url(big),
                                                        "interpolate_pos_encoding": True}), 413, "too_costly")
        assert "4,194,305 tokens" in err["message"]
        assert decoded == [], "the pixels were decoded before the cost was checked"
        ok = c.post("/api/explain", json={"model": "digits", "image": data_url(png_bytes(Image.new("L", (12, 12)))),
                                          "interpolate_pos_encoding": True})
        assert ok.status_code == 200 and ok.json()["image"]["grid"] == [6, 6] and set(decoded) == {(12, 12)}
    assert app.state.internal_errors == 0
