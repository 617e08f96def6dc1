"""Fixtures: tiny random GPT-2 and Llama folders (built by hf_folders.py) and the bundled
MiniLM folder, each made once per session."""

from __future__ import annotations

import pytest
from hf_folders import build_folder


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    return folder, build_folder(folder, "gpt2")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, build_folder(folder, "llama")


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
