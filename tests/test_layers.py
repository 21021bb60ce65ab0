"""The package's import graph (pure: reads the source): no import cycle anywhere, counting
imports inside functions too, and ``store/``, ``meta/`` and ``blocks`` know nothing of FUSE,
the VFS, caches or each other's engines' callers; and the mount path imports only the core
dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("chunkfs", "csi")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its body)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_lower_layers_import_nothing_above_them() -> None:
    above = ("chunkfs.fuse", "chunkfs.vfs", "chunkfs.cli", "chunkfs.read", "chunkfs.write", "chunkfs.cache",
             "chunkfs.warmup", "csi")
    for name, imports in _graph().items():
        if name.startswith(("chunkfs.store", "chunkfs.meta", "chunkfs.blocks")):
            assert not {i for i in imports if i.startswith(above)}, name


#: packages of the optional extras (``pyproject.toml``): the quick start installs none of them
OPTIONAL_PACKAGES = ("boto3", "botocore", "s3transfer", "google", "redis", "hiredis", "grpc", "safetensors", "numpy")


def test_a_local_mount_and_warmup_import_no_optional_package() -> None:
    """``chunkfs mount`` and ``chunkfs warmup`` on the embedded default (SQLite, a local
    directory) import only the core dependencies: a fresh machine's quick start installs no
    store backend. Run in a fresh interpreter that refuses the optional packages."""
    code = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL_PACKAGES!r}:
            raise ImportError("optional package imported: " + name)
        return None
sys.meta_path.insert(0, Refuse())
import chunkfs.cli.main, chunkfs.cli.mount, chunkfs.cli.warmup, chunkfs.fuse.mount, chunkfs.fuse.native
import chunkfs.store.file, chunkfs.meta.sqlite, chunkfs.warmup.engine, chunkfs.peer.setup
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
