"""What code a module can run, read from the source (nothing is imported): the modules each file imports
(at the top or inside functions; not under `if TYPE_CHECKING:`, which never runs), and the repository
files a module reaches through them. The graphs' content keys hash those files, so a dependency that is
added or renamed is followed without a list of paths to keep; tests/test_layout.py reads the layering
with the same reader.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export")


def module_paths(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ours (a package by its own name) -> its file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def _nodes(tree: ast.AST, functions: bool) -> Iterator[ast.AST]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                yield child
                yield from _nodes(child, functions)
            continue
        yield node
        if functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _nodes(node, functions)


def imported(path: Path, modules: Iterable[str], functions: bool = True) -> set[str]:
    """The modules a file imports (inside functions too, unless not `functions`): ours (`modules`) by
    module name, with `from package import submodule` meaning the submodule; any other as written
    (`torch`, `safetensors.torch`)."""
    modules, found = set(modules), set()
    for node in _nodes(ast.parse(path.read_text()), functions):
        if isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


@functools.cache
def reachable_files(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """The repository files (relative paths) whose code `module` can run: its own and, transitively, every
    module of ours it imports, and the packages above each with what they import when loaded (not the
    lazy attributes their functions load on use: `runtime.NOVARunner` is not code of a graph)."""
    paths = module_paths(root)
    seen, todo = set(), [(module, True)]
    while todo:
        name, functions = todo.pop()
        if (name, functions) in seen or name not in paths:
            continue
        seen.add((name, functions))
        parents = [(".".join(name.split(".")[:i]), False) for i in range(1, name.count(".") + 1)]
        todo += [*parents, *((target, True) for target in imported(paths[name], paths, functions))]
    return tuple(sorted({str(paths[name].relative_to(root)) for name, _ in seen}))
