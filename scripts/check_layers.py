"""Check the package's import structure: no import cycles between modules, no private name
imported from another module, and imports only point down the layers below.

Run: python scripts/check_layers.py  (also run by the test suite, tests/test_layout.py)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "reasonmaxxer"

# Lower layers first; a module may import from its own layer or any layer before it.
LAYERS = [
    ("errors", "io", "schema"),
    ("core",),
    ("verify", "data"),
    ("models", "store", "config_base"),
    ("backends",),
    ("stages",),
    ("analysis", "reports"),
    ("config",),
    ("recipes",),
    ("cli", "__main__", "__init__"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def layer_of(mod: str) -> int:
    top = mod.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(f"{mod}: not in any layer of scripts/check_layers.py")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every package-internal import in `path`."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = []
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                anchor = base[: len(base) - (n.level - 1)] if n.level > 1 else base
                target = ".".join(anchor + ([n.module] if n.module else []))
            elif n.module and n.module.startswith("reasonmaxxer."):
                target = n.module.split(".", 1)[1]
            else:
                continue
            names = [a.name for a in n.names]
            # `from . import x` / `from .pkg import submodule`
            resolved = []
            for a in names:
                sub = f"{target}.{a}" if target else a
                if (PKG / (sub.replace(".", "/") + ".py")).is_file() or (PKG / sub.replace(".", "/")).is_dir():
                    resolved.append((sub, []))
                else:
                    resolved.append((target, [a]))
            for t, ns in resolved:
                out.append((t, ns, n.lineno))
    return out


def check() -> list[str]:
    problems = []
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        graph.setdefault(mod, set())
        for target, names, line in imports(path):
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if target and target != mod:
                graph[mod].add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != mod:
                    problems.append(f"{where}: private name {n} imported from {target}")
            if target and layer_of(target) > layer_of(mod):
                problems.append(
                    f"{where}: {mod} (layer {layer_of(mod)}) imports {target} (layer {layer_of(target)}), "
                    "an upper layer"
                )
    # cycles between modules (a package's __init__ importing its own submodules is not a cycle)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue
            if state.get(t) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            elif t in graph and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)
    return problems


if __name__ == "__main__":
    found = check()
    print("\n".join(found) or "layers: ok")
    sys.exit(1 if found else 0)
