"""The house's layering, checked as import-linter would: every module under topo/ imports only
modules on its own floor or lower (the floor table of docs/design.md), and no file is over the
size limit.

Each module is imported (so that a module that no longer imports fails here), and its source
is parsed: every ``import``/``from … import`` of a ``topo`` module counts, those inside
functions and under ``if TYPE_CHECKING:`` too.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "topo"

#: The floors, lowest first. A key names a module and, for a package, every module under it
#: (``topo.collectives`` covers ``topo.collectives.p2p``). The top (``topo`` itself and
#: ``topo.__main__``) may import anything.
FLOORS: dict[str, int] = {
    "topo.errors": 1,
    "topo._checks": 1,
    "topo.world": 1,
    "topo.secret": 1,
    "topo.process_identity": 1,
    "topo._dist": 1,
    "topo.mesh": 2,
    "topo.mesh_views": 2,
    "topo.placement": 2,
    "topo.rank_layout": 2,
    "topo.coordinator": 2,
    "topo.codec": 2,
    "topo.store": 2,
    "topo.generation": 2,
    "topo.verdict": 2,
    "topo.communicators": 3,
    "topo.context": 4,
    "topo.active": 4,
    "topo.view": 4,
    "topo._options": 4,
    "topo.collectives": 5,
    "topo.ops": 5,
    "topo.rng": 5,
    "topo.partition_spec": 2,
    "topo.spmd": 6,
    "topo.spmd_dtensor": 6,
    "topo.autograd": 6,
    "topo.transport": 6,
    "topo.transfer": 6,
    "topo.interop": 6,
    "topo.simulate": 6,
    "topo.simulation": 6,
    "topo.launch": 6,
    "topo.ray": 6,
    "topo.graphs": 6,
    "topo.bench": 7,
    "topo.cli": 7,
    "topo.plan": 7,
}
TOP = ("topo", "topo.__main__")

#: The upward imports, each a one-line delegate imported inside its method: ``DeviceMesh.activate`` to
#: ``topo.context.activate`` (imported inside the method), and its return annotation names
#: ``MeshContext`` (imported for type checkers only).
ALLOWED_UPWARD = {
    ("topo.mesh", "topo.context", "DeviceMesh.activate"),
    ("topo.mesh", "topo.context", "if TYPE_CHECKING"),
    # ctx.torch_group / ctx.torch_mesh: one-line delegates to topo.interop (floor 6), imported
    # inside the method as DeviceMesh.activate is, so torch interop loads only when asked for.
    ("topo.context", "topo.interop", "MeshContext.torch_group"),
    ("topo.context", "topo.interop", "MeshContext.torch_mesh"),
}

MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# Every .py file: pkgutil.walk_packages would skip topo/communicators (a namespace package,
# without an __init__.py), so the files themselves are the list.
FILES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def floor(module: str) -> int | None:
    """The floor of ``module`` (the top is above every floor), or None if the table lacks it."""
    if module in TOP:
        return max(FLOORS.values()) + 1
    for key, value in FLOORS.items():
        if module == key or module.startswith(key + "."):
            return value
    return None


class _Imports(ast.NodeVisitor):
    """Collects ``(target module, where)``: where is the enclosing ``Class.function``
    qualname, ``if TYPE_CHECKING`` for a type-only import at module level, or ``""``."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int]] = []

    def _where(self) -> str:
        return ".".join(self.scope)

    def _add(self, target: str, line: int) -> None:
        if target == "topo" or target.startswith("topo."):
            self.found.append((target, self._where(), line))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING" and not self.scope:
            self.scope.append("if TYPE_CHECKING")
            for child in node.body:
                self.visit(child)
            self.scope.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parent = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{parent}.{base}" if base else parent
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in FILES else base, node.lineno)


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """Every ``topo`` module that ``module`` imports: ``(target, where, line)``."""
    path = FILES[module]
    collector = _Imports(module, path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return collector.found


def _needs_cupy(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in ("cupy", "cupyx"):
            return True
        raise
    return False


def _edges() -> Iterator[tuple[str, str, str, int]]:
    for module in FILES:
        for target, where, line in imports_of(module):
            yield module, target, where, line


def test_every_module_imports_and_is_on_a_floor() -> None:
    unknown = [m for m in FILES if floor(m) is None]
    assert not unknown, (
        f"{unknown} are not in the floor table: add each to FLOORS in tests/test_layers.py "
        f"(and to the table in docs/design.md) with the floor it belongs on"
    )
    for module in FILES:
        _needs_cupy(module)  # a module that needs cupy is still parsed below


def test_imports_point_down_the_floors() -> None:
    upward: list[str] = []
    used: set[tuple[str, str, str]] = set()
    for module, target, where, line in _edges():
        mine, theirs = floor(module), floor(target)
        assert theirs is not None, (
            f"{module} (line {line}) imports {target}, which is not in the floor table: add it "
            f"to FLOORS in tests/test_layers.py (and to docs/design.md)"
        )
        assert mine is not None
        if theirs <= mine:
            continue
        if (module, target, where) in ALLOWED_UPWARD:
            used.add((module, target, where))
            continue
        upward.append(
            f"{FILES[module].relative_to(ROOT.parent)}:{line}: {module} (floor {mine}) imports "
            f"{target} (floor {theirs}){' in ' + where if where else ''}"
        )
    assert not upward, (
        "imports must point down the floors (same floor is fine); move the code or pass the "
        "object in instead:\n" + "\n".join(upward)
    )
    assert used == ALLOWED_UPWARD, (
        f"the allowed upward imports {sorted(ALLOWED_UPWARD - used)} no longer happen: remove "
        f"them from ALLOWED_UPWARD"
    )


def test_the_checker_sees_imports_inside_functions_and_type_checking() -> None:
    edges = set(imports_of("topo.mesh"))
    targets = {(t, w) for t, w, _ in edges}
    assert ("topo.context", "DeviceMesh.activate") in targets
    assert ("topo.context", "if TYPE_CHECKING") in targets
    assert ("topo.placement", "DeviceMesh.placement") in targets
    cli = {t for t, _, _ in imports_of("topo.__main__")}
    assert cli == {"topo.cli"}
    assert floor("topo.collectives.p2p") == 5 and floor("topo.communicators.gloo") == 3
    assert floor("topo.meshes") is None and floor("topo") == max(FLOORS.values()) + 1


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_file_is_over_the_size_limit(module: str) -> None:
    lines = len(FILES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, (
        f"{FILES[module].relative_to(ROOT.parent)} has {lines} lines, over {MAX_LINES}: split "
        f"it by concept (one concept per file)"
    )
