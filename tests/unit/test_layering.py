"""The import graph of sidecar/: no cycle (not even a type-only one) and no forbidden direction.

Read with `ast` from the source, so imports under `if TYPE_CHECKING:` and inside functions count
like any other: a cycle that only the type checker sees is still two modules that cannot be
understood, tested or moved one without the other.

LAYERS is the table of directions: a module under a prefix may import, of the sidecar, only
modules under the prefixes it lists (the longest matching prefix applies). After a layout move,
update the prefixes here; the tests name the offending import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"


@dataclass(frozen=True)
class Layer:
    may_import: tuple[str, ...]  # prefixes of sidecar modules this layer may import
    why: str


# Keyed by module-name prefix. "sidecar" alone (the package, for __version__) is always allowed.
LAYERS: dict[str, Layer] = {
    "sidecar._compat": Layer((), "the seam for other libraries' internals depends on nothing of ours"),
    "sidecar.exchange": Layer((), "the per-request record every layer names imports nothing of the sidecar"),
    "sidecar.upstream.transport": Layer(
        ("sidecar.upstream.transport", "sidecar._compat"),
        "the HTTP/1.1 transport is an httpx transport, reusable without the sidecar around it"),
    "sidecar.inject": Layer(
        ("sidecar.inject", "sidecar.config", "sidecar.observe.log", "sidecar.policy.metadata", "sidecar._compat"),
        "the webhook (`egress-sidecar inject`) runs in another pod: nothing of the data path"),
}

# Libraries whose private modules (a `_` segment; uvicorn's protocols) only sidecar/_compat/ imports.
GUARDED_LIBRARIES = ("httpx", "httpcore", "h2", "uvicorn", "httptools")
COMPAT = "sidecar._compat"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """Every module `path` imports (sidecar's and others'), with its line; TYPE_CHECKING included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in modules else base, node.lineno))
    return found


def _graph() -> dict[str, list[tuple[str, int]]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) for name, path in sorted(paths.items())}


GRAPH = _graph()


def _ours(graph: dict[str, list[tuple[str, int]]], name: str) -> set[str]:
    return {target for target, _ in graph[name] if target in graph and target not in (name, "sidecar")}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_source_including_type_only_imports() -> None:
    assert "sidecar.proxy.app" in GRAPH and "sidecar.upstream.transport.wire" in GRAPH
    assert "sidecar.runtime" in _ours(GRAPH, "sidecar.proxy.app")
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sidecar.proxy.app import ForwardApp\n"
    tree = ast.parse(source)
    assert any(isinstance(n, ast.ImportFrom) and n.module == "sidecar.proxy.app" for n in ast.walk(tree))


def test_cycle_finder_finds_a_type_only_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = _cycles({name: _ours(GRAPH, name) for name in GRAPH})
    assert cycles == [], f"import cycles (TYPE_CHECKING imports count): {cycles}"


@pytest.mark.parametrize("prefix", sorted(LAYERS))
def test_layer_imports_only_what_its_row_allows(prefix: str) -> None:
    members = [name for name in GRAPH if _under(name, prefix)]
    assert members, f"LAYERS names {prefix}, which matches no module: update the table after a move"
    wrong = []
    for name in members:
        rule = LAYERS[max((p for p in LAYERS if _under(name, p)), key=len)]
        for target, line in GRAPH[name]:
            if target in GRAPH and target != "sidecar" and not any(_under(target, p) for p in rule.may_import):
                wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, f"{prefix}: {LAYERS[prefix].why}; found: {wrong}"


def _private(module: str) -> bool:
    root, _, rest = module.partition(".")
    if root not in GUARDED_LIBRARIES:
        return False
    return any(part.startswith("_") for part in rest.split(".") if part) or _under(module, "uvicorn.protocols")


def test_private_module_rule() -> None:
    assert _private("httpx._urlparse") and _private("uvicorn.protocols.http.httptools_impl")
    assert not _private("httpx") and not _private("uvicorn") and not _private("sidecar._compat.httpx")


def test_only_compat_imports_other_libraries_private_code() -> None:
    wrong = [
        f"{name}:{line} imports {target}"
        for name, imports in GRAPH.items() if not _under(name, COMPAT)
        for target, line in imports if _private(target)
    ]
    assert not wrong, f"other libraries' internals belong in sidecar/_compat/: {wrong}"
