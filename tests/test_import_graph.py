"""The modules of ckptsurgery import one another without cycles, and not through a package's
``__init__`` from inside that package.

Read from the source with :mod:`ast`, so nothing is imported. Every ``import`` counts, at module
level or inside a function (a function-local import only delays a cycle), except those under
``if TYPE_CHECKING:``, which never run. ``from package import name`` where the package lists
``name`` in its lazy ``_EXPORTS`` counts as an import of the module that defines ``name``.

Run as a script to print the graph's cycles: ``python tests/test_import_graph.py``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = "ckptsurgery"
SRC = Path(__file__).resolve().parents[1] / "src"

# Known exceptions, kept while the modules involved are rewritten elsewhere (surgery.py,
# merge.py and recipe.py; cli/remap_cmd.py, cli/merge_cmd.py, cli/apply_cmd.py, match.py and
# tables.py change with them). Take an entry out once its import is gone: a test fails on an
# entry that no longer matches anything, so that the lists only shrink.

# (importer, imported): imports that close a cycle, dropped from the graph before looking for
# cycles; any cycle that remains fails. None at present.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}

# (importer, name): names taken from the package __init__ instead of their defining module.
ALLOWED_INIT_IMPORTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    line: int
    target: str  # the module the import runs
    package: str | None = None  # set for a non-module name taken from a package's namespace
    name: str | None = None


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package's is its __init__)."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS`` (name -> defining module), evaluated from its source."""
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.AnnAssign | ast.Assign)
            and node.value is not None
            and "_EXPORTS" in [t.id for t in _targets(node) if isinstance(t, ast.Name)]
        ):
            code = compile(ast.Expression(node.value), str(path), "eval")
            exports: dict[str, str] = eval(code, {"__builtins__": {}, "dict": dict})
            return exports
    return {}


