"""Fixtures shared by every test folder: `browser`, Debian's headless chromium driven by Playwright;
`bench_module`, a script of benchmarks/ imported as a module; and, for every test, torch's global random
generator seeded from the test's name.

The browser is /usr/bin/chromium, installed by scripts/install-test-browser.sh; Playwright's own
browser download is never used. Without it a browser test FAILS, telling how to install it,
unless QKV_SKIP_BROWSER=1 is set, which skips it.

    def test_page(browser):  # a module-scoped fixture
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _seeded(request):
    """torch's global generator seeded from the test's id: a test that draws with torch.randn and no
    generator sees the same numbers whichever worker runs it and whatever ran before it there (a
    draw that depended on the order once failed test_score_functions_match_formulas in CI only)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def bench_module(monkeypatch):
    """load(name): benchmarks/<name>.py imported afresh as a module, its folder on sys.path for this test
    (the scripts import their neighbours, e.g. prefill_chunk.py's `from decode import causal_mask`)."""
    def load(name: str):
        monkeypatch.syspath_prepend(str(BENCHMARKS))
        sys.modules.pop(name, None)
        return importlib.import_module(name)
    return load


CHROMIUM = "/usr/bin/chromium"
# Headless flags; the background-networking ones keep chromium from calling home on its own.
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def require_browser():
    """Playwright's sync_playwright, or skip (QKV_SKIP_BROWSER=1) / fail with the fix."""
    if os.environ.get("QKV_SKIP_BROWSER") == "1":
        pytest.skip("QKV_SKIP_BROWSER=1: the headless-browser tests are skipped")
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: run `bash scripts/install-test-browser.sh` (installs Debian's "
            "chromium package), or set QKV_SKIP_BROWSER=1 to skip this test",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the python package playwright is missing: pip install -e '.[test]' "
                    "(never `playwright install`: the test uses the system chromium)", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = require_browser()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def pytest_configure(config):
    """Under pytest-xdist each worker process gets one torch thread: workers run side by side,
    one per core, instead of each spreading over every core and contending with the others."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Every test that takes the `browser` fixture carries the `browser` marker
    (`pytest -m "not browser"` runs the rest)."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
