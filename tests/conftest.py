"""Session-wide fixtures: real nnU-Net result folders and TotalSegmentator homes built once per run.

Folders come from `tsrt_export.fixtures` (nnU-Net's own trainer classes, seeded weights), so every
test that needs a trained model gets a genuine one without downloads. They are tiny (3 stages,
4/8/16 features, 32^3 patches) so building all of them takes a few seconds. Tests must treat them
as read-only: copy a folder (shutil.copytree) before changing it.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
#: The browser tests' `tsrt ui` servers and Chromium page (tests/chromium_page.py): fixtures shared across files.
pytest_plugins = ("chromium_page",)


#: Fixtures that build real nnU-Net result folders with torch (the oracle toolchain).
ORACLE_FIXTURES = frozenset({
    "fixture_results_root", "tiny_result_folder", "tiny_resenc_result_folder", "tiny_2d_result_folder",
    "tiny_regions_result_folder", "totalseg_home", "demo_checkpoint",
})
#: An import (or importorskip) of one of these runs an oracle (nnU-Net, official TotalSegmentator) or torch.
ORACLE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:nnunetv2|totalsegmentator|totalseg_official|tsrt_export|torch)\b"
    r"|importorskip\(\s*[\"'](?:nnunetv2|totalsegmentator|torch)",
    re.M,
)


#: Test files that take half a minute or more (`make test` prints the slowest tests), longest first. They run before
#: every other file, so that with two workers (`make test`: -n 2 --dist loadfile) neither is left running a long
#: file alone at the end: longest jobs first is the classic schedule for two machines.
LONG_FILES = (
    "tests/companions/test_evans_index.py", "tests/totalseg/test_totalseg_parity.py", "tests/reports/test_body.py",
    "tests/ui/test_reports_browser.py", "tests/reports/test_pulmonary.py", "tests/reports/test_aorta_e2e.py",
    "tests/benchmarks/test_benchmarks.py", "tests/models/test_torch_free_import.py",
    "tests/totalseg/test_output_naming.py", "tests/companions/test_phase.py", "tests/cohort/test_reruns.py",
    "tests/install/test_runtime_install.py", "tests/cohort/test_cluster.py", "tests/reports/test_spine.py",
    "tests/reports/test_aorta.py", "tests/outputs/test_write_dicom.py",
)


def _module_level(source: str) -> str:
    """The lines of a module outside function bodies (imports there apply to every test in it)."""
    return "\n".join(line for line in source.splitlines() if not line[:1].isspace())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `oracle` every test that needs torch, nnU-Net or official TotalSegmentator (`make test-fast` skips them);
    put the LONG_FILES first."""
    module_oracle: dict[Path, bool] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in module_oracle:
            module_oracle[path] = bool(ORACLE_IMPORT.search(_module_level(path.read_text(errors="replace"))))
        function = getattr(item, "function", None)
        try:
            body = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            body = ""
        if (
            module_oracle[path]
            or ORACLE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
            or ORACLE_IMPORT.search(body)
        ):
            item.add_marker(pytest.mark.oracle)
    first = {name: rank for rank, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(LONG_FILES)))  # stable: order kept within


