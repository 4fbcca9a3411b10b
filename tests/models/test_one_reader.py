"""One checkpoint reader everywhere: no tsrt code unpickles a checkpoint it did not write with torch.load.

`torch.load(..., weights_only=False)` (or without weights_only, which meant False before torch 2.6) runs
whatever a tampered checkpoint's pickle asks for. tsrt reads every checkpoint it did not write through
tsrt.models.checkpoint's restricted reader: the torch-free import and export, the torch exporter and the
test fixtures' loaders. This reads the code of tsrt/, export/ and benchmarks/ (no torch needed) and fails
on any other torch.load call; the only ones allowed load checkpoints tsrt's own training run wrote.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("tsrt", "export", "benchmarks")
#: (file, function) -> why its torch.load is safe: the file was written by tsrt itself.
ALLOWED = {
    ("export/train_demo.py", "train"): "resumes the checkpoint this script's own nnU-Net training run wrote",
    ("export/train_demo.py", "export_result_folder"): "strips the optimizer from that run's own checkpoint",
}


def unsafe_torch_loads(source: str) -> list[tuple[int, str]]:
    """(line, enclosing function) of each torch.load call that may unpickle arbitrary objects."""
    tree = ast.parse(source)
    load_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for alias in node.names
        if alias.name == "load"
    }
    found = []
    for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            is_torch_load = (
                isinstance(func, ast.Attribute) and func.attr == "load"
                and isinstance(func.value, ast.Name) and func.value.id == "torch"
            ) or (isinstance(func, ast.Name) and func.id in load_names)
            if not is_torch_load:
                continue
            weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, getattr(function, "name", "<module>")))
    # A call inside a function is also inside the module: keep the innermost name per line.
    innermost: dict[int, str] = {}
    for line, name in found:
        if line not in innermost or innermost[line] == "<module>":
            innermost[line] = name
    return sorted(innermost.items())


def test_the_detector_finds_unsafe_calls() -> None:
    """The scan would catch the calls this change removed (so the repository test below can fail)."""
    source = (
        "import torch\nfrom torch import load as tl\n"
        "def a(p):\n    return torch.load(p, map_location='cpu', weights_only=False)\n"
        "def b(p):\n    return torch.load(p)\n"
        "def c(p):\n    return tl(p, weights_only=False)\n"
        "def d(p):\n    return torch.load(p, weights_only=True)\n"
    )
    assert unsafe_torch_loads(source) == [(4, "a"), (6, "b"), (8, "c")]


def test_no_torch_load_of_files_tsrt_did_not_write() -> None:
    offending = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for line, function in unsafe_torch_loads(path.read_text(encoding="utf-8")):
                if (relative, function) not in ALLOWED:
                    offending.append(f"{relative}:{line} in {function}")
    assert not offending, (
        "torch.load without weights_only=True on a checkpoint tsrt did not write; read it with "
        f"tsrt.models.checkpoint.read_checkpoint instead: {offending}"
    )
