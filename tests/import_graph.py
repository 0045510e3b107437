"""The import graph between the modules and packages of processor/, read from the source with `ast`.

Nothing is imported, so a module that does not import cleanly (or is half moved) is still read.
A *component* is a top-level module (`processor/db.py`: `db`) or package (`processor/cli/`:
`cli`) of processor/; imports inside one package are its own business and not counted. The
package's own `__init__.py` (the version) and `__main__.py` (`python -m processor`, the console
script's twin, above `cli`) are entry points, not components; the Alembic revisions in
`processor/migrations/versions/` are generated and frozen, and not read.

docs/architecture.md's dependency lines are written by `dependency_lines` (through cog; see the
README's "Development" section) and checked against `import_graph` by tests/test_docs.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "processor"
ENTRY_POINTS = ("__init__.py", "__main__.py")
NOT_READ = (PACKAGE / "migrations" / "versions",)
REGENERATE = ".venv/bin/cog -I . -r docs/architecture.md"


def is_read(path: Path) -> bool:
    return not any(path == skipped or skipped in path.parents for skipped in NOT_READ)


def components() -> dict[str, Path]:
    """Each top-level module and package of processor/ by name: `db` -> processor/db.py."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.iterdir()):
        if path.is_dir() and any(path.rglob("*.py")):
            found[path.name] = path
        elif path.suffix == ".py" and path.name not in ENTRY_POINTS:
            found.setdefault(path.stem, path)  # a package beside a module of the same name wins
    return found


def modules(component: Path) -> list[Path]:
    """The .py files of a component (one for a module, each file read for a package)."""
    if component.is_file():
        return [component]
    return sorted(p for p in component.rglob("*.py") if is_read(p) and "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> Iterator[tuple[str, int]]:
    """Every module name an import statement in `path` may load, with its line.

    `from a.b import c` may load `a.b.c` (a submodule) or only `a.b` (c is a name in it): both are
    given, and the caller keeps the ones that are modules. Relative imports are resolved. Imports
    inside functions and under `if TYPE_CHECKING:` count too: they are dependencies all the same.
    """
    package = dotted(path).split(".") if path.name == "__init__.py" else dotted(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module, node.lineno
            for alias in node.names:
                yield f"{module}.{alias.name}", node.lineno


@dataclass(frozen=True)
class Import:
    """One import of a component by another, where it is written."""

    source: str  # the importing component
    target: str  # the imported one
    where: str  # processor/cli/app.py:21
    name: str  # processor.monitoring

    def __str__(self) -> str:
        return f"{self.where} imports {self.name}"


def imports() -> list[Import]:
    """Every import of one component by another, in file and line order."""
    names = components()
    found: list[Import] = []
    for source, path in names.items():
        for module in modules(path):
            seen: set[tuple[str, int]] = set()
            for name, line in imported_names(module):
                parts = name.split(".")
                if len(parts) < 2 or parts[0] != "processor" or parts[1] not in names or parts[1] == source:
                    continue
                if (parts[1], line) in seen:
                    continue
                seen.add((parts[1], line))
                where = f"{module.relative_to(ROOT).as_posix()}:{line}"
                found.append(Import(source, parts[1], where, ".".join(parts[:2])))
    return found


def import_graph() -> dict[str, set[str]]:
    """Each component and the components it imports."""
    graph: dict[str, set[str]] = {name: set() for name in components()}
    for found in imports():
        graph[found.source].add(found.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target):], node, target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def heights(graph: dict[str, set[str]]) -> dict[str, int]:
    """0 for a component that imports none of the others, else 1 + the highest it imports."""
    cycle = find_cycle(graph)
    if cycle:
        raise ValueError("the imports between processor's components have a cycle: " + " → ".join(cycle))
    height: dict[str, int] = {}

    def of(node: str) -> int:
        if node not in height:
            height[node] = 1 + max((of(t) for t in graph[node]), default=-1)
        return height[node]

    for node in graph:
        of(node)
    return height


def dependency_lines() -> str:
    """docs/architecture.md's dependency lines: one per component that imports others, the
    highest first, so that every arrow points to a line further down; then those that import
    none of the others."""
    graph = import_graph()
    height = heights(graph)
    order = sorted(graph, key=lambda name: (-height[name], name))
    lines = [
        f"- `{name}` → " + ", ".join(f"`{target}`" for target in sorted(graph[name]))
        for name in order
        if graph[name]
    ]
    leaves = [name for name in order if not graph[name]]
    if leaves:
        lines.append("- " + ", ".join(f"`{name}`" for name in leaves) + ": they import none of the others.")
    return "\n".join(lines) + "\n"


# --- what the code defines, for the names a page gives in backquotes ---------------------------------------


@dataclass
class Definitions:
    """The names processor/ defines: each module's top-level names (a package's include its
    modules) under its short and longer dotted names, and each class's attributes."""

    modules: dict[str, set[str]]  # "store", "run.store", "processor.run.store" -> {"RunStore", ...}
    classes: dict[str, set[str]]  # "RunStore" -> {"write_chunk", ...}

    def resolves(self, dotted_name: str) -> str | None:
        """None when `a.b.c` names a module, class, function or attribute of processor/, else
        what is missing."""
        first, *rest = dotted_name.split(".")
        scopes = [("module", self.modules[first])] if first in self.modules else []
        scopes += [("class", self.classes[first])] if first in self.classes else []
        if not scopes:
            return f"processor/ has no module or class `{first}`"
        for i, part in enumerate(rest):
            found = [s for s in scopes if part in s[1]]
            if not found:
                return f"`{'.'.join([first, *rest[:i]])}` has no `{part}`"
            prefix = ".".join([first, *rest[: i + 1]])
            scopes = [("module", self.modules[prefix])] if prefix in self.modules else []
            scopes += [("class", self.classes[part])] if part in self.classes else []
            if not scopes:
                return None  # a function or a value: what follows is not checked
        return None


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        names |= statement_names(node)
    return names


def statement_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, ast.If | ast.Try):  # if TYPE_CHECKING:, try: ... except ImportError:
        inner = [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
        inner += [n for handler in getattr(node, "handlers", []) for n in handler.body]
        return {name for n in inner for name in statement_names(n)}
    return set()


def definitions() -> Definitions:
    modules: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    files = [p for p in PACKAGE.rglob("*.py") if is_read(p) and "__pycache__" not in p.parts]
    for path in sorted(files):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parts = dotted(path).split(".")
        names = top_level_names(tree)
        for i in range(len(parts)):
            modules.setdefault(".".join(parts[i:]), set()).update(names)
        for i in range(len(parts) - 1):  # a module is a name in its package
            for j in range(i + 1):
                modules.setdefault(".".join(parts[j:i + 1]), set()).add(parts[i + 1])
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                attrs = classes.setdefault(node.name, set())
                for statement in node.body:
                    attrs |= statement_names(statement)
                bases.setdefault(node.name, []).extend(b.id for b in node.bases if isinstance(b, ast.Name))
    for name in list(classes):  # inherited attributes, from the classes of processor/
        seen, todo = set(), list(bases.get(name, []))
        while todo:
            base = todo.pop()
            if base in classes and base not in seen:
                seen.add(base)
                classes[name] |= classes[base]
                todo += bases.get(base, [])
    return Definitions(modules, classes)
