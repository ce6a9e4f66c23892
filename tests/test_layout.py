"""The package's modules import downward only, in the order docs/architecture.md lists them.

Reads the sources with ``ast`` (nothing is imported): every import counts, at module level, inside
functions and under ``TYPE_CHECKING`` alike. ``from mae_jax import X`` is an import of the
submodule X when X is a module, else of the package's ``__init__`` (``mae_jax``). ``convert/``
(installed as ``mae_jax.convert``) counts as the one module ``mae_jax.convert``; every other module,
in a subpackage (``mae_jax/data/``) too, is its own, and a subpackage's ``__init__`` is a face
(``mae_jax.data``) that no module of the package imports.
"""

from __future__ import annotations

import ast
import functools
import graphlib
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mae_jax"
CONVERT = "mae_jax.convert"  # convert/ in a clone, mapped into the package when installed
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def declared_order() -> list[str]:
    """The modules of docs/architecture.md's list lines (``- `name`: role``), bottom first."""
    return re.findall(r"^- `([\w.]+)`:", ARCHITECTURE.read_text(), flags=re.MULTILINE)


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of mae_jax/ and convert/."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "convert").glob("*.py")):
        files[f"{CONVERT}.{path.stem}" if path.stem != "__init__" else CONVERT] = path
    return files


def unit_of(name: str, units: set[str]) -> str | None:
    """The unit of ``name`` (a module, or the package ``convert`` as one): the longest listed
    prefix; None for a name outside the package."""
    if name == "convert" or name.startswith("convert."):
        name = PACKAGE + "." + name
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in units:
            return ".".join(parts[:end])
    return None


def imports_of(
    module: str, source: str, modules: set[str], units: set[str], is_package: bool = False
) -> list[tuple[int, str]]:
    """(line, unit imported) for each import of the package in ``source`` (the module
    ``module``, an ``__init__.py`` if ``is_package``), at any depth, in line order."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for alias in node.names:
                # `from mae_jax import data` imports the module data; `... import X` the face
                sub = f"{base}.{alias.name}"
                names.append(sub if unit_of(sub, units) == sub or sub in modules else base)
        for name in names:
            unit = unit_of(name, units)
            if unit is not None:
                found.append((node.lineno, unit))
    return sorted(found, key=lambda item: item[0])


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """unit -> units it imports, and each import as 'file:line: a -> b' for messages."""
    files = module_files()
    units = {unit_of(m, {CONVERT}) or m for m in files}
    graph, where = {u: set() for u in units}, {}
    for module, path in files.items():
        unit = unit_of(module, units)
        for line, target in imports_of(
            module, path.read_text(), set(files), units, path.name == "__init__.py"
        ):
            if target != unit:
                graph[unit].add(target)
                places = where.setdefault((unit, target), [])
                if f"{path.relative_to(ROOT)}:{line}" not in places:
                    places.append(f"{path.relative_to(ROOT)}:{line}")
    return graph, where


def test_every_module_has_its_floor():
    listed = declared_order()
    graph, _ = import_graph()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(listed)}"
    assert not set(graph) - set(listed), (
        f"modules without a line in docs/architecture.md: {sorted(set(graph) - set(listed))}"
    )
    assert not set(listed) - set(graph), (
        f"listed in docs/architecture.md but not found: {sorted(set(listed) - set(graph))}"
    )


def test_no_import_cycle():
    graph, where = import_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        cycle = err.args[1]
        # graphlib lists each node before the one that imports it
        edges = [f"{b} -> {a} ({', '.join(where[b, a])})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle:\n" + "\n".join(edges)) from None


def faces() -> set[str]:
    """The ``__init__`` modules of the package and of its subpackages with modules of their own
    (``mae_jax``, ``mae_jax.data``): what users import. ``mae_jax.convert`` is one module."""
    files = module_files()
    return {
        module
        for module, path in files.items()
        if path.name == "__init__.py"
        and module != CONVERT
        and any(p.parent == path.parent and p.name != "__init__.py" for p in files.values())
    }


def test_faces_are_the_package_and_its_data_subpackage():
    assert faces() == {PACKAGE, "mae_jax.data"}


def test_nothing_in_the_package_imports_a_face():
    graph, where = import_graph()
    found = [
        f"{u} -> {face} ({', '.join(where[u, face])})"
        for u in sorted(graph)
        if u not in faces() and u != CONVERT  # the converter's scripts load through mae_jax
        for face in sorted(graph[u] & faces())
    ]
    found += [
        f"{CONVERT} -> {face} ({', '.join(where[CONVERT, face])})"
        for face in sorted(graph[CONVERT] & (faces() - {PACKAGE}))
    ]
    assert not found, "imports of a package's __init__ from inside the package:\n" + "\n".join(
        found
    )


def test_imports_go_down_the_declared_order():
    floor = {module: i for i, module in enumerate(declared_order())}
    graph, where = import_graph()
    upward = [
        f"{a} -> {b} ({', '.join(where[a, b])})"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if floor[b] > floor[a]
    ]
    assert not upward, "imports of a module listed higher in docs/architecture.md:\n" + "\n".join(
        upward
    )


def test_imports_are_resolved_as_python_does():
    modules = {"mae_jax", "mae_jax.data", "mae_jax.train", "mae_jax.convert", "mae_jax.convert.m"}
    units = {"mae_jax", "mae_jax.data", "mae_jax.train", "mae_jax.convert"}
    source = (
        "from mae_jax import data, load_pretrained\n"
        "import mae_jax.train\n"
        "def f():\n"
        "    from mae_jax.data import DataError\n"
        "    from .convert import m\n"
        "    import numpy\n"
    )
    got = imports_of("mae_jax.x", source, modules, units)
    assert got == [(1, "mae_jax.data"), (1, "mae_jax"), (2, "mae_jax.train")] + [
        (4, "mae_jax.data"),
        (5, "mae_jax.convert"),
    ]
    in_convert = imports_of(
        "mae_jax.convert.m", "from . import n\nfrom mae_jax import data\n", modules, units
    )
    assert in_convert == [(1, "mae_jax.convert"), (2, "mae_jax.data")]
    in_init = imports_of("mae_jax.convert", "from .m import f\n", modules, units, is_package=True)
    assert in_init == [(1, "mae_jax.convert")]
