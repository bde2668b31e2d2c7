"""The package's shape, checked from the source (no imports run): the stages depend one way
(config -> build -> encode/train -> evaluate -> log/report), with no import cycles, no private name
crossing a module, no library code importing a command, and modules of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embedkit"

# Lower layers never import higher ones. Within one layer, packages may not import each other unless
# listed in ALLOWED_SIDEWAYS.
LAYERS = [
    {"errors"},
    {"io", "runtime"},
    {"embed", "data", "loggers"},
    {"augment", "evaluate"},
    {"train", "attention"},
    {"schema"},
    {"run", "report"},
    {"commands"},
    {"cli"},
]
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()  # none today
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "conf" in parts:
            continue
        out[".".join(parts)] = path
    return out


def imports(path: Path, top_level_only: bool):
    """(imported module, names, line, at module level) for every import of an embedkit module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if top_level_only and id(node) not in top:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embedkit") and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("embedkit"):
                    yield a.name, [], node.lineno, id(node) in top


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "embedkit"


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"embedkit.{name} is in no layer of tests/test_architecture.py: add it where it belongs")


ALL = modules()


def test_every_stage_has_a_layer():
    for module in ALL:
        if module != "embedkit":
            layer(stage(module))


def test_stages_depend_one_way():
    wrong = []
    for module, path in ALL.items():
        if module == "embedkit":
            continue
        here = stage(module)
        for target, _, line, _ in imports(path, top_level_only=False):
            there = stage(target)
            if there == here or there == "embedkit":
                continue
            if layer(there) > layer(here) or (layer(there) == layer(here) and (here, there) not in ALLOWED_SIDEWAYS):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: embedkit.{here} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _, _, _ in imports(p, top_level_only=False) if t in ALL and t != m} for m, p in ALL.items()}
    # packages' __init__ re-export their own modules; a module importing its package's API is the cycle we look for
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if seen.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "done"

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    crossing = [f"{p.relative_to(PACKAGE.parent)}:{line}: {target}.{name}"
                for m, p in ALL.items() for target, names, line, _ in imports(p, top_level_only=False)
                for name in names if name.startswith("_")]
    assert not crossing, "\n".join(crossing)


def test_library_code_imports_no_command():
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {target}" for m, p in ALL.items()
           if stage(m) not in ("commands", "cli") for target, _, line, _ in imports(p, top_level_only=False)
           if stage(target) == "commands"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(ALL))
def test_modules_are_of_a_readable_size_and_say_what_they_are(module):
    path = ALL[module]
    source = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(source)), f"{path}: no module docstring"
    n = source.count("\n")
    assert n <= MAX_LINES, f"{path}: {n} lines (split it, or state in its docstring why not and raise the limit here)"


def test_every_public_class_function_and_method_has_a_docstring():
    missing = []
    for module, path in ALL.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{module}.{node.name}")
                if isinstance(node, ast.ClassDef):
                    missing += [f"{module}.{node.name}.{m.name}" for m in node.body
                                if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
                                and not ast.get_docstring(m)]
    assert not missing, ", ".join(missing)
