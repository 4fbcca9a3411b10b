"""Every bracket the command line's help and messages contain shows as written.

Typer renders help through rich, which takes `[ui]` in "pip install 'tsrt[ui]'" for a style tag and
drops it ("needs tsrt"). The bracketed words are read from the source (each command's docstring and
its options' help= / metavar= strings), then `--help` of the root, every group and every command
must show each of them verbatim: a command's own help all of them, its group's listing those of
its first docstring line.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from io import StringIO

import typer
from typer.testing import CliRunner

from tsrt.cli.root import app, cohort_table
from tsrt.cohort.cases import CaseRecord, CohortSummary

#: A bracketed word: `tsrt[ui]`, `[PATH]`, `[auto|HOST:PORT]`.
BRACKETED = re.compile(r"[\w.-]*\[[^\[\]\n]+\]")
#: Wide enough that no help line wraps inside a bracketed word.
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def commands(group: typer.Typer, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Callable]]:
    """(command path, the function it runs) for every command under `group`."""
    for info in group.registered_commands:
        yield (*path, info.name or info.callback.__name__.lower().replace("_", "-")), info.callback
    for sub in group.registered_groups:
        yield from commands(sub.typer_instance, (*path, sub.name))


def groups(group: typer.Typer, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], typer.Typer]]:
    yield path, group
    for sub in group.registered_groups:
        yield from groups(sub.typer_instance, (*path, sub.name))


def written_brackets(function: Callable) -> tuple[set[str], set[str]]:
    """Bracketed words in the source of a command: (all of them, those of its docstring's first line)."""
    definition = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    docstring = ast.get_docstring(definition) or ""
    texts = [docstring] + [
        keyword.value.value
        for node in ast.walk(definition)
        for keyword in getattr(node, "keywords", ())
        if keyword.arg in ("help", "metavar") and isinstance(keyword.value, ast.Constant)
        and isinstance(keyword.value.value, str)
    ]
    first_line = docstring.splitlines()[0] if docstring else ""
    return {word for text in texts for word in BRACKETED.findall(text)}, set(BRACKETED.findall(first_line))


def help_output(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, (path, result.output)
    return _ANSI.sub("", result.output)


def test_help_of_every_command_shows_its_brackets_as_written() -> None:
    listed: dict[tuple[str, ...], set[str]] = {}
    checked = 0
    for path, function in commands(app):
        own, short = written_brackets(function)
        listed.setdefault(path[:-1], set()).update(short)
        output = help_output(path)
        missing = sorted(word for word in own if word not in output)
        assert not missing, f"tsrt {' '.join(path)} --help drops the brackets of {missing}:\n{output}"
        checked += len(own)
    for path, _ in groups(app):
        output = help_output(path)
        missing = sorted(word for word in listed.get(path, ()) if word not in output)
        assert not missing, f"tsrt {' '.join(path)} --help lists {missing} without their brackets:\n{output}"
    assert checked >= 6, "the source has tsrt[ui], tsrt[dicom], [PATH], ...: the scan found too few"
    assert "(needs tsrt[ui])" in help_output(())


def test_cohort_table_shows_case_names_and_reasons_as_written() -> None:
    from rich.console import Console

    record = CaseRecord("case[ui]", "failed", reason="needs pip install 'tsrt[dicom]'")
    console = Console(file=StringIO(), width=200, color_system=None)
    console.print(cohort_table(CohortSummary(records=[record])))
    text = console.file.getvalue()
    assert "case[ui]" in text and "tsrt[dicom]" in text
