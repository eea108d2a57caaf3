"""The package reads one way: no import from a lower layer to a higher one, no cycles.

The layer table is :data:`mtneuro_lab.layers.LAYERS`. Every ``mtneuro_lab`` import is checked,
at module level and inside functions; a function-local ``mtneuro_lab`` import must be listed
in :data:`LAZY` with the reason it is lazy (a heavy third-party dependency kept out of start-up),
never to dodge a cycle. Imports under ``if __name__ == "__main__":`` run only when the module is
started as a program: they are entry-point code and must be listed in :data:`ENTRY_POINTS`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from mtneuro_lab.layers import LAYERS, layer_of, wing_of

PACKAGE = Path(__file__).resolve().parent.parent / "mtneuro_lab"

#: (importing module, imported module) -> why the import is inside a function
LAZY: dict[tuple[str, str], str] = {
    (
        "mtneuro_lab.cli",
        "mtneuro_lab.run",
    ): "run imports torch and Lightning; `--cfg job`, `--help` and `-m` sweeps start without them",
}

#: (module, imported module) -> why its ``if __name__ == "__main__":`` block imports upwards
ENTRY_POINTS: dict[tuple[str, str], str] = {
    (
        "mtneuro_lab.data.sources.bossdb",
        "mtneuro_lab.download",
    ): "the former command line `python -m mtneuro_lab.data.sources.bossdb` hands over to the download command",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported mtneuro_lab module
    line: int
    local: bool  # inside a function
    main: bool  # inside an ``if __name__ == "__main__":`` block

    def __str__(self) -> str:
        where = " (function-local)" if self.local else " (__main__ block)" if self.main else ""
        return f"{self.module}:{self.line} -> {self.target}{where}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.AST, local: bool, main: bool) -> None:
        if target == "mtneuro_lab" or target.startswith("mtneuro_lab."):
            found.append(Import(module, target, node.lineno, local, main))

    def walk(node: ast.AST, local: bool, main: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            in_main = main or _is_main_guard(child)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, local, main)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in MODULES else base, child, local, main)
            walk(child, inner, in_main)

    walk(ast.parse(path.read_text()), False, False)
    return found


ALL = [imp for module in MODULES for imp in imports_of(module)]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if wing_of(m) is None or (wing_of(m) == "mtneuro_lab" and m != "mtneuro_lab")]
    assert not missing, f"modules outside mtneuro_lab.layers.LAYERS: {missing}"


def test_no_import_goes_up_or_sideways() -> None:
    bad = []
    for imp in ALL:
        here, there = wing_of(imp.module), wing_of(imp.target)
        if here == there:
            continue
        allowed = LAZY if imp.local else ENTRY_POINTS if imp.main else {}
        if layer_of(imp.target) >= layer_of(imp.module) and (imp.module, imp.target) not in allowed:
            where = "in a higher layer than" if layer_of(imp.target) > layer_of(imp.module) else "a sibling wing of"
            bad.append(f"{imp} ({there} is {where} {here})")
    assert not bad, "imports against mtneuro_lab.layers.LAYERS:\n" + "\n".join(bad)


def test_no_function_local_project_imports() -> None:
    bad = [str(imp) for imp in ALL if imp.local and (imp.module, imp.target) not in LAZY]
    assert not bad, (
        "function-local mtneuro_lab imports (import at module level, or add to LAZY with the "
        "heavy dependency it keeps out of start-up):\n" + "\n".join(bad)
    )


def test_main_blocks_are_listed() -> None:
    bad = [
        str(imp)
        for imp in ALL
        if imp.main and (imp.module, imp.target) not in ENTRY_POINTS and wing_of(imp.module) != wing_of(imp.target)
    ]
    assert not bad, "__main__ blocks importing other wings (list them in ENTRY_POINTS):\n" + "\n".join(bad)


def test_allow_lists_are_current() -> None:
    lazy = {(imp.module, imp.target) for imp in ALL if imp.local}
    main = {(imp.module, imp.target) for imp in ALL if imp.main}
    stale = sorted(set(LAZY) - lazy) + sorted(set(ENTRY_POINTS) - main)
    assert not stale, f"LAZY/ENTRY_POINTS entries no import needs any more: {stale}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL:
        if imp.target in MODULES and imp.target != imp.module and not imp.main:  # __main__: not an import of the module
            graph[imp.module].add(imp.target)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layer_table_names_real_modules() -> None:
    for layer in LAYERS:
        for wing in layer:
            assert wing in MODULES, f"mtneuro_lab.layers.LAYERS names {wing}, which does not exist"
