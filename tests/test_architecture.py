"""The house rules, read from the code's own imports: layers point one way, no circles, no private names
borrowed, no terminal library below the CLI/UI, no torch in the runtime.

Every `import` counts, including those inside functions (a function-level import is still a dependency).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tsrt"

#: Folder (or top-level module) -> layer; a module may import its own folder and strictly lower layers.
LAYERS: dict[str, int] = {
    "errors": 0, "config": 0, "progress": 0, "version": 0,  # what everything may use
    "models": 1,  # recorded plans, the registry, the store, downloads
    "engines": 2,  # ONNX Runtime providers, OpenVINO, TensorRT engines
    "pipeline": 3,  # the nnU-Net runtime, one module per stage
    "outputs": 4,  # statistics, preview, DICOM, radiomics, per-class files
    "api": 5, "totalseg": 5,  # one exported model / one TotalSegmentator task
    "companions": 6, "demo": 6, "reports": 6,  # phase, modality, Evans index; the demo job; clinical reports
    "quantization": 6,  # int8 graphs: calibrated on scans by the pipeline, gated by fp32-vs-int8 segmentations
    "cohort": 7,  # many cases, here or on Ray
    "ui": 8,  # the web page
    "cli": 9,  # the command line (it starts the UI)
}
#: Only the top of the house draws on a terminal.
TERMINAL_LIBRARIES = ("rich",)
TERMINAL_LAYERS = ("cli", "ui")
FORBIDDEN_IN_RUNTIME = ("torch", "nnunetv2", "totalsegmentator")


@dataclass(frozen=True)
class ImportEdge:
    source: str  # importing module, dotted
    target: str  # imported tsrt module, dotted (or an external top-level name)
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tsrt_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[ImportEdge]:
    """Every import in the file, resolved to a module where it names a tsrt module."""
    source = module_name(path)
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            edges += [ImportEdge(source, alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = source if path.name == "__init__.py" else source.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    edges.append(ImportEdge(source, submodule, (), node.lineno))
                else:
                    edges.append(ImportEdge(source, base, (alias.name,), node.lineno))
    return edges


def all_edges() -> list[ImportEdge]:
    modules = tsrt_modules()
    return [edge for path in modules.values() for edge in imports_of(path, modules)]


def room(module: str) -> str | None:
    """The folder (or top-level module) a tsrt module lives in; None for the package facade `tsrt`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(edges: list[ImportEdge]) -> list[str]:
    problems = []
    for edge in edges:
        if not edge.target.startswith("tsrt.") or room(edge.source) is None:
            continue  # external, or the facade tsrt/__init__.py (which only re-exports)
        here, there = room(edge.source), room(edge.target)
        if here == there:
            continue
        if here not in LAYERS or there not in LAYERS:
            problems.append(f"{edge.source}:{edge.line} -> {edge.target}: {here or there} has no layer in LAYERS")
        elif LAYERS[there] >= LAYERS[here]:
            direction = "up" if LAYERS[there] > LAYERS[here] else "sideways"
            problems.append(f"{edge.source}:{edge.line} imports {edge.target} ({direction}: {here} -> {there})")
    return problems


def cycles(edges: list[ImportEdge]) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), each a circle of imports."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.target.startswith("tsrt.") or edge.target == "tsrt":
            graph.setdefault(edge.source, set()).add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_facades(group: list[str]) -> bool:
    """A package __init__ that re-exports its own submodule (tsrt.cli -> tsrt.cli.root) is not a circle."""
    return len(group) == 2 and group[1].startswith(group[0] + ".")


# --------------------------------------------------------------------------------------------- rules


def test_imports_point_down_the_layers() -> None:
    assert layer_violations(all_edges()) == []


def test_no_import_circles() -> None:
    circles = [group for group in cycles(all_edges()) if not package_facades(group)]
    assert circles == []


def test_no_private_name_is_imported_from_another_module() -> None:
    borrowed = [
        f"{edge.source}:{edge.line} takes {name} from {edge.target}"
        for edge in all_edges()
        for name in edge.names
        if edge.target.startswith("tsrt") and name.startswith("_") and not name.startswith("__")
    ]
    assert borrowed == []


def test_terminal_libraries_only_in_cli_and_ui() -> None:
    below = [
        f"{edge.source}:{edge.line} imports {edge.target}"
        for edge in all_edges()
        if edge.target.split(".")[0] in TERMINAL_LIBRARIES and room(edge.source) not in TERMINAL_LAYERS
    ]
    assert below == []


def test_runtime_never_imports_torch_or_the_oracles() -> None:
    heavy = [
        f"{edge.source}:{edge.line} imports {edge.target}"
        for edge in all_edges()
        if edge.target.split(".")[0] in FORBIDDEN_IN_RUNTIME
    ]
    assert heavy == []


# --------------------------------------------------------------------------------------------- the checks can fail


def _write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_checks_catch_an_upward_import_a_circle_and_a_borrowed_private_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "tsrt"
    _write(package, "__init__.py", "")
    _write(package, "pipeline/__init__.py", "")
    _write(package, "pipeline/read.py", "from tsrt.cli.root import main\n")  # up: pipeline -> cli
    _write(package, "cli/__init__.py", "")
    _write(package, "cli/root.py", "from tsrt.cli.models import _helper\ndef main(): pass\n")
    _write(package, "cli/models.py", "from tsrt.cli import root\ndef _helper(): pass\n")  # circle with root
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    edges = all_edges()
    assert layer_violations(edges) == ["tsrt.pipeline.read:1 imports tsrt.cli.root (up: pipeline -> cli)"]
    assert [group for group in cycles(edges) if not package_facades(group)] == [["tsrt.cli.models", "tsrt.cli.root"]]
    assert [name for edge in edges for name in edge.names if name.startswith("_")] == ["_helper"]