def _targets(node: ast.AnnAssign | ast.Assign) -> list[ast.expr]:
    return [node.target] if isinstance(node, ast.AnnAssign) else node.targets


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` that can run, skipping ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.orelse:
            yield from _import_nodes(child)
        return
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child)


def imports(src: Path = SRC) -> list[Import]:
    """Every import of a ckptsurgery module by a ckptsurgery module, as the source has it."""
    mods = modules(src)
    exports = {name: lazy_exports(path) for name, path in mods.items() if path.stem == "__init__"}
    found = []
    for importer, path in mods.items():
        is_package = path.stem == "__init__"
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [
                    Import(importer, node.lineno, alias.name)
                    for alias in node.names
                    if alias.name.split(".")[0] == ROOT
                ]
                continue
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in mods:
                    found.append(Import(importer, node.lineno, full))
                elif alias.name in exports.get(base, {}):
                    target = exports[base][alias.name]
                    found.append(Import(importer, node.lineno, target, base, alias.name))
                else:
                    found.append(Import(importer, node.lineno, base, base, alias.name))
    return found


def graph(found: list[Import]) -> dict[str, set[str]]:
    """Importer -> the modules it imports, less the ALLOWED_EDGES."""
    edges: dict[str, set[str]] = {}
    for imp in found:
        edges.setdefault(imp.target, set())
        if imp.target != imp.importer and (imp.importer, imp.target) not in ALLOWED_EDGES:
            edges.setdefault(imp.importer, set()).add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(component: list[str], found: list[Import]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for imp in found:
        if (
            imp.importer in members
            and imp.target in members
            and (imp.importer, imp.target) not in ALLOWED_EDGES
        ):
            lines.append(f"    {imp.importer}:{imp.line} imports {imp.target}")
    return "\n".join(sorted(set(lines), key=lines.index))


def init_imports(found: list[Import]) -> list[tuple[Import, str]]:
    """Imports through the ``__init__`` of a package the importer is inside: names taken from
    the package's namespace, and ``import ckptsurgery`` itself; each with a line saying so."""
    out = []
    for imp in found:
        if imp.package is not None and imp.importer.startswith(imp.package + "."):
            out.append((imp, f"{imp.importer}:{imp.line} takes {imp.name!r} from {imp.package}"))
        elif imp.target == ROOT and imp.package is None:
            out.append((imp, f"{imp.importer}:{imp.line} imports {ROOT}"))
    return out


def test_no_import_cycles() -> None:
    found = imports()
    problems = [describe(c, found) for c in cycles(graph(found))]
    assert not problems, "import cycles among ckptsurgery modules:\n" + "\n".join(problems)


def test_no_module_imports_its_package_init() -> None:
    bad = [
        line
        for imp, line in init_imports(imports())
        if (imp.importer, imp.name) not in ALLOWED_INIT_IMPORTS
    ]
    assert not bad, "import from the defining module, not the package:\n" + "\n".join(bad)


def test_command_modules_do_not_import_each_other() -> None:
    """A command module parses, calls the library and renders; what commands share lives in
    the cli package's underscored modules (options, helpers, surgery rendering)."""
    commands = {m for m in modules() if m.startswith(f"{ROOT}.cli.") and m.endswith("_cmd")}
    crossing = sorted(
        f"{imp.importer} imports {imp.target} (line {imp.line})"
        for imp in imports()
        if imp.importer in commands and imp.target in commands and imp.target != imp.importer
    )
    assert not crossing, crossing


def test_no_module_is_much_over_500_lines() -> None:
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long


def test_allowlists_name_imports_that_exist() -> None:
    found = imports()
    edges = {(imp.importer, imp.target) for imp in found}
    taken = {(imp.importer, imp.name) for imp, _ in init_imports(found)}
    stale = sorted(set(ALLOWED_EDGES) - edges) + sorted(set(ALLOWED_INIT_IMPORTS) - taken)
    assert not stale, f"allowlisted imports that are gone; take them out of the list: {stale}"


def test_the_checker_finds_what_it_should(tmp_path: Path) -> None:
    """A small package with a cycle closed by a function-local import of a lazy export, an
    import under TYPE_CHECKING that would close another, and an import of the __init__."""
    files = {
        "__init__.py": '_EXPORTS: dict[str, str] = {**dict.fromkeys(["f"], "ckptsurgery.a")}\n',
        "a.py": "def g():\n    from ckptsurgery.b import x\n",
        "b.py": "from ckptsurgery import f\nimport ckptsurgery\nx = 1\n",
        "c.py": (
            "from typing import TYPE_CHECKING\nfrom ckptsurgery.b import x\n"
            "if TYPE_CHECKING:\n    from ckptsurgery.d import y\n"
            "else:\n    from ckptsurgery.a import g\n"
        ),
        "d.py": "from ckptsurgery import c\ny = 1\n",
    }
    (tmp_path / ROOT).mkdir()
    for name, text in files.items():
        (tmp_path / ROOT / name).write_text(text)
    found = imports(tmp_path)
    assert cycles(graph(found)) == [["ckptsurgery.a", "ckptsurgery.b"]]
    assert [line for _, line in init_imports(found)] == [
        "ckptsurgery.b:1 takes 'f' from ckptsurgery",
        "ckptsurgery.b:2 imports ckptsurgery",
    ]
    assert {(i.importer, i.target) for i in found} == {
        ("ckptsurgery.a", "ckptsurgery.b"),
        ("ckptsurgery.b", "ckptsurgery.a"),
        ("ckptsurgery.b", "ckptsurgery"),
        ("ckptsurgery.c", "ckptsurgery.b"),
        ("ckptsurgery.c", "ckptsurgery.a"),
        ("ckptsurgery.d", "ckptsurgery.c"),
    }


if __name__ == "__main__":
    found = imports()
    problems = [describe(c, found) for c in cycles(graph(found))]
    allowed = []
    for imp, line in init_imports(found):
        reason = ALLOWED_INIT_IMPORTS.get((imp.importer, imp.name or ""))
        (allowed if reason else problems).append(f"{line} (allowed: {reason})" if reason else line)
    print("\n".join([*problems, *allowed]) or "no cycles, no imports through a package __init__")
    sys.exit(1 if problems else 0)
