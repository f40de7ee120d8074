"""The public names: every name in ``topo.__all__`` resolves, has a docstring with an example,
and appears in the docs; ``import topo`` alone does not import torch; every error class is a
``TopoError``; and topo raises only its own error classes, never a bare builtin."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import topo
import topo.errors

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
PUBLIC = sorted(topo.__all__)


def _docs_code() -> str:
    """The code in the docs: fenced blocks and inline code spans (prose does not count)."""
    text = "\n".join(path.read_text() for path in DOCS)
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    inline = re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(fenced + inline)


def _alias_comment(module_name: str, name: str) -> str:
    """The ``#:`` comment block above ``name = ...`` in ``module_name``: the docstring of a
    type alias (an alias object cannot carry a ``__doc__`` of its own)."""
    module = __import__(module_name, fromlist=["_"])
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(name)}\s*(:[^=]*)?=", line):
            block = []
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#:"):
                block.insert(0, lines[j].lstrip()[2:].strip())
                j -= 1
            return "\n".join(block)
    return ""


def test_public_names_are_unique_and_sorted_once() -> None:
    assert len(PUBLIC) == len(set(PUBLIC)) and PUBLIC
    assert set(PUBLIC) <= set(dir(topo))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves_is_documented_and_has_an_example(name: str) -> None:
    value = getattr(topo, name)  # resolves (lazily imports its module)
    module = topo._public_names()[name]
    if inspect.isclass(value) or inspect.isroutine(value):
        doc = inspect.getdoc(value) or ""
    else:  # a type alias such as Axis: documented by its #: comment
        doc = _alias_comment(module, name)
    assert "Example" in doc, f"topo.{name} ({module}) needs a docstring with an Example::"
    pattern = rf"(?<![\w.])(?:topo\.)?{re.escape(name)}(?!\w)"  # `name`, `topo.name(...)`
    assert re.search(pattern, _docs_code()), (
        f"topo.{name} appears in the code of none of docs/*.md or README.md; add a line for it to the page "
        f"of its feature"
    )


@pytest.mark.multiprocess  # a fresh interpreter
def test_import_topo_alone_does_not_import_torch(
    python_subprocess: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    code = (
        "import sys, topo\n"
        "mesh = topo.DeviceMesh(dp=2, tp=2)\n"
        "assert mesh.group('tp', 3) == (2, 3)\n"
        "topo.World, topo.TopoError, topo.WorldError  # pure names stay pure\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = python_subprocess(code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import topo imported torch: {result.stdout[:300]}"


@pytest.mark.multiprocess  # a fresh interpreter
def test_a_start_imports_only_what_it_runs(
    python_subprocess: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """Every rank of a job pays its start's imports: an activation and a first collective
    load neither the launcher nor the simulator (``topo.all_reduce`` is found without them),
    nor the collectives it does not call (nor with them the object codec), nor check mode's
    module, nor the ``idna`` codec (the store's address goes to ``getaddrinfo`` as bytes),
    nor ``hmac`` and ``secrets`` without a secret."""
    code = (
        "import os, sys, torch, topo\n"
        "os.environ.pop('TOPO_SECRET', None)  # a job without a secret\n"
        "w = topo.World(rank=0, world_size=1, master_port=0)\n"
        "with topo.DeviceMesh(tp=1).activate(w, timeout=30):\n"
        "    topo.all_reduce(torch.ones(2), 'tp')\n"
        "    topo.all_gather(torch.ones(2), 'tp')\n"
        "unwanted = ('topo.launch', 'topo.simulation', 'topo.communicators.threads',\n"
        "            'topo.collectives.uneven', 'topo.collectives.objects', 'topo.codec',\n"
        "            'topo.communicators.checked',\n"
        "            'encodings.idna', 'stringprep', 'hmac', 'secrets')\n"
        "print(sorted(m for m in unwanted if m in sys.modules))\n"
    )
    result = python_subprocess(code, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]"], result.stdout[:300]


@pytest.mark.parametrize(
    ("package", "modules"),
    [
        ("topo.collectives", ("gathers", "objects", "one_to_all", "p2p", "reductions", "sync",
                              "uneven")),
        ("topo.transport", ("message_queue", "objects", "tensor_dict")),
    ],
)  # fmt: skip
def test_a_package_lists_its_modules_names_literally(package: str, modules: tuple[str, ...]) -> None:
    """topo re-exports these packages' ``__all__``. A type checker reads only a literal list
    (not ``__all__ += module.__all__``): without one, ``topo.all_reduce`` was typed ``Any``."""
    tree = ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())
    values = [
        node.value
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        and "__all__" in ast.dump(node.targets[0] if isinstance(node, ast.Assign) else node.target)
    ]
    assert len(values) == 1 and isinstance(values[0], ast.List), ast.dump(values[0])
    literal = [ast.literal_eval(element) for element in values[0].elts]
    names = [n for m in modules for n in importlib.import_module(f"{package}.{m}").__all__]
    assert literal == sorted(names) == importlib.import_module(package).__all__


def test_the_collectives_table_names_each_modules_own_functions() -> None:
    """``topo.collectives`` imports a module on the first use of one of its names: its table
    must list every public function of every module, each under its own module."""
    import topo.collectives as package

    modules = ("gathers", "objects", "one_to_all", "p2p", "reductions", "sync", "uneven")
    expected = {
        name: module
        for module in modules
        for name in importlib.import_module(f"topo.collectives.{module}").__all__
    }
    assert expected == package._MODULE_OF
    assert package.__all__ == sorted(expected)
    for name, module in expected.items():
        defined = getattr(importlib.import_module(f"topo.collectives.{module}"), name)
        assert getattr(package, name) is defined is getattr(topo, name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match=r"topo\.collectives' has no attribute 'nope'"):
        package.nope  # noqa: B018


def test_every_error_class_is_a_topo_error() -> None:
    classes = [getattr(topo.errors, n) for n in topo.errors.__all__]
    assert classes
    for cls in classes:
        # every error is a TopoError; topo's one warning is a UserWarning
        assert inspect.isclass(cls) and issubclass(cls, (topo.TopoError, UserWarning)), cls
        assert getattr(topo, cls.__name__) is cls  # each one is public at the top level
    # and no exception class defined anywhere in topo escapes the hierarchy
    defined = {
        (path.relative_to(ROOT).as_posix(), node.name)
        for path in sorted((ROOT / "topo").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(base, ast.Name) and base.id.endswith(("Error", "Exception", "Timeout"))
            for base in node.bases
        )
    }
    for file, name in defined:
        module = __import__(file.removesuffix(".py").replace("/", "."), fromlist=["_"])
        cls = getattr(module, name)
        assert issubclass(cls, topo.TopoError), f"{file}: class {name} is not a TopoError"


BUILTINS = {"ValueError", "TypeError", "RuntimeError", "TimeoutError"}


def test_topo_raises_only_its_own_error_classes() -> None:
    found = []
    for path in sorted((ROOT / "topo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id in BUILTINS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {target.id}")
    assert not found, "use topo.errors classes (TopoValueError, ...) instead:\n" + "\n".join(found)
