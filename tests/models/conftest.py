"""Fixtures: tiny random GPT-2, Llama, Mistral and Qwen2 folders (built by hf_folders.py) and the bundled
MiniLM folder, each made once per session."""

from __future__ import annotations

import pytest
from hf_folders import build_folder


def _folder_fixture(kind: str):
    """A session fixture `{kind}_folder`: (folder, the transformers model saved in it)."""

    @pytest.fixture(scope="session", name=f"{kind}_folder")
    def folder_of_kind(tmp_path_factory):
        folder = tmp_path_factory.mktemp(kind)
        return folder, build_folder(folder, kind)

    return folder_of_kind


gpt2_folder, llama_folder, mistral_folder, qwen2_folder = map(_folder_fixture, ("gpt2", "llama", "mistral", "qwen2"))


@pytest.fixture(scope="session")
def minilm_folder():
    from qkv.models import bundled_path

    try:
        return bundled_path("minilm")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def minilm(minilm_folder):
    import qkv

    return qkv.load("minilm")
