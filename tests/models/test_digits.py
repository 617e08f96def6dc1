"""The digits model: the SHIPPED folder (qkv.load("digits")) reaches its held-out accuracy,
recomputed here through `model.classify`, and gives transformers' ViTForImageClassification's
logits; `qkv train digits` at its "tiny" size (the same code, in seconds) trains, resumes after an
interruption to the same weights, and writes a folder that qkv.load and transformers read."""

from __future__ import annotations

import json

import pytest
import torch
from weight_checks import assert_same, state_copy

import qkv
from qkv.models import bundled_path
from qkv.models.vit import ViTForImageClassification
from qkv.train import TrainingError, digits

pytest.importorskip("sklearn", reason="the digits data set ships inside scikit-learn")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while training, as `qkv train` sets it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return qkv.load("digits")


def test_split_is_stratified_disjoint_and_covers_the_data_set():
    from sklearn.datasets import load_digits

    data = load_digits()
    train_idx, held_idx = digits._split()
    assert len(held_idx) == 360 and len(train_idx) == 1797 - 360
    assert not set(train_idx.tolist()) & set(held_idx.tolist())
    assert sorted(train_idx.tolist() + held_idx.tolist()) == list(range(len(data.target)))
    held_x, held_y = digits.held_out()
    assert torch.bincount(held_y, minlength=10).tolist() == [36] * 10
    assert torch.equal(held_y, torch.tensor(data.target[held_idx.numpy()]))
    assert torch.allclose(held_x, torch.tensor(data.images[held_idx.numpy()], dtype=torch.float32) / 16)
    assert float(held_x.min()) == 0.0 and float(held_x.max()) == 1.0


def test_bundled_folder_is_a_small_hf_folder():
    folder = bundled_path("digits")
    files = sorted(p.name for p in folder.iterdir())
    assert files == [".qkv-train", "config.json", "model.safetensors", "preprocessor_config.json", "samples"], files
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 3_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"] and config["model_type"] == "vit"
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["do_resize"] is False and pre["size"] == {"height": 8, "width": 8}
    assert pre["image_mean"] == [0.0] and pre["image_std"] == [1.0]


def test_bundled_held_out_accuracy(model):
    """Recomputed on the 360 held-out images through model.classify: at least 97%."""
    assert isinstance(model, ViTForImageClassification)
    images, labels = digits.held_out()
    probs = model.classify(images)  # (360, 10)
    assert probs.shape == (360, 10) and torch.allclose(probs.sum(-1), torch.ones(360), atol=1e-5)
    predicted = torch.tensor([int(model.labels[i]) for i in probs.argmax(-1).tolist()])
    acc = (predicted == labels).float().mean().item()
    assert acc >= 0.97, f"held-out accuracy {acc:.4f}"
    assert digits.evaluate(model) == acc


def test_bundled_model_matches_transformers(model):
    """The referee: transformers' ViTForImageClassification on the same folder gives the same
    logits, and its ViTImageProcessor turns PIL images into the pixels qkv's classify uses."""
    transformers = pytest.importorskip("transformers")
    Image = pytest.importorskip("PIL.Image")
    folder = bundled_path("digits")
    hf = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    images, _ = digits.held_out()
    pixels = images[:, None]  # (360, 1, 8, 8)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).logits  # (360, 10)
        ours = model(pixels)  # (360, 10)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    pil = [Image.fromarray((img * 255).round().to(torch.uint8).numpy(), mode="L") for img in images[:16]]
    processor = transformers.ViTImageProcessor.from_pretrained(folder)
    hf_pixels = processor(pil, return_tensors="pt")["pixel_values"]
    if hf_pixels.dim() == 3:  # (N, H, W): a grey image without its channel axis
        hf_pixels = hf_pixels[:, None]
    with torch.no_grad():
        ref_probs = hf(pixel_values=hf_pixels).logits.softmax(-1)  # (16, 10)
    torch.testing.assert_close(model.classify(pil), ref_probs, atol=1e-5, rtol=1e-4)


def test_the_bundled_folder_may_be_trained_again():
    """docs/trained-models.md trains the shipped model with --out src/qkv/models/bundled/digits."""
    from qkv.train import check_folder

    check_folder(bundled_path("digits"))  # no TrainingError


