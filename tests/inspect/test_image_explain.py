"""Explain for images (qkv.inspect.image): a vision transformer's class token and patches as units.

The recorded weights are checked against transformers' own attention probabilities of the same
checkpoint (tiny random ViT folders built here), the image maps against the result's own rows, the
"image" block of to_dict against the pixels the model read, and every refusal for one clear line."""

from __future__ import annotations

import base64
import io

import pytest
import torch

import qkv
from qkv.inspect import analysis
from qkv.inspect.image import ImageInfo, attention_distance, patch_labels, png_data_url, samples
from qkv.inspect.schema import check_data
from qkv.models import bundled_path
from qkv.models.images import ImageError

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from models.vit_folders import build  # noqa: E402  (after the skips: it imports transformers)

DIGIT = bundled_path("digits") / "samples" / "digit-3.png"


@pytest.fixture(scope="module")
def digit():
    return qkv.explain(image=DIGIT, model="digits")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_explain")
    ref = build(folder)
    return folder, ref, qkv.load(folder)


@pytest.mark.parametrize("seed", [0, 1])
def test_weights_equal_transformers_attention_probabilities(vit, seed):
    folder, ref, model = vit
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))  # fresh random image
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        want = ref(x, output_attentions=True)
    r = qkv.explain(image=x, model=model)
    assert r.tokens == ["[CLS]"] + patch_labels(4, 4)
    got = r.attentions  # (layers, heads, 17, 17)
    torch.testing.assert_close(got, torch.cat(want.attentions), atol=1e-5, rtol=1e-4)
    # the prediction is the classifier's softmax, the same as classify's
    torch.testing.assert_close(r.image.probabilities, want.logits[0].softmax(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.image.probabilities, model.classify(x)[0])


def test_image_maps_are_the_focus_rows_over_the_patch_grid(digit):
    r = digit
    full = r.attentions  # (L, H, 17, 17), token = unit for an image
    maps = r.image_maps()  # the class token's row
    assert maps.shape == (4, 4, 4, 4)
    torch.testing.assert_close(maps, full[:, :, 0, 1:].reshape(4, 4, 4, 4))
    patch = r.image_maps("r2c1")  # patch (2, 1) is unit 1 + 2 * 4 + 1
    torch.testing.assert_close(patch, full[:, :, 10, 1:].reshape(4, 4, 4, 4))
    rollout = r.image_maps("cls", "rollout")  # (L, 1, 4, 4)
    want = analysis.rollout(full.double().mean(dim=1)).float()[:, 0, 1:]  # (L, 16)
    torch.testing.assert_close(rollout[:, 0].reshape(4, 16), want, atol=1e-6, rtol=1e-5)
    hidden = r.image_maps("r0c0", hide_special=True)  # the class token hidden, rows renormalised
    row = full[:, :, 1, 1:]
    torch.testing.assert_close(hidden.reshape(4, 4, 16), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="class token is hidden"):
        r.image_maps("cls", hide_special=True)


def test_recording_leaves_the_prediction_unchanged(digit):
    model = qkv.load("digits")
    torch.testing.assert_close(digit.image.probabilities, model.classify(DIGIT)[0], atol=0, rtol=0)
    assert digit.image.prediction(1)[0]["label"] == "3"


def test_to_dict_image_block(digit):
    d = digit.to_dict(focus="cls")
    assert check_data(d) == (17, 4, 4)
    assert d["modality"] == "image" and d["view"] == "full" and d["labels"][0] == "[CLS]"
    img = d["image"]
    assert img["grid"] == [4, 4] and img["patch"] == 2 and img["size"] == [8, 8] and img["channels"] == 1
    assert (img["first_patch"], img["class_token"]) == (1, 0)
    assert d["focus"]["index"] == 0
    assert [p["label"] for p in img["prediction"]] == [p["label"] for p in digit.image.prediction()]
    picture = Image.open(io.BytesIO(base64.b64decode(img["pixels"].split(",", 1)[1])))
    assert picture.mode == "L" and picture.size == (8, 8)
    pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).float().view(8, 8) / 255
    torch.testing.assert_close(pixels, digit.image.pixels[0], atol=0.5 / 255, rtol=0)
    hidden = digit.to_dict(hide_special=True)
    assert check_data(hidden) == (16, 4, 4)
    assert (hidden["image"]["first_patch"], hidden["image"]["class_token"]) == (0, None)
    text = qkv.explain("a cat", model="minilm").to_dict()
    assert text["modality"] == "text" and "image" not in text


