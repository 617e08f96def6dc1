"""qkv.train at its "tiny" size (the code of `qkv train`, run in seconds; the quality the shipped
size reaches is checked on the bundled weights, in test_trained.py): the loss falls, a seed gives the
same weights, an interrupted run resumes to the same weights, the saved folder loads through
`qkv.load`, and broken checkpoints or settings are refused with a clear message."""

from __future__ import annotations

import json

import pytest
import torch
from weight_checks import assert_same, state_copy

import qkv
from qkv.models.checkpoint import CheckpointError
from qkv.train import TrainingError, digits, recall, translate

TASKS = {"recall": recall, "translate": translate}
# every trainer: determinism and resuming are the shared loop's (digits' own tests: test_digits.py)
ALL_TASKS = {**TASKS, "digits": digits}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while training, as `qkv train` sets it (these models are so small that a
    second thread mostly waits, and on a busy machine makes a step many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task", TASKS)
def test_loss_falls(task, tmp_path):
    history: list = []
    TASKS[task].train(tmp_path / "m", steps=40, size="tiny", progress=False, history=history)
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert len(history) == 40
    assert last < 0.85 * first, f"{task}: loss went from {first:.3f} to {last:.3f} in 40 steps"


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_same_weights_other_seed_differs(task, tmp_path):
    a = state_copy(ALL_TASKS[task].train(tmp_path / "a", seed=3, steps=4, size="tiny", progress=False))
    b = state_copy(ALL_TASKS[task].train(tmp_path / "b", seed=3, steps=4, size="tiny", progress=False))
    c = state_copy(ALL_TASKS[task].train(tmp_path / "c", seed=4, steps=4, size="tiny", progress=False))
    assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_interrupted_run_resumes_to_the_samestate_copy(task, tmp_path, monkeypatch):
    module = ALL_TASKS[task]
    straight = state_copy(module.train(tmp_path / "straight", seed=1, steps=7, size="tiny", progress=False,
                                     checkpoint_every=2))

    # A KeyboardInterrupt in step 6 (after checkpoints at 2 and 4) keeps the step-4 checkpoint.
    calls = {"n": 0}
    original = torch.nn.functional.cross_entropy

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5 * per_step:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    per_step = 3 if task == "recall" else 1  # cross_entropy calls per training step
    out = tmp_path / "resumed"
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupting)
    with pytest.raises(KeyboardInterrupt):
        module.train(out, seed=1, steps=7, size="tiny", progress=False, checkpoint_every=2)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", original)
    assert (out / "checkpoint.safetensors").is_file() and not (out / "model.safetensors").exists()
    history: list = []
    resumed = state_copy(module.train(out, seed=1, steps=7, size="tiny", progress=False, checkpoint_every=2,
                                    history=history))
    assert len(history) == 3, f"resumed at step {7 - len(history)}, expected the step-4 checkpoint"
    assert_same(straight, resumed)
    assert not (out / "checkpoint.safetensors").exists()  # removed once the folder is written


def test_stopped_run_resumes_from_its_checkpoint(tmp_path):
    straight = state_copy(recall.train(tmp_path / "a", seed=2, steps=5, size="tiny", progress=False))
    recall.train(tmp_path / "b", seed=2, steps=5, size="tiny", progress=False, stop_after=3)
    assert_same(straight, state_copy(recall.train(tmp_path / "b", seed=2, steps=5, size="tiny", progress=False)))


@pytest.mark.parametrize("task", TASKS)
def test_saved_folder_loads_with_qkv_load(task, tmp_path):
    model = TASKS[task].train(tmp_path / "m", steps=3, size="tiny", progress=False)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    extra = ["generation_config.json"] if task == "recall" else []
    assert names == sorted([".qkv-train", "config.json", "model.safetensors", "tokenizer.json"] + extra)
    loaded = qkv.load(tmp_path / "m")
    assert type(loaded) is type(model)
    assert_same({k: v for k, v in state_copy(model).items()}, state_copy(loaded))


