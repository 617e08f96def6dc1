"""The vision transformer (qkv.models.vit) against transformers on tiny random ViT folders built
here (both heads, random LayerNorm weights and biases), interpolated position embeddings, the
preprocessor against transformers' ViTImageProcessor, image input and its refusals
(qkv.models.images), `classify` and `qkv classify`."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import qkv
from qkv.cli import main
from qkv.models.images import ImageError, Preprocessor
from qkv.models.vit import ViTConfig, ViTForImageClassification, ViTModel, hf_weights

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from models.vit_folders import LABELS, TINY, _random, build  # noqa: E402  (after the skips: it imports transformers)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_cls")
    return folder, build(folder)


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_gray")
    return folder, build(folder, num_channels=1, seed=1)


@pytest.mark.parametrize("arch,changes", [
    ("ViTForImageClassification", {}),
    ("ViTForImageClassification", {"qkv_bias": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-6}),
    ("ViTForImageClassification", {"num_channels": 1, "patch_size": 8}),
    ("ViTModel", {}),
    ("ViTModel", {"pooler_output_size": 24, "pooler_act": "relu"}),
])
def test_outputs_equal_transformers(tmp_path, arch, changes):
    ref = build(tmp_path, arch, **changes)
    model = qkv.load(tmp_path)
    assert type(model) is {"ViTModel": ViTModel, "ViTForImageClassification": ViTForImageClassification}[arch]
    x = torch.randn(3, ref.config.num_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = model(x), ref(x)
    if arch == "ViTModel":
        torch.testing.assert_close(out, want.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.pooler_output(out), want.pooler_output, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(out, want.logits, atol=1e-4, rtol=0)
        assert model.labels == [LABELS[str(i)] for i in range(5)]


@pytest.mark.parametrize("arch", ["ViTForImageClassification", "ViTModel"])
@pytest.mark.parametrize("size", [(24, 20), (8, 12), (16, 16)])
def test_interpolated_positions_equal_transformers(tmp_path, arch, size):
    ref = build(tmp_path, arch)
    model = qkv.load(tmp_path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, want = model(x, interpolate_pos_encoding=True), ref(x, interpolate_pos_encoding=True)
    torch.testing.assert_close(out, want.logits if arch != "ViTModel" else want.last_hidden_state, atol=1e-4, rtol=0)


def test_another_size_without_interpolation_is_refused_in_one_line(classifier_folder):
    model = qkv.load(classifier_folder[0])
    with pytest.raises(ValueError, match=r"20x24 pixels \(width x height\) but this model was trained on 16x16") as err:
        model(torch.rand(1, 3, 24, 20))
    assert "\n" not in str(err.value) and "interpolate_pos_encoding=True" in str(err.value)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.rand(1, 1, 16, 16))


def test_config_and_weights_round_trip_through_transformers(tmp_path, classifier_folder):
    """What the trainer writes (config.to_hf(), hf_weights, Preprocessor.to_hf()) is a folder that
    transformers loads and that computes what qkv's model computes."""
    from safetensors.torch import save_file

    config = ViTConfig(**{**TINY, "num_channels": 1}, id2label={str(i): str(i) for i in range(5)})
    model = _random(ViTForImageClassification(config), seed=3)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(hf_weights(model), str(folder / "model.safetensors"))
    pre = Preprocessor.identity(config)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre.to_hf()))
    ref = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=0)
    again = qkv.load(folder)
    assert again.config == ViTConfig.from_hf(config.to_hf()) and again.labels == model.labels
    assert again.preprocessor == pre
    torch.testing.assert_close(again.classify(x[:, 0]), model(x).softmax(-1).detach())
    proc = transformers.ViTImageProcessor.from_pretrained(folder)
    pil = Image.fromarray((x[0, 0] * 255).round().to(torch.uint8).numpy(), mode="L")
    torch.testing.assert_close(again.classify(pil)[0], ref(**proc(pil, return_tensors="pt")).logits.softmax(-1)[0],
                               atol=1e-4, rtol=0)