def test_compact_view_ships_the_class_token_row_whole(digit):
    d = digit.to_dict(rows=[0])
    assert check_data(d) == (17, 4, 4) and d["view"] == "rows"
    assert d["rows"]["index"] == [0] and d["rows"]["k"] == 17  # every key: the row draws whole
    full = digit.attentions
    for layer in range(4):
        for head in range(4):
            top = d["rows"]["top"][layer][head][0]
            row = torch.zeros(17, dtype=torch.float64)
            row[top["keys"]] = torch.tensor(top["weights"], dtype=torch.float64)
            torch.testing.assert_close(row.float(), full[layer, head, 0], atol=1e-5, rtol=0)


def test_focus_rows_and_steps_for_a_patch():
    r = qkv.explain(image=DIGIT, model="digits", rows="focus", focus="r1c2")
    full = qkv.explain(image=DIGIT, model="digits")
    assert r.rows == [7]  # unit 1 + 1 * 4 + 2
    torch.testing.assert_close(r.focus_rows("r1c2"), full.attentions[:, :, 7])
    s = full.steps("r1c2", layer=2, head=1)
    assert s.labels[s.token] == "r1c2"
    torch.testing.assert_close(s.weights.float(), full.attentions[2, 1, 7], atol=1e-6, rtol=0)
    torch.testing.assert_close(s.weights, torch.softmax(s.scores, -1))
    cls = full.steps("cls", layer=0, head=0)
    assert s.labels[cls.token] == "[CLS]"
    default = qkv.explain(image=DIGIT, model="digits", rows="focus")  # the class token's row
    assert default.rows == [0]


def test_an_rgb_model_and_interpolated_positions(vit):
    folder, ref, model = vit
    x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(3))  # (C, H, W): one image, 6x6 patches
    with pytest.raises(ImageError, match="takes 16x16"):
        qkv.explain(image=x, model=model)
    r = qkv.explain(image=x, model=model, interpolate_pos_encoding=True)
    assert r.image.grid == (6, 6) and len(r.tokens) == 37 and r.image.pixels.shape == (3, 24, 24)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        want = ref(x[None], output_attentions=True, interpolate_pos_encoding=True)
    torch.testing.assert_close(r.attentions, torch.cat(want.attentions), atol=1e-5, rtol=1e-4)
    d = r.to_dict()
    assert check_data(d) == (37, 2, 4) and d["image"]["channels"] == 3


@pytest.mark.parametrize("call,kind,needle", [
    (lambda: qkv.explain("seven", image=DIGIT), TypeError, "not both"),
    (lambda: qkv.explain(image=DIGIT, tokenizer=object()), TypeError, "tokenizer= is for text"),
    (lambda: qkv.explain(image=[DIGIT, DIGIT]), ImageError, "one image, not a list"),
    (lambda: qkv.explain(image=torch.rand(2, 1, 8, 8)), ImageError, "explain takes one image"),
    (lambda: qkv.explain(image=DIGIT, focus="r4c0"), ValueError, "r0c0 to r3c3"),
    (lambda: qkv.explain(image=DIGIT, model="minilm"), ValueError, "reads text, not images"),
    (lambda: qkv.explain("seven", model="digits"), ValueError, "reads images, not text"),
    (lambda: qkv.explain(image=DIGIT, layers=[4]), ValueError, "layers [4] do not exist"),
    (lambda: qkv.explain(image=torch.rand(8, 8) * 2), ImageError, "values must be in [0, 1]"),
    (lambda: qkv.explain("seven", interpolate_pos_encoding=True), TypeError, "for images"),
    (lambda: qkv.explain(), TypeError, "image=path"),
    (lambda: qkv.explain(image=""), ImageError, "the image path is empty"),
    (lambda: qkv.explain(image=DIGIT, focus=17), ValueError, "the image has 17 units (the class token and 16 patches)"),
])
def test_bad_calls_are_one_clear_line(call, kind, needle):
    with pytest.raises(kind) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_transformers_vit_is_pointed_at_its_folder(vit):
    folder, ref, _ = vit
    with pytest.raises(TypeError, match="qkv.load"):
        qkv.explain(image=torch.rand(16, 16), model=ref)


