"""Hub ids ("org/name"): resolved from a Hugging Face cache folder the test builds (the layout
models--org--name/snapshots/<sha>/..., refs/main), in offline mode, never the network; a
missing id is one clear error naming it and how to fetch it; offline mode and local_files_only
reach huggingface_hub exactly as transformers passes them."""

from __future__ import annotations

import shutil

import pytest
import torch
from hf_folders import build_folder

import qkv
from qkv import cli
from qkv.models import checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo_id: str, folder) -> None:
    """Copy `folder` into the cache as the snapshot of `repo_id`'s main branch."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


@pytest.fixture(scope="module")
def gpt2_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2-src")
    return folder, build_folder(folder, "gpt2", seed=3)


@pytest.fixture
def cache(tmp_path, monkeypatch, gpt2_source):
    """An offline Hugging Face cache in tmp_path holding 'tiny-org/tiny-gpt2'."""
    hub = tmp_path / "hub"
    hub.mkdir()
    put_in_cache(hub, "tiny-org/tiny-gpt2", gpt2_source[0])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder named tiny-org/ here: the id is not a path
    return hub


def test_a_hub_id_loads_the_cached_snapshot_offline(cache, gpt2_source):
    model = qkv.load("tiny-org/tiny-gpt2")
    assert model.folder == cache / "models--tiny-org--tiny-gpt2" / "snapshots" / SHA
    hf = gpt2_source[1]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    got = getattr(got, "logits", got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_an_id_not_in_the_cache_offline_is_one_clear_error(cache):
    with pytest.raises(FileNotFoundError) as info:
        qkv.load("tiny-org/absent-model")
    msg = str(info.value)
    assert "'tiny-org/absent-model'" in msg and str(cache) in msg
    assert "offline mode is on" in msg and "hf download tiny-org/absent-model" in msg


def test_local_files_only_keeps_to_the_cache(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        qkv.load("tiny-org/absent-model", local_files_only=True)
    assert qkv.load("tiny-org/tiny-gpt2", local_files_only=True).folder.name == SHA


@pytest.mark.parametrize("offline", [False, True])
def test_offline_mode_decides_whether_huggingface_hub_may_download(tmp_path, monkeypatch, gpt2_source, offline):
    """What reaches snapshot_download: only qkv's files, and local_files_only exactly when offline
    (a stand-in answers: the real call would go to the network when online)."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(gpt2_source[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert checkpoint.resolve_hub_id("org/name") == gpt2_source[0]
    [(repo_id, kw)] = calls
    assert repo_id == "org/name" and kw["local_files_only"] is offline
    assert kw["cache_dir"] == str(tmp_path / "elsewhere")
    # what huggingface_hub would fetch of a repository with code, pickles and subfolders (its own filter)
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "merges.txt",
            "tokenizer.model", "modules.json", "1_Pooling/config.json",
            "pytorch_model.bin", "tokenizer.py", "tokenizer.pkl", "tokenizer_model.bin", "modeling_custom.py",
            "onnx/model.safetensors", "onnx/model.onnx", "fp16/model.safetensors", "subdir/tokenizer.json",
            "training_args.bin", "model.ckpt", "flax_model.msgpack", "tf_model.h5", "README.md"]
    fetched = list(filter_repo_objects(repo, allow_patterns=kw["allow_patterns"],
                                       ignore_patterns=kw["ignore_patterns"]))
    assert fetched == repo[:12], fetched


def test_offline_set_after_import_counts(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert checkpoint.hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not checkpoint.hub_offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert checkpoint.hub_offline()


@pytest.mark.parametrize("text, is_id", [
    ("org/name", True), ("sentence-transformers/all-MiniLM-L6-v2", True), ("a.b/c_d", True),
    ("name", False), ("/abs/path", False), ("./rel", False), ("a/b/c", False), ("org--x/name", False),
    ("org/..", False), ("org/name.", False), ("", False), (None, False),
])
def test_what_counts_as_a_hub_id(text, is_id):
    assert checkpoint.is_hub_id(text) is is_id


def test_an_existing_folder_wins_over_the_hub(cache, gpt2_source, tmp_path):
    local = tmp_path / "tiny-org" / "tiny-gpt2"
    shutil.copytree(gpt2_source[0], local)
    assert qkv.load("tiny-org/tiny-gpt2").folder == local.relative_to(tmp_path)


def test_the_cli_explains_a_hub_id(cache, capsys):
    code = cli.main(["explain", "the cat sat on the mat", "--model", "tiny-org/tiny-gpt2", "--focus", "mat"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mat" in out and "layer" in out


def test_the_cli_names_a_missing_id(cache, capsys):
    code = cli.main(["explain", "the cat", "--model", "tiny-org/absent-model"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'tiny-org/absent-model'" in lines[0] and "hf download" in lines[0]