def test_augment_is_the_identity_without_rotation_scale_or_shift(monkeypatch):
    images, _ = digits.held_out()
    monkeypatch.setattr(digits, "ROTATE", 0.0)
    monkeypatch.setattr(digits, "SCALE", 0.0)
    monkeypatch.setattr(digits, "SHIFT", 0.0)
    out = digits.augment(images[:20], torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images[:20], atol=1e-6, rtol=0)


def test_augment_follows_its_generator():
    images, _ = digits.held_out()
    a = digits.augment(images[:20], torch.Generator().manual_seed(5))
    b = digits.augment(images[:20], torch.Generator().manual_seed(5))
    c = digits.augment(images[:20], torch.Generator().manual_seed(6))
    assert a.shape == (20, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_tiny_loss_falls_and_beats_chance(tmp_path):
    """300 steps of the tiny size (about a second): a ViT sits near chance for its first
    hundred steps, then the loss falls and held-out accuracy (recomputed) leaves chance (10%)."""
    history: list = []
    model = digits.train(tmp_path / "m", size="tiny", progress=False, history=history)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert len(history) == digits.SIZES["tiny"].steps
    assert last < 0.9 * first, f"loss went from {first:.3f} to {last:.3f}"
    assert digits.evaluate(model) > 0.25


def test_saved_folder_loads_in_qkv_and_transformers(tmp_path):
    model = digits.train(tmp_path / "m", steps=3, size="tiny", progress=False)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [".qkv-train", "config.json", "model.safetensors", "preprocessor_config.json", "samples"]
    loaded = qkv.load(tmp_path / "m")
    assert isinstance(loaded, ViTForImageClassification)
    assert_same(state_copy(model), state_copy(loaded))
    images, _ = digits.held_out()
    torch.testing.assert_close(loaded.classify(images[:8]), model.classify(images[:8]))
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:8, None]), hf(pixel_values=images[:8, None]).logits,
                                   atol=1e-5, rtol=1e-5)


def test_missing_scikit_learn_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    digits._dataset.cache_clear()
    digits._split.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    try:
        with pytest.raises(TrainingError, match=r"scikit-learn.*pip install scikit-learn"):
            digits.train(tmp_path / "m", steps=2, size="tiny", progress=False)
        assert not (tmp_path / "m").exists()  # refused before the folder was touched
    finally:
        digits._dataset.cache_clear()
        digits._split.cache_clear()


def test_cli_train_digits(tmp_path, capsys):
    from qkv.cli import main

    out = tmp_path / "d"
    assert main(["train", "digits", "--size", "tiny", "--out", str(out), "--steps", "3", "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert "\rdigits     3/3 [" in captured.err and "loss" in captured.err and "acc" in captured.err
    assert captured.out.startswith("trained digits in ")
    assert "held-out accuracy (360 images, 36 per digit)" in captured.out
    assert isinstance(qkv.load(out), ViTForImageClassification)


def test_another_tasks_run_is_refused_before_anything_is_touched(tmp_path, capsys):
    """A folder marked as a recall run: training digits there would leave recall's tokenizer.json
    beside the ViT (qkv.load would attach it), so it is refused in one line, nothing touched."""
    from qkv.cli import main
    from qkv.train._loop import FORMAT, MARKER

    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": FORMAT, "task": "recall"}))
    (out / "tokenizer.json").write_text("{}")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    assert main(["train", "digits", "--size", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'recall'" in err and "choose another --out" in err
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_the_shipped_samples_are_what_training_writes(tmp_path):
    """samples/ holds the first held-out image of each digit, byte for byte as `write_samples` writes them."""
    from qkv.train.digits import held_out, write_samples

    write_samples(tmp_path)
    shipped = bundled_path("digits") / "samples"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == [f"digit-{d}.png" for d in range(10)] == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (shipped / name).read_bytes() == (tmp_path / name).read_bytes(), name
    images, digits = held_out()
    Image = pytest.importorskip("PIL.Image")
    for d in range(10):
        with Image.open(shipped / f"digit-{d}.png") as img:
            got = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().view(8, 8) / 255
        first = int((digits == d).nonzero()[0, 0])
        torch.testing.assert_close(got, images[first], atol=0.5 / 255 + 1e-6, rtol=0)  # k/16 * 255 ends in .5