def _fixtures():
    """Import lazily: the generator needs the export extra (torch, nnunetv2), runtime-only tests do not."""
    pytest.importorskip("nnunetv2", reason="the fixture generator needs the export extra (torch, nnunetv2)")
    from tsrt_export import fixtures

    return fixtures


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (example CT/MR, DICOM, reference segmentations), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real example data not found at {SHARED_DATA} (it sits next to the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixture_results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One nnUNet_results folder shared by the session's result-folder fixtures."""
    return tmp_path_factory.mktemp("nnUNet_results")


@pytest.fixture(scope="session")
def tiny_result_folder(fixture_results_root: Path) -> Path:
    """3d_fullres PlainConvUNet, 1 CT channel, background + 3 classes, fold 0, mirroring (0, 1, 2)."""
    return _fixtures().write_result_folder(fixture_results_root, dataset_id=801, dataset_name="TinyPlain")


@pytest.fixture(scope="session")
def tiny_resenc_result_folder(fixture_results_root: Path) -> Path:
    """3d_fullres ResidualEncoderUNet, otherwise like tiny_result_folder."""
    return _fixtures().write_result_folder(
        fixture_results_root, dataset_id=802, dataset_name="TinyResEnc", architecture="ResidualEncoderUNet"
    )


@pytest.fixture(scope="session")
def tiny_2d_result_folder(fixture_results_root: Path) -> Path:
    """2d PlainConvUNet on 64x64 patches (mirroring (0, 1))."""
    return _fixtures().write_result_folder(
        fixture_results_root, dataset_id=803, dataset_name="Tiny2d", configuration="2d", patch_size=(64, 64)
    )


@pytest.fixture(scope="session")
def tiny_regions_result_folder(fixture_results_root: Path) -> Path:
    """Region-based (sigmoid) 3d model: regions whole=[1,2,3], core=[2,3], enhancing=3."""
    return _fixtures().write_result_folder(
        fixture_results_root,
        dataset_id=804,
        dataset_name="TinyRegions",
        labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        regions_class_order=(1, 2, 3),
    )


@pytest.fixture(scope="session")
def totalseg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TOTALSEG_HOME_DIR with every task key of tsrt_export.fixtures.TOTALSEG_TASKS (small nets).

    Run TotalSegmentator against it in a subprocess (TOTALSEG_HOME_DIR=<a copy of it>, no
    TOTALSEG_WEIGHTS_PATH): importing totalsegmentator patches nnU-Net's predictor process-wide.
    """
    fixtures = _fixtures()
    return fixtures.write_totalseg_home(tmp_path_factory.mktemp("totalseg_home"), tuple(fixtures.TOTALSEG_TASKS))


@pytest.fixture(scope="session")
def small_task_store(totalseg_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TSRT_HOME with `total --fast`, `total --fastest` and `body --fast` imported from totalseg_home:
    the cheap models (3 and 6 mm) for tests that run real tasks end to end. Read-only for tests."""
    from typer.testing import CliRunner

    from tsrt.cli.models import models_app

    home = tmp_path_factory.mktemp("small_task_store")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TSRT_HOME", str(home))
        for task in (["total", "--fast"], ["total", "--fastest"], ["body", "--fast"]):
            result = CliRunner().invoke(models_app, ["import", *task, "--totalseg-home", str(totalseg_home), "-q"])
            assert result.exit_code == 0, (task, result.output, result.exception)
    return home


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The bundled trained demo checkpoint, or skip while it has not been trained/committed yet."""
    fixtures = _fixtures()
    path = fixtures.find_demo_checkpoint(REPO_ROOT)
    if path is None:
        pytest.skip(f"no demo checkpoint matches {fixtures.DEMO_CHECKPOINT_GLOB} yet (the demo model is not trained)")
    return path


class WeightsServer:
    """A real HTTP server on 127.0.0.1 serving one release zip like GitHub and TotalSegmentator's license server.

    Routes by the first path segment: /good, /truncated, /flaky (breaks once, then serves Range requests),
    /license (accepts `license_key` only), else 404. `requests` records what was asked.
    """

    def __init__(self, payload: bytes, license_key: str | None = None) -> None:
        self.payload = payload
        self.license_key = license_key
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers or JSON body)
        self.flaky_broken = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(("GET", self.path, dict(self.headers)))
                kind = self.path.split("/")[1]
                if kind == "good":
                    self._send_bytes(server.payload)
                elif kind == "truncated":
                    self._send_bytes(server.payload[: len(server.payload) // 2])
                elif kind == "flaky" and not server.flaky_broken and "Range" not in self.headers:
                    server.flaky_broken = True  # announce everything, send a third, hang up
                    self.send_response(200)
                    self.send_header("Content-Type", "application/zip")
                    self.send_header("Content-Length", str(len(server.payload)))
                    self.end_headers()
                    self.wfile.write(server.payload[: len(server.payload) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                elif kind == "flaky":
                    self._send_bytes(server.payload)
                else:
                    self._send_json(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append(("POST", self.path, body))
                accepted = server.license_key is not None and body.get("license_number") == server.license_key
                if self.path == "/license/is_valid_license_number":
                    self._send_json(200, {"status": "valid_license" if accepted else "invalid_license"})
                elif self.path == "/license/download_weights" and accepted:
                    self._send_bytes(server.payload)
                elif self.path == "/license/download_weights":
                    self._send_json(403, {"status": "invalid_license"})
                else:
                    self._send_json(404, {"detail": "Not Found"})

            def _send_bytes(self, data: bytes) -> None:
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(match.group(1)) if match else 0
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if match else 200)
                self.send_header("Content-Type", "application/zip")
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def _send_json(self, status: int, answer: dict) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
