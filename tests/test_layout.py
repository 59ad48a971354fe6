"""The package's structure: imports point down the layers, no cycles, no private names across modules."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_package_imports_point_down_without_cycles_or_private_names():
    assert _checker().check() == []


def test_checker_finds_a_cycle_an_upward_import_and_a_private_name(tmp_path, monkeypatch):
    mod = _checker()
    pkg = tmp_path / "reasonmaxxer"
    (pkg / "core").mkdir(parents=True)
    (pkg / "stages").mkdir()
    (pkg / "core" / "a.py").write_text("from ..stages.b import run\n")  # core -> stages: upward
    (pkg / "stages" / "b.py").write_text("from ..core.a import _helper\n\ndef run(): pass\n")  # private + cycle
    monkeypatch.setattr(mod, "PKG", pkg)
    found = "\n".join(mod.check())
    assert "core.a (layer 1) imports stages.b (layer 5), an upper layer" in found
    assert "private name _helper imported from core.a" in found
    assert "import cycle: core.a -> stages.b -> core.a" in found


def test_no_module_over_500_lines_and_no_function_over_80():
    import ast

    too_long = []
    for p in sorted((ROOT / "reasonmaxxer").rglob("*.py")):
        src = p.read_text()
        if src.count("\n") > 500:
            too_long.append(f"{p.relative_to(ROOT)}: {src.count(chr(10))} lines")
        for f in ast.walk(ast.parse(src)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 80:
                too_long.append(f"{p.relative_to(ROOT)}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines")
    assert too_long == []
