"""The page imports what it loads on demand once, in a fixed order, before a script run uses it.

Streamlit runs browser sessions, and a session's old and new run (a scan uploaded while the page still loads), in
parallel threads; two threads importing the same packages in different orders met each other's half-initialised
modules and the page showed "KeyError: 'tsrt.totalseg'" (seen in the two-worker test run). The browser tests upload
right after the page opens, as a hurried user does; these tests keep the list of modules complete.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tsrt.ui

UI_FOLDER = Path(tsrt.ui.__file__).parent


def _imported_on_demand() -> set[str]:
    """tsrt modules that tsrt/ui's modules import inside functions (not at module level)."""
    found = set()
    for path in UI_FOLDER.glob("*.py"):
        tree = ast.parse(path.read_text())
        for function in [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tsrt."):
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names if alias.name.startswith("tsrt."))
    return found


def test_every_module_the_page_imports_on_demand_is_imported_up_front():
    from tsrt.ui.runner import PAGE_MODULES

    on_demand = _imported_on_demand() - {"tsrt.errors"}  # imported by every page module at load already
    assert on_demand, "the scan found no imports inside functions: the check itself is broken"
    assert sorted(on_demand - set(PAGE_MODULES)) == []


def test_the_page_modules_import_once_in_a_fresh_process():
    """In a fresh interpreter (nothing imported yet), every listed module is in sys.modules afterwards."""
    script = (
        "import sys\n"
        "from tsrt.ui.runner import PAGE_MODULES, import_page_modules\n"
        "import_page_modules()\n"
        "print([name for name in PAGE_MODULES if name not in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
