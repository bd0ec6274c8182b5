"""The package's import structure: imports only point down the layers, and no module imports itself
back through others (no circles). Reads every module's import statements with ``ast`` (module level
and inside functions alike), so a lazy import cannot hide an upward dependency.

The layer order is written here once (docs/architecture.md and DESIGN.md describe the same).
"""
from __future__ import annotations

import ast
import os

import speedrun

PACKAGE_DIR = os.path.dirname(speedrun.__file__)

# bottom to top; a module may import modules of its own layer or of layers below it
LAYERS = [
    ["speedrun.utils", "speedrun.config", "speedrun.pycache", "speedrun.presets"],
    ["speedrun.distributed", "speedrun.kernels", "speedrun.data"],
    ["speedrun.model"],
    ["speedrun.optim"],
    ["speedrun.train"],
    ["speedrun.eval", "speedrun.bench"],
    ["speedrun.cli", "speedrun.__main__", "speedrun"],   # the package itself: its speedrun.load
]


def layer_of(module: str) -> int:
    """Index of the layer holding ``module`` (the longest matching prefix wins)."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS in {__file__}")
    return best


def module_files() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))
            module = rel[:-3].replace(os.sep, ".")
            out[module.removesuffix(".__init__")] = os.path.join(root, name)
    return out


def imports_of(path: str, module: str, known: set[str]) -> set[str]:
    """Our own modules that ``path`` imports (``from speedrun.x import y`` counts speedrun.x.y
    when y is a module, else speedrun.x)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts[:len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "speedrun" or name.startswith("speedrun."):
                # the nearest enclosing module we know (speedrun.x.y.Class -> speedrun.x.y)
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name != module:
                    found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_points_up_a_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in graph().items() for d in sorted(deps)
              # a package's __init__ may re-export its own modules
              if layer_of(d) > layer_of(m) and not d.startswith(m + ".")]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    g = graph()
    # a package __init__ re-exporting its modules is not a circle: drop package -> submodule edges
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_checker_sees_upward_and_circular_imports(tmp_path):
    """The checks above would notice: an upward import and a circle in a made-up package."""
    pkg = tmp_path / "speedrun"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "a.py").write_text("def f():\n    from speedrun.train import b\n")
    (pkg / "model" / "c.py").write_text("from speedrun.model import a\nfrom . import a as again\n")
    files = {"speedrun.model.a": str(pkg / "model" / "a.py"), "speedrun.model.c": str(pkg / "model" / "c.py"),
             "speedrun.train.b": "", "speedrun.model": ""}
    assert imports_of(files["speedrun.model.a"], "speedrun.model.a", set(files)) == {"speedrun.train.b"}
    assert layer_of("speedrun.train.b") > layer_of("speedrun.model.a")
    assert imports_of(files["speedrun.model.c"], "speedrun.model.c", set(files)) == {"speedrun.model.a"}
