"""The import rule of docs/ARCHITECTURE.md, checked on the source: stitch's packages import only downward.

Every module under `stitch/` is parsed with `ast` (nothing is imported, so this runs in a second) and every import
of a stitch module is collected, at module level and inside functions, relative imports resolved. Each module
belongs to a layer; a module may import its own package, another package of its layer where the table allows it,
or any lower layer. On top of that: no import cycles between modules (function-level imports count too), nothing
imports the CLI-only `stitch.checkpoint.commands`, and function-level stitch imports stay few (each one is a
deliberate exception, not a way around a cycle).

Parent packages are not counted as imported (`import stitch.data.blend` runs `stitch/data/__init__.py` too): the
package `__init__` files of the library layers hold no stitch imports, which `test_package_inits_are_light`
keeps so. String imports (`importlib.import_module`, the CLI router's table) are not seen by this scan.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stitch"

# Lowest first. A key ending in "." is a package (its `__init__` and every module in it); other keys are exact
# module names.
LAYERS: dict[str, int] = {
    "stitch.errors": 0,
    "stitch.config": 0,
    "stitch.device": 0,
    "stitch.layout": 0,
    "stitch.models.": 1,
    "stitch.checkpoint.": 2,
    "stitch.data.": 2,
    "stitch.parallel.": 3,
    "stitch.train.": 4,
    "stitch.infer.": 4,
    "stitch.eval.": 4,
    "stitch": 5,  # the package itself: `stitch.load` / `stitch.generate`, lazily from stitch.api
    "stitch.api": 5,
    "stitch.cli": 6,
    "stitch.__main__": 6,
    "stitch.quickstart": 6,
    "stitch.env": 6,
}
LAYER_NAMES = {0: "base", 1: "models", 2: "checkpoint/data", 3: "parallel", 4: "train/infer/eval", 5: "api",
               6: "cli"}
# Packages of one layer that may import each other (importer, imported); any other pair within a layer may not.
SAME_LAYER_ALLOWED = {("eval", "infer")}
CLI_ONLY = {"stitch.checkpoint.commands"}  # reached only through the `stitch` command's router
MAX_FUNCTION_LEVEL = 10


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # the stitch module imported
    line: int
    nested: bool  # inside a function
    text: str  # the statement, for messages

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}: {self.text})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The stitch modules a `from X import a, b` names: `X.a` where that is a module, else `X` itself."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        package = ".".join(base + ([node.module] if node.module else []))
    else:
        package = node.module or ""
    if package.split(".")[0] != "stitch":
        return []
    targets = []
    for alias in node.names:
        sub = f"{package}.{alias.name}"
        targets.append(sub if sub in modules else package)
    return list(dict.fromkeys(targets))


def collect_imports() -> list[Import]:
    modules = all_modules()
    found: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        nested_ids = {
            id(inner)
            for func in ast.walk(tree)
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for inner in ast.walk(func)
            if isinstance(inner, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "stitch"]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve_from(node, name, path.name == "__init__.py", modules)
            else:
                continue
            text = ast.unparse(node)
            for target in targets:
                found.append(Import(name, target, node.lineno, id(node) in nested_ids, text))
    return found


def layer_of(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    for key, layer in LAYERS.items():
        if key.endswith(".") and (module.startswith(key) or module == key[:-1]):
            return layer
    raise KeyError(f"{module}: not in the layer table of tests/test_architecture.py (and docs/ARCHITECTURE.md)")


def group_of(module: str) -> str:
    """The package a module counts as within its layer (the base layer and the CLI layer are one group each)."""
    layer = layer_of(module)
    if layer in (0, 5, 6):
        return LAYER_NAMES[layer]
    return module.split(".")[1]


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return collect_imports()


def test_the_scan_sees_the_package(imports):
    """Guards against a scan that finds nothing and so passes everything."""
    modules = all_modules()
    assert len(modules) > 50 and "stitch.checkpoint.store" in modules
    edges = {(i.importer, i.target) for i in imports}
    assert ("stitch.checkpoint.store", "stitch.checkpoint.weights") in edges
    assert ("stitch.eval.scoring", "stitch.eval.metrics") in edges  # `from stitch.eval import metrics`
    assert any(i.nested for i in imports)


def test_every_module_has_a_layer():
    missing = []
    for module in all_modules():
        try:
            layer_of(module)
        except KeyError as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)


def test_imports_go_only_downward(imports):
    """(a) No module imports a higher layer."""
    bad = [f"{i}: layer {layer_of(i.importer)} ({LAYER_NAMES[layer_of(i.importer)]}) imports {i.target}, layer "
           f"{layer_of(i.target)} ({LAYER_NAMES[layer_of(i.target)]})"
           for i in imports if layer_of(i.target) > layer_of(i.importer)]
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def _same_layer_violations(imports: list[Import], groups: set[str]) -> list[str]:
    out = []
    for i in imports:
        a, b = group_of(i.importer), group_of(i.target)
        if layer_of(i.importer) == layer_of(i.target) and a != b and {a, b} <= groups \
                and (a, b) not in SAME_LAYER_ALLOWED:
            out.append(f"{i}: {a} imports {b} ({i.target})")
    return out


def test_checkpoint_and_data_do_not_import_each_other(imports):
    """(b) The two packages of layer 2 stay independent; what pairs them (model + processor) is in infer."""
    bad = _same_layer_violations(imports, {"checkpoint", "data"})
    assert not bad, "checkpoint <-> data imports:\n" + "\n".join(bad)


def test_train_infer_eval_keep_apart(imports):
    """(c) train does not import infer or eval and neither imports train; of the three only eval -> infer."""
    bad = _same_layer_violations(imports, {"train", "infer", "eval"})
    assert not bad, "train / infer / eval imports (only eval -> infer is allowed):\n" + "\n".join(bad)


def test_no_same_layer_imports_across_packages(imports):
    """The general form of (b) and (c): within a layer, only the pairs in SAME_LAYER_ALLOWED."""
    groups = {group_of(m) for m in all_modules()}
    bad = _same_layer_violations(imports, groups)
    assert not bad, "\n".join(bad)


def _find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component with more than one module or a
    self-import (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.add(top)
                        if top == node:
                            break
                    components.append(comp)
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for comp in components:
        start = min(comp)
        if len(comp) == 1 and start not in edges.get(start, ()):
            continue
        # breadth-first from start back to start inside the component: the shortest cycle through it
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for node in frontier:
                for child in sorted(edges.get(node, ())):
                    if child == start:
                        found = node
                        break
                    if child in comp and child not in prev:
                        prev[child] = node
                        nxt.append(child)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        node = found
        while node is not None and node != start:
            path.append(node)
            node = prev.get(node)
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def _reachable_both_ways(edges: dict[str, set[str]], start: str) -> set[str]:
    """The modules on some cycle through `start` (its strongly connected component)."""
    def reach(graph: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for child in graph.get(todo.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    reverse: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            reverse.setdefault(b, set()).add(a)
    return reach(edges) & reach(reverse)


def test_find_cycles_reports_a_cycle():
    """The cycle finder itself: a three-module loop is reported as a path; a chain is not a cycle."""
    assert _find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _find_cycles({"a": {"b"}, "b": {"c"}}) == []
    assert _find_cycles({"a": {"a"}}) == [["a", "a"]]


def test_no_import_cycles(imports):
    """(d) No cycle among modules, inside a package or across packages, counting function-level imports."""
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for i in imports:
        if i.target != i.importer:
            edges.setdefault(i.importer, set()).add(i.target)
            where.setdefault((i.importer, i.target), i)
    cycles = _find_cycles(edges)
    lines = []
    for cycle in cycles:
        tangle = _reachable_both_ways(edges, cycle[0])
        lines.append(" -> ".join(cycle) + (f"   (one of the cycles among {len(tangle)} modules: "
                                           f"{', '.join(sorted(tangle))})" if len(tangle) > len(cycle) - 1 else ""))
        lines += [f"    {where[(a, b)]}" for a, b in zip(cycle, cycle[1:])]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_nothing_imports_a_cli_only_module(imports):
    bad = [str(i) for i in imports if i.target in CLI_ONLY]
    assert not bad, f"{', '.join(sorted(CLI_ONLY))} is reached only through the `stitch` router:\n" + "\n".join(bad)


def test_few_function_level_imports(imports):
    """(e) At most MAX_FUNCTION_LEVEL `from stitch ...` / `import stitch` statements inside functions; each
    remaining one should say in a comment why it cannot be at module level."""
    nested = sorted({(i.importer, i.line, i.text) for i in imports if i.nested})
    listing = "\n".join(f"{m}:{line}: {text}" for m, line, text in nested)
    assert len(nested) <= MAX_FUNCTION_LEVEL, (
        f"{len(nested)} function-level stitch imports (at most {MAX_FUNCTION_LEVEL}):\n{listing}")


def test_package_inits_are_light(imports):
    """Importing a module runs its parents' `__init__`: below the API layer those import nothing of stitch at
    module level, so the parent packages this scan leaves out add no edges."""
    bad = [str(i) for i in imports
           if i.importer != "stitch" and all_modules()[i.importer].name == "__init__.py" and not i.nested]
    assert not bad, "\n".join(bad)
