"""The layering of the package (docs/architecture.md): models -> nn -> core, one way.

(a) `import qkv.core` in a fresh interpreter loads nothing of qkv but the core and the leaf
    `qkv._files`, and `import qkv` alone loads none of the layers above the core;
(b) a static scan (ast) of every import under qkv/core, function-level ones included,
    finds none of the packages above it;
(c) the graph of module-level imports between qkv's modules has no cycle. Imports inside
    functions (deliberately lazy, e.g. `MultiHeadAttention.distribute` importing
    qkv.distributed) are left out of the cycle check, as they run after every module has
    loaded; the scan of (b) includes them.

The scanner and the cycle finder are also run on small synthetic trees, so these tests can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import qkv

SRC = Path(qkv.__file__).resolve().parent.parent  # the directory holding the qkv package
ABOVE_CORE = ("qkv.masks", "qkv.nn", "qkv.models", "qkv.inspect", "qkv.web", "qkv.train", "qkv.bench",
              "qkv.distributed", "qkv.cli", "qkv.integrations")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(node: ast.AST):
    """The nodes that run when the module is imported: all but the bodies of functions."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _module_level(child)


def _imports(path: Path, root: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file; names imported from a
    package that are its submodules count as those submodules."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nodes = _module_level(tree) if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_sub = (root / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    root / Path(*sub.split(".")) / "__init__.py").exists()
                found.append((sub if is_sub else target, node.lineno))
    return found


def _forbidden_imports(core_dir: Path, root: Path) -> list[str]:
    bad = []
    for path in sorted(core_dir.rglob("*.py")):
        for name, line in _imports(path, root, top_level_only=False):
            if any(name == p or name.startswith(p + ".") for p in ABOVE_CORE):
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


def _graph(root: Path, package: str = "qkv") -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        module = _module_name(path, root)
        graph[module] = {name for name, _ in _imports(path, root, top_level_only=True)
                         if (name == package or name.startswith(package + ".")) and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph, as a list of modules, or [] if there is none."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def _loaded(code: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sorted(m for m in sys.modules "
                          "if m == 'qkv' or m.startswith('qkv.'))))"],
                         capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": ""}, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_importing_the_core_loads_only_the_core():
    loaded = _loaded("import qkv.core")
    strays = [m for m in loaded if m not in ("qkv", "qkv._files") and not m.startswith("qkv.core")]
    assert not strays, f"import qkv.core also loaded {strays}"
    assert "qkv.core" in loaded


def test_import_qkv_loads_no_layer_above_the_core():
    loaded = _loaded("import qkv")
    above = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in ABOVE_CORE)]
    assert not above, f"import qkv loaded {above}"


def test_the_core_imports_nothing_above_it():
    assert _forbidden_imports(SRC / "qkv" / "core", SRC) == []


def test_the_scan_finds_imports_from_above(tmp_path):
    core = tmp_path / "qkv" / "core"
    (core / "engines").mkdir(parents=True)
    (tmp_path / "qkv" / "masks").mkdir()
    for init in ("qkv", "qkv/core", "qkv/core/engines", "qkv/masks"):
        (tmp_path / init / "__init__.py").write_text("")
    (core / "ok.py").write_text("import torch\nfrom . import spec\nfrom .. import _files\n")
    (core / "engines" / "bad.py").write_text("def f():\n    from ...masks import causal\n")
    (core / "bad2.py").write_text("import qkv.nn.attention\nfrom qkv import masks\n")
    bad = _forbidden_imports(core, tmp_path)
    assert bad == ["qkv/core/bad2.py:1 imports qkv.nn.attention", "qkv/core/bad2.py:2 imports qkv.masks",
                   "qkv/core/engines/bad.py:2 imports qkv.masks"], bad


def test_no_import_cycle_between_qkv_modules():
    graph = _graph(SRC)
    assert "qkv.core.spec" in graph and graph["qkv.masks"], "the scan found no imports: check SRC"
    assert _cycle(graph) == [], f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "qkv"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("import qkv.c\n")
    (pkg / "c.py").write_text("from . import a\ndef lazy():\n    from . import d\n")
    (pkg / "d.py").write_text("from .c import lazy\n")
    graph = _graph(tmp_path)
    assert graph["qkv.c"] == {"qkv.a"}, graph  # the function-level import is left out
    assert _cycle(graph) == ["qkv.a", "qkv.b", "qkv.c", "qkv.a"]
    (pkg / "c.py").write_text("def lazy():\n    from . import a\n")
    assert _cycle(_graph(tmp_path)) == []