def test_classify_matches_transformers_processor(tmp_path):
    """A folder whose preprocessor normalises (and resizes, for images of another size): qkv's
    probabilities equal transformers' processor + model (exactly where no resize is needed; within
    what PIL's uint8 resampling rounds where one is)."""
    ref = build(tmp_path, processor=dict(size={"height": 16, "width": 16}, image_mean=[0.2, 0.4, 0.6],
                                         image_std=[0.3, 0.5, 0.7]))
    model = qkv.load(tmp_path)
    assert model.preprocessor.do_normalize and model.preprocessor.image_std == (0.3, 0.5, 0.7)
    proc = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(4)
    for size, atol in ((16, 1e-4), (40, 3e-2)):
        arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        img = Image.fromarray(arr, mode="RGB")
        with torch.no_grad():
            want = ref(**proc(img, return_tensors="pt")).logits.softmax(-1)
        torch.testing.assert_close(model.classify(img), want, atol=atol, rtol=0)
        path = tmp_path / f"img{size}.png"
        img.save(path)
        torch.testing.assert_close(model.classify(str(path)), model.classify(img))
    torch.testing.assert_close(model.classify(str(path)), model.classify(path))


def test_classify_inputs_agree(gray_folder, tmp_path):
    """(N, H, W) and (N, 1, H, W) tensors, PIL images, paths and lists give the same rows."""
    folder, ref = gray_folder
    model = qkv.load(folder)
    x = torch.randint(0, 256, (3, 16, 16), generator=torch.Generator().manual_seed(5)).float() / 255
    probs = model.classify(x)
    assert probs.shape == (3, 5) and torch.allclose(probs.sum(-1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(probs, ref(x[:, None]).logits.softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.classify(x[:, None]), probs)
    pils = [Image.fromarray((x[i] * 255).round().to(torch.uint8).numpy(), mode="L") for i in range(3)]
    paths = []
    for i, pil in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        pil.save(paths[-1])
    torch.testing.assert_close(model.classify(pils), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.classify([str(p) for p in paths]), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.classify([x[:1], pils[1], paths[2]]), probs, atol=1e-6, rtol=0)
    top = model.top(x, k=2)
    best = probs.topk(2, dim=-1)
    assert [p for row in top for _, p in row] == pytest.approx(best.values.flatten().tolist())
    assert [[name for name, _ in row] for row in top] == [[LABELS[str(i)] for i in r] for r in best.indices.tolist()]


def _png(path, arr, mode):
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_grayscale_file_for_an_rgb_model_is_repeated_over_channels(classifier_folder, tmp_path):
    model = qkv.load(classifier_folder[0])
    gray = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    path = _png(tmp_path / "g.png", gray.numpy(), "L")
    rgb = (gray.float() / 255)[None, None].expand(1, 3, 16, 16)
    torch.testing.assert_close(model.classify(path), model.classify(rgb))


def test_opaque_alpha_is_dropped(classifier_folder, tmp_path):
    model = qkv.load(classifier_folder[0])
    rgba = torch.randint(0, 256, (16, 16, 4), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    rgba[..., 3] = 255
    path = _png(tmp_path / "a.png", rgba.numpy(), "RGBA")
    torch.testing.assert_close(model.classify(path), model.classify(rgba[None, ..., :3].permute(0, 3, 1, 2) / 255))


def _one_line(excinfo, *needles):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, text


def test_bad_images_give_one_clear_line(classifier_folder, gray_folder, tmp_path):
    rgb, gray = qkv.load(classifier_folder[0]), qkv.load(gray_folder[0])
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(ImageError) as e:
        rgb.classify(text)
    _one_line(e, "notes.txt", "is not an image Pillow can read")
    with pytest.raises(FileNotFoundError) as e2:
        rgb.classify(tmp_path / "missing.png")
    _one_line(e2, "does not exist")
    with pytest.raises(ImageError) as e:
        rgb.classify(torch.rand(1, 3, 16, 16) * 255)
    _one_line(e, "must be in [0, 1]", "divide by 255")
    with pytest.raises(ImageError) as e:
        rgb.classify(torch.full((1, 3, 16, 16), -0.5))
    _one_line(e, "must be in [0, 1]", "rescale it")
    with pytest.raises(ImageError) as e:
        rgb.classify(torch.full((1, 3, 16, 16), float("nan")))
    _one_line(e, "NaN")
    with pytest.raises(ImageError) as e:
        rgb.classify(torch.randint(0, 255, (1, 3, 16, 16)))
    _one_line(e, "floating point", "x.float() / 255")
    with pytest.raises(ImageError) as e:  # a grayscale tensor for an RGB model: tensors are taken as they are
        rgb.classify(torch.rand(2, 16, 16))
    _one_line(e, "1 channel(s)", "reads 3", "expand(-1, 3, -1, -1)")
    with pytest.raises(ImageError) as e:
        gray.classify(torch.rand(1, 3, 16, 16))
    _one_line(e, "3 channel(s)", "reads 1")
    colour = _png(tmp_path / "c.png", torch.zeros(16, 16, 3, dtype=torch.uint8).numpy(), "RGB")
    with pytest.raises(ImageError) as e:
        gray.classify(colour)
    _one_line(e, "colour (RGB) image", "grayscale", "convert('L')")
    deep = tmp_path / "deep.png"
    Image.fromarray(torch.full((16, 16), 40000, dtype=torch.int32).numpy().astype("uint16")).save(deep)
    assert Image.open(deep).mode.startswith("I")  # a real 16-bit PNG
    with pytest.raises(ImageError) as e:
        gray.classify(deep)
    _one_line(e, "16-bit", "8 bits")
    see_through = torch.zeros(16, 16, 4, dtype=torch.uint8)
    see_through[..., 3] = 128
    with pytest.raises(ImageError) as e:
        rgb.classify(_png(tmp_path / "t.png", see_through.numpy(), "RGBA"))
    _one_line(e, "transparent pixels", "flatten it")
    with pytest.raises(ImageError) as e:  # qkv's own models do not resize: another size is refused
        gray.classify(torch.rand(1, 28, 28))
    _one_line(e, "28x28 pixels", "takes 16x16", "resize it")
    assert gray.classify(torch.rand(1, 28, 28), interpolate_pos_encoding=True).shape == (1, 5)
    with pytest.raises(ImageError) as e:
        rgb.classify(42)
    _one_line(e, "is a int")
    with pytest.raises(ImageError) as e:
        rgb.classify([])
    _one_line(e, "no images")
    with pytest.raises(ImageError) as e:
        rgb.classify([torch.rand(1, 3, 16, 16), torch.rand(1, 3, 8, 8)])
    _one_line(e, "image 1 is 8x8 pixels")


def test_missing_pillow_names_the_extra(classifier_folder, tmp_path, monkeypatch):
    model = qkv.load(classifier_folder[0])
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError) as e:
        model.classify(tmp_path / "any.png")
    _one_line(e, "Pillow", "pip install 'qkv[viz]'")
    assert model.classify(torch.rand(1, 3, 16, 16)).shape == (1, 5)  # tensors need no Pillow


@pytest.mark.parametrize("data,needle", [
    ({"image_mean": [0.5, 0.5]}, "one number per channel"),
    ({"image_std": [0.5, 0.0, 0.5]}, "divide by zero"),
    ({"size": "big"}, "size"),
    ({"do_resize": 1}, "do_resize"),
    ({"do_center_crop": True, "crop_pct": 0.9}, "do_center_crop"),  # another processor's step
    ({"resample": 3}, "resample"),  # bicubic: qkv resizes bilinearly
    ({"size": {"shortest_edge": 16}}, "size"),  # aspect-keeping resize: not what qkv does
])
def test_bad_preprocessor_config_is_named(data, needle):
    with pytest.raises(qkv.models.ModelError, match=needle) as e:
        Preprocessor.from_dict(data, ViTConfig(**{k: v for k, v in TINY.items()}), "preprocessor_config.json")
    _one_line(e, "preprocessor_config.json")


def test_bad_config_is_named(tmp_path):
    with pytest.raises(qkv.models.ModelError, match="not divisible by patch_size") as e:
        ViTConfig.from_hf({**TINY, "image_size": 18})
    _one_line(e)
    with pytest.raises(qkv.models.ModelError, match="square"):
        ViTConfig.from_hf({**TINY, "image_size": [16, 32]})


# --------------------------------------------------------------------------- qkv classify


def _cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_classify_prints_the_top_classes(classifier_folder, tmp_path, capsys):
    folder, _ = classifier_folder
    model = qkv.load(folder)
    g = torch.Generator().manual_seed(8)
    paths = []
    for i in range(2):
        arr = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        paths.append(str(_png(tmp_path / f"{i}.png", arr, "RGB")))
    code, out, err = _cli(["classify", paths[0], "--model", str(folder), "--top", "2"], capsys)
    assert code == 0 and err == ""
    want = model.top(paths[0], k=2)[0]
    rows = [line.split() for line in out.strip().splitlines()]
    assert [r[1] for r in rows] == [name for name, _ in want]
    assert [float(r[0]) for r in rows] == pytest.approx([p for _, p in want], abs=1e-4)
    code, out, err = _cli(["classify", *paths, "--model", str(folder)], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"{paths[0]}:" and lines[4] == f"{paths[1]}:" and len(lines) == 8
    for block, path in ((lines[1:4], paths[0]), (lines[5:8], paths[1])):
        assert [line.split()[1] for line in block] == [name for name, _ in model.top(path, k=3)[0]]


def test_cli_classify_errors(classifier_folder, tmp_path, capsys):
    folder, _ = classifier_folder
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    code, out, err = _cli(["classify", str(text), "--model", str(folder)], capsys)
    assert code != 0 and out == "" and len(err.strip().splitlines()) == 1 and "is not an image" in err
    alpha = torch.zeros(16, 16, 4, dtype=torch.uint8)
    path = _png(tmp_path / "t.png", alpha.numpy(), "RGBA")
    code, out, err = _cli(["classify", str(path), "--model", str(folder)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "t.png" in err and "transparent" in err
    base = tmp_path / "base"
    build(base, "ViTModel")
    rgb = _png(tmp_path / "ok.png", torch.zeros(16, 16, 3, dtype=torch.uint8).numpy(), "RGB")
    code, out, err = _cli(["classify", str(rgb), "--model", str(base)], capsys)
    assert code != 0 and "needs an image classifier" in err
    code, out, err = _cli(["classify", str(rgb), "--model", str(folder), "--top", "0"], capsys)
    assert code != 0 and "--top" in err


def test_a_grey_palette_image_is_grey(gray_folder, tmp_path):
    """GIFs are palette images; a grey palette (R = G = B) is read as grayscale, so a grayscale
    model takes it, with the same numbers as the same pixels saved as an L-mode PNG."""
    model = qkv.load(gray_folder[0])
    gray = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    img = Image.fromarray(gray.numpy(), mode="L")
    img.save(tmp_path / "g.gif")
    img.convert("P").save(tmp_path / "p.png")
    expected = model.classify(gray[None].float() / 255)
    torch.testing.assert_close(model.classify(tmp_path / "g.gif"), expected)
    torch.testing.assert_close(model.classify(tmp_path / "p.png"), model.classify(Image.open(tmp_path / "p.png")))
    colour = Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy(), "RGB").convert("P")
    colour.save(tmp_path / "c.png")
    with pytest.raises(ImageError, match="colour"):
        model.classify(tmp_path / "c.png")


def test_a_checkpoint_with_a_stray_pooler_loads_as_transformers_loads_it(tmp_path, classifier_folder):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "with-pooler"
    reference = build(folder)
    weights = load_file(folder / "model.safetensors")
    E = TINY["hidden_size"]
    weights["vit.pooler.dense.weight"], weights["vit.pooler.dense.bias"] = torch.randn(E, E), torch.randn(E)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(qkv.load(folder)(x), reference(pixel_values=x).logits, atol=1e-4, rtol=0)


def test_too_small_and_empty_inputs_are_named(classifier_folder):
    model = qkv.load(classifier_folder[0])
    with pytest.raises(ValueError, match="smaller than one"):
        model(torch.rand(1, 3, 2, 2), interpolate_pos_encoding=True)  # a patch is 4x4
    with pytest.raises(ValueError, match="the batch is empty"):
        model(torch.rand(0, 3, 16, 16))
