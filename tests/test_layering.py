"""The house stands: the engine never reaches up, no module imports a private name of another,
and the import graph (function-level imports included) has no circle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What sits above the engine: none of it may be loaded by importing the engine or a layer below.
ABOVE = ("lrcompile.pipeline", "lrcompile.cli", "lrcompile.bench")


@pytest.mark.parametrize("module", ["lrcompile.engine", "lrcompile.forms", "lrcompile.passes", "lrcompile.planner",
                                    "lrcompile.latency", "lrcompile.pruning", "lrcompile.inspection"])
def test_lower_layers_leave_the_orchestrator_unloaded(module):
    code = (f"import sys, {module}\n"
            f"bad = [m for m in {ABOVE!r} if m in sys.modules]\n"
            "assert not bad, bad\n")
    if module in ("lrcompile.engine", "lrcompile.forms", "lrcompile.passes"):
        code += ("up = [m for m in ('lrcompile.planner', 'lrcompile.latency', 'lrcompile.pruning') if m in sys.modules]\n"
                 "assert not up, up\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for lrcompile/, passes/ and plugins/ (installed as lrcompile.passes and
    lrcompile.plugins)."""
    out = {}
    for base, pkg in ((ROOT / "lrcompile", "lrcompile"), (ROOT / "passes", "lrcompile.passes"),
                      (ROOT / "plugins", "lrcompile.plugins")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path, known: dict[str, Path]):
    """``(imported module, names taken from it, line)`` for every import in the file, nested ones too."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lrcompile"):
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not mod.startswith("lrcompile"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            for s in subs:
                yield s, [], node.lineno
            yield mod, [n for n in names if f"{mod}.{n}" not in known], node.lineno


def test_no_private_cross_module_import():
    known = _modules()
    bad = []
    for name, path in known.items():
        for mod, names, line in _imports(name, path, known):
            if mod == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {n} from {mod}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_import_circle():
    """Modules import each other in one direction only. The API facade ``lrcompile`` (its
    ``__init__``: ``compile``, ``inspect``, ``__version__``) and each package's ``__init__``
    re-exporting its own submodules are not edges of a circle."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for mod, _, _ in _imports(name, path, known):
            while mod not in known and "." in mod:
                mod = mod.rpartition(".")[0]
            if mod == name or mod == "lrcompile" or name == "lrcompile":
                continue
            if known[name].name == "__init__.py" and mod.startswith(name + "."):
                continue  # a package importing its own submodules
            if known.get(mod, Path()).name == "__init__.py" and name.startswith(mod + "."):
                continue  # a submodule importing a name its package re-exports
            graph[name].add(mod)
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_without_torch_or_tensorrt():
    """``import lrcompile`` and the ONNX/ORT path load without torch, onnx2torch or TensorRT."""
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torch', 'onnx2torch', 'tensorrt', 'tensorrt_rtx', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import lrcompile, lrcompile.pipeline, lrcompile.engine, lrcompile.planner, lrcompile.latency, lrcompile.cli
import lrcompile.targets.ort, lrcompile.targets.trt, lrcompile.distill, lrcompile.fisher, lrcompile.bench
import lrcompile.comparison, lrcompile.engine.functions, lrcompile.plugins
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
