"""Fixtures shared by the tests of qkv.inspect."""

from __future__ import annotations

import pytest

import qkv


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, loaded once: explain only reads it (its recorder hooks
    are detached after each call)."""
    return qkv.load("minilm")
