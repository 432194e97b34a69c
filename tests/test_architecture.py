"""The house rules of DESIGN.md §1 and §6 that a test can check: no import circles
inside amp_engine (function-level imports included), no private name imported from
another module, and no module over 400 lines. The layer order itself is checked by
import-linter (pyproject.toml, run by .ci/run)."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "amp_engine"
if not ROOT.is_dir():  # the installed package is tested: read its sources
    import amp_engine

    ROOT = pathlib.Path(amp_engine.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the file,
    except those under ``if TYPE_CHECKING:`` (they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, node, path.name == "__init__.py")
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, None) if sub in MODULES else (src, a.name))
    return [(m, n) for m, n in out if m == "amp_engine" or m.startswith("amp_engine.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _ in _imports(mod, path):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            # a package's __init__ re-exporting its own modules is not a circle
            if target in MODULES and target != mod and not mod.startswith(target + "."):
                graph[mod].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, name in _imports(mod, path):
            private_mod = any(p.startswith("_") and p not in ("__init__",)
                              for p in target.split(".")[1:])
            # a package may use its own private modules (optim._base inside amp_engine.optim)
            own = target.rsplit(".", 1)[0] == mod.rsplit(".", 1)[0] or target.startswith(mod + ".")
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{mod} imports {target}.{name}")
            elif private_mod and not own and target not in ("amp_engine._extension", "amp_engine._build_config", "amp_engine._optional"):
                bad.append(f"{mod} imports private module {target}")
    assert bad == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    lines = MODULES[mod].read_text().count("\n")
    assert lines <= 400, f"{mod}: {lines} lines (DESIGN.md §6: a file does one thing, < ~400 lines)"