def test_the_schema_refuses_an_inconsistent_image_block(digit):
    d = digit.to_dict()
    broken = dict(d, image=dict(d["image"], grid=[3, 4]))
    with pytest.raises(ValueError, match="3x4 patch grid"):
        check_data(broken)
    with pytest.raises(ValueError, match="data\\['image'\\]"):
        check_data({k: v for k, v in d.items() if k != "image"})
    with pytest.raises(ValueError, match="pixels"):
        check_data(dict(d, image=dict(d["image"], pixels="https://example.com/x.png")))
    for bad, needle in [({"grid": [-1, -16]}, "greater than 0"), ({"channels": 7}, "channels"),
                        ({"class_token": 5}, "class_token"), ({"patch": 3}, "do not fit"),
                        ({"size": [4, 8]}, "do not fit")]:
        with pytest.raises(ValueError, match=needle):
            check_data(dict(d, image=dict(d["image"], **bad)))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_data_url_round_trips(channels):
    x = torch.rand(channels, 5, 7, generator=torch.Generator().manual_seed(channels))
    url = png_data_url(x)
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (7, 5) and img.mode == ("L" if channels == 1 else "RGB")
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()  # (5 * 7 * C,)
    got = data.view(5, 7, channels).permute(2, 0, 1) / 255  # (H, W, C) -> (C, H, W)
    torch.testing.assert_close(got, x, atol=0.5 / 255 + 1e-6, rtol=0)


def test_samples_are_held_out_digits_the_model_gets_right():
    files = samples(bundled_path("digits"))
    assert [f.name for f in files] == [f"digit-{d}.png" for d in range(10)]
    model = qkv.load("digits")
    assert [top[0][0] for top in model.top(files, k=1)] == [str(d) for d in range(10)]


def test_image_info_without_a_classifier():
    info = ImageInfo("x.png", torch.zeros(1, 8, 8), (4, 4), 2, [], None)
    assert info.prediction() == [] and info.num_patches == 16


def test_attention_distance_is_the_weighted_distance_between_patch_centres(digit):
    got = attention_distance(digit)  # (L, H)
    att = digit.attentions.double()  # (L, H, 17, 17)
    want = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(16):
        for j in range(16):
            (ri, ci), (rj, cj) = divmod(i, 4), divmod(j, 4)
            d = 2 * ((ri - rj) ** 2 + (ci - cj) ** 2) ** 0.5  # patch side 2 pixels
            want += att[:, :, 1 + i, 1 + j] / att[:, :, 1 + i, 1:].sum(-1) * d / 16
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every patch's row"):
        attention_distance(qkv.explain(image=DIGIT, model="digits", rows="focus", focus="r0c0"))
    with pytest.raises(ValueError, match="image results"):
        attention_distance(qkv.explain("a cat", model="minilm"))


def test_a_file_is_turned_upright_as_its_exif_orientation_says(tmp_path):
    """A photo stored on its side with EXIF Orientation 6 (turn 90 degrees clockwise to view) is
    explained as it is viewed; without the tag, as stored."""
    stored = torch.rand(8, 8, generator=torch.Generator().manual_seed(5))  # (H, W) with distinct halves
    stored[:, :4] = 0
    img = Image.fromarray((stored * 255).round().byte().numpy(), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "side.png", exif=exif)
    img.save(tmp_path / "plain.png")
    side = qkv.explain(image=tmp_path / "side.png", model="digits").image.pixels[0]  # (8, 8)
    plain = qkv.explain(image=tmp_path / "plain.png", model="digits").image.pixels[0]
    torch.testing.assert_close(plain, stored, atol=0.5 / 255 + 1e-6, rtol=0)
    torch.testing.assert_close(side, torch.rot90(stored, k=-1), atol=0.5 / 255 + 1e-6, rtol=0)  # clockwise
