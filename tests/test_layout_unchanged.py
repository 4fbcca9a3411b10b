"""The layout change (issue 16) moved code, not behaviour: the same commands write the same files.

Each run is done twice on this machine: by the code as it was before the move (commit BEFORE_LAYOUT,
taken from git history) and by the code in this checkout. Every file must be there in both trees,
byte for byte equal, except those whose change was intended (listed with the reason).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The last commit before the code moved into subpackages.
BEFORE_LAYOUT = "755d699"
#: Files that were meant to change, and why.
INTENDED_CHANGES = {
    "preview": "the preview PNG uses the label table's palette (one palette for every picture); issue 18: at least "
               "1200 px wide, a legend with the structure names, the window chosen by modality",
}
#: Files the code after the move writes that the code before did not, and why.
INTENDED_NEW_FILES = {
    "seg.tsrt.json": "the run manifest beside -o seg.nii.gz (issue 17): what made the result; never a *.nii.gz",
}
CT = REPO.parent / "shared" / "data" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def code_before(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tsrt` package as it was at BEFORE_LAYOUT, unpacked from git (skipped without the history)."""
    folder = tmp_path_factory.mktemp("before_layout")
    archive = folder / "tsrt.tar"
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), BEFORE_LAYOUT, "tsrt"],
            check=True, capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history with commit {BEFORE_LAYOUT} (a full clone of the repository)")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _run(code_root: Path | None, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`tsrt ARGS` with the package from `code_root` (None: this checkout)."""
    root = str(code_root or REPO)
    program = f"import sys; sys.path.insert(0, {root!r}); from tsrt.cli import main; sys.argv[0] = 'tsrt'; main()"
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
        env={**os.environ, "PYTHONUTF8": "1", **env}, cwd=code_root or REPO,
    )


def _digests(tree: Path) -> dict[str, str]:
    return {
        str(path.relative_to(tree)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(tree.rglob("*")) if path.is_file()
    }


def _intended(name: str) -> bool:
    return any(Path(name).name.startswith(prefix) for prefix in INTENDED_CHANGES)


def _assert_same_files(before: Path, after: Path) -> None:
    old, new = _digests(before), _digests(after)
    added = sorted(set(new) - set(old))
    assert [Path(name).name for name in added] == sorted(INTENDED_NEW_FILES), f"new files: {added}"
    new = {name: digest for name, digest in new.items() if name not in added}
    assert sorted(old) == sorted(new), "the runs wrote different files"
    changed = sorted(name for name in old if old[name] != new[name] and not _intended(name))
    assert changed == [], f"files whose bytes changed: {changed}"


@pytest.mark.skipif(not CT.is_file(), reason="needs ../shared/data/example_ct_sm.nii.gz (TotalSegmentator's test CT)")
def test_model_and_task_runs_write_the_same_files(code_before: Path, totalseg_home: Path, tmp_path: Path) -> None:
    # One store, imported by this checkout (the store's format did not change); both codes read it.
    home = tmp_path / "tsrt_home"
    imported = _run(None, ["models", "import", "total", "--fast", "--totalseg-home", str(totalseg_home), "-q"],
                    {"TSRT_HOME": str(home)})
    assert imported.returncode == 0, imported.stderr
    demo_model = REPO / "tsrt" / "demo" / "model"
    runs = {
        "model": ["segment", str(CT), "-o", "{out}/seg.nii.gz", "--model", str(demo_model), "-q", "--provider", "cpu"],
        "task": ["-i", str(CT), "-o", "{out}/seg.nii.gz", "--fast", "--ml", "--statistics", "-p", "-q", "-d", "cpu"],
    }
    for label, args in runs.items():
        for name, code in (("before", code_before), ("after", None)):
            out = tmp_path / name / label
            out.mkdir(parents=True)
            result = _run(code, [a.replace("{out}", str(out)) for a in args], {"TSRT_HOME": str(home)})
            assert result.returncode == 0, (label, name, result.stderr)
        _assert_same_files(tmp_path / "before" / label, tmp_path / "after" / label)
    shutil.rmtree(home, ignore_errors=True)
