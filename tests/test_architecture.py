"""The import rules of docs/design.md ("Architecture"), checked on the source (AST, every import, including the
ones inside functions) and in a fresh interpreter (what an import really loads):

- core/base/ is the bottom: it imports nothing else of dxrag, and neither torch nor pandas / pyarrow / scipy at
  import time (the table writer imports pandas / pyarrow when called);
- analysis/ imports nothing of core outside core/base/;
- core's library (everything but the application layer: pipeline, stages, sweep, cli) never imports analysis/;
- the library never imports the run config (core/config.py, the YAML mapper of the application): each component's
  settings dataclass lives beside the component, and only the application and the mapper itself name the config;
- importing a library module loads no pandas, scipy or pyarrow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "dxrag.core", "analysis": "dxrag.analysis"}
APPLICATION = {"dxrag.core.pipeline", "dxrag.core.stages", "dxrag.core.sweep", "dxrag.core.cli"}
HEAVY = ("pandas", "scipy", "pyarrow")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module, at import time) of every import in one module; imports under `if TYPE_CHECKING:`
    and inside functions do not run at import time."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.Try) for n in s.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` may name a module: count it as one
            names = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES]
            out += [(node.lineno, m, id(node) in top) for m in names or [module]]
    return out


def _violations(rule) -> list[str]:
    return [f"{MODULES[name].relative_to(ROOT)}:{line}: imports {module}"
            for name in MODULES for line, module, top in _imports(name, MODULES[name]) if rule(name, module, top)]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_scan_sees_the_known_imports():
    """The scanner resolves relative imports (a rule that checks nothing would pass every test below)."""
    found = {m for _, m, _ in _imports("dxrag.core.stages", MODULES["dxrag.core.stages"])}
    assert {"dxrag.core.base.answers", "dxrag.analysis.report", "dxrag.core.tasks"} <= found
    found = {m for _, m, _ in _imports("dxrag.analysis.tables", MODULES["dxrag.analysis.tables"])}
    assert {"dxrag.core.base.tables", "dxrag.core.base.answers", "pandas"} <= found


def test_base_is_the_bottom():
    assert _violations(lambda name, module, top: _within(name, "dxrag.core.base") and (
        _within(module, "dxrag") and not _within(module, "dxrag.core.base")
        or top and module.split(".")[0] in ("torch",) + HEAVY)) == []


def test_analysis_uses_only_the_contracts_of_core():
    assert _violations(lambda name, module, _: _within(name, "dxrag.analysis") and _within(module, "dxrag.core")
                       and not _within(module, "dxrag.core.base")) == []


def test_core_library_never_imports_the_analysis():
    assert _violations(lambda name, module, _: _within(name, "dxrag.core") and name not in APPLICATION
                       and _within(module, "dxrag.analysis")) == []


def test_the_library_never_imports_the_run_config():
    """Settings live beside their components (retrieval, reader, data, training): core/retrieval, core/reader,
    core/data, core/training and every other library module build on them, never on the application's mapper."""
    found = {m for _, m, _ in _imports("dxrag.core.pipeline", MODULES["dxrag.core.pipeline"])}
    assert "dxrag.core.config" in found  # the scan sees the application's imports of the config
    assert _violations(lambda name, module, _: _within(name, "dxrag.core") and name not in APPLICATION
                       and name != "dxrag.core.config" and _within(module, "dxrag.core.config")) == []


@pytest.mark.parametrize("module", ["dxrag.core.reader", "dxrag.core.reader.model", "dxrag.core.tasks",
                                    "dxrag.core.predictions", "dxrag.core.training.distill",
                                    "dxrag.core.retrieval.retriever", "dxrag.core.data.synth", "dxrag.core.base"])
def test_a_library_import_loads_no_table_stack(module):
    code = (f"import sys, {module}\n"
            f"import dxrag.core.base.tables, dxrag.core.base.fusion, dxrag.core.base.dataset\n"
            f"bad = sorted({{m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m.startswith('dxrag.analysis')}})\n"
            f"print(bad)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import {module} loaded {done.stdout.strip()}"


def test_base_loads_no_torch():
    code = ("import sys, pkgutil, importlib, dxrag.core.base as b\n"
            "for m in pkgutil.iter_modules(b.__path__): importlib.import_module(f'dxrag.core.base.{m.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pandas', 'pyarrow', 'scipy')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