def test_corrupt_checkpoint_is_refused_clearly(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / ".qkv-train").write_text('{"format": "qkv.train/1", "task": "recall"}')  # a qkv run's folder
    (out / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable.*delete it"):
        recall.train(out, steps=3, size="tiny", progress=False)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    recall.train(tmp_path / "m", seed=1, steps=5, size="tiny", progress=False, stop_after=2)
    with pytest.raises(TrainingError, match="seed=1 \\(now 2\\)"):
        recall.train(tmp_path / "m", seed=2, steps=5, size="tiny", progress=False)


def test_translate_reference_grammar():
    words = "the big red cat sees a small dog".split()
    assert translate.translate_words(words) == "miro dulo raka ke vasku semi na tolven".split()
    held = translate.held_out(50)
    assert all(translate.is_held_out(s) for s in held)
    train = translate.sentences(50, torch.Generator().manual_seed(0), held_out=False)
    assert not any(translate.is_held_out(s) for s in train)


def test_cli_train_writes_a_folder_with_a_progress_bar(tmp_path, capsys):
    from qkv.cli import main

    out = tmp_path / "t"
    assert main(["train", "translate", "--size", "tiny", "--out", str(out), "--steps", "3", "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert "\rtranslate     3/3 [" in captured.err and "loss" in captured.err and "acc" in captured.err
    assert captured.out.startswith("trained translate in ") and "held-out exact match" in captured.out
    assert isinstance(qkv.load(out), translate.QkvSeq2Seq)


def test_cli_train_refuses_a_file_as_out(tmp_path, capsys):
    from qkv.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["train", "recall", "--out", str(tmp_path / "f"), "--steps", "2"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_train_interrupted_before_a_checkpoint_says_it_starts_over(tmp_path, capsys, monkeypatch):
    """No checkpoint exists yet: the message must not claim one is kept."""
    from qkv.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recall, "train", interrupted)
    assert main(["train", "recall", "--out", str(tmp_path / "r"), "--steps", "2"]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was saved" in err and "starts over from step 0" in err, err
    assert "is kept" not in err


def test_cli_train_interrupted_after_a_checkpoint_names_its_step(tmp_path, capsys, monkeypatch):
    from qkv.cli import main

    out = tmp_path / "r"
    recall.train(out, seed=0, steps=5, size="tiny", progress=False, stop_after=2)  # a checkpoint at step 2

    def interrupting(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupting)  # in the first resumed step
    assert main(["train", "recall", "--size", "tiny", "--out", str(out), "--steps", "5", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"the checkpoint of step 2 in {out} is kept: run the same command to resume" in err, err


FOREIGN = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"weights of another model",
           "tokenizer.json": b'{"version": "1.0"}'}


def _foreign_folder(path):
    path.mkdir()
    for name, data in FOREIGN.items():
        (path / name).write_bytes(data)
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in path.iterdir()}


def test_cli_train_refuses_a_folder_of_another_model(tmp_path, capsys):
    """--out holding files qkv did not write: status 2, the files named, nothing touched."""
    from qkv.cli import main

    out = tmp_path / "bert-base"
    before = _foreign_folder(out)
    assert main(["train", "translate", "--out", str(out), "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv train: error: --out ") and "config.json, model.safetensors, tokenizer.json" in err, err
    assert "choose another --out" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


@pytest.mark.parametrize("task", TASKS)
def test_train_refuses_a_foreign_folder_and_accepts_its_own(task, tmp_path):
    module = TASKS[task]
    out = tmp_path / "f"
    before = _foreign_folder(out)
    with pytest.raises(TrainingError, match="holds files that qkv train did not write"):
        module.train(out, steps=2, size="tiny", progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    # A marker that is not qkv's (not its JSON) does not make the folder qkv's.
    (out / ".qkv-train").write_text("mine")
    with pytest.raises(TrainingError, match="did not write"):
        module.train(out, steps=2, size="tiny", progress=False)
    # An empty folder, and a folder of a finished qkv run (trained again over itself), are fine.
    (tmp_path / "empty").mkdir()
    module.train(tmp_path / "empty", steps=2, size="tiny", progress=False)
    module.train(tmp_path / "empty", steps=2, seed=1, size="tiny", progress=False)
    assert json.loads((tmp_path / "empty" / ".qkv-train").read_text()) == {"format": "qkv.train/1", "task": task}


def test_the_bundled_folders_may_be_trained_again():
    """docs/trained-models.md trains the shipped models with --out src/qkv/models/bundled/TASK."""
    from qkv.models import bundled_path
    from qkv.train import check_folder

    for name in TASKS:
        check_folder(bundled_path(name))  # no TrainingError


def test_interrupted_note_of_an_unreadable_checkpoint(tmp_path):
    from qkv.train import interrupted_note

    (tmp_path / "checkpoint.safetensors").write_bytes(b"half a file")
    assert "is unreadable" in interrupted_note(tmp_path) and "delete it" in interrupted_note(tmp_path)
