"""Cohorts on Ray (tsrt.cohort.ray): a real two-node cluster on loopback, the bundled demo model, small phantoms.

The cluster is two `ray start --block` processes (a head and a node joining it, one CPU each,
unique ports, a private temp dir); the test stops them by pid, also when a test fails. The masks
of every case must equal those of the single-process path (`tsrt.api.segment`) voxel for voxel.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsrt.demo.phantom import make_phantom
from tsrt.models.plan import read_plan

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "tsrt" / "demo" / "model"
GOOD_CASES = [f"case{index}" for index in range(5)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node would otherwise take from Ray's fixed defaults (two nodes share this machine)."""
    names = (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port",
    )
    return [f"--{name}={_free_port()}" for name in names]


#: The cluster's own token (Ray's token authentication), not the machine's ~/.ray/auth_token.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _start_node(args: list[str], log: Path, tsrt_home: Path) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats", "--block", *_node_ports()]
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [str(ray), "start", *args, *common], stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, **RAY_AUTH, "TSRT_HOME": str(tsrt_home)},  # the workers' model store
        )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM lets `ray start --block` stop its node's processes; SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
while len([node for node in ray.nodes() if node["Alive"]]) < int(sys.argv[2]):
    time.sleep(0.5)
"""


def _wait_for_nodes(address: str, count: int, logs: list[Path]) -> None:
    """A driver process (Ray reads the token settings at import) polls until `count` nodes are alive."""
    try:
        _python(_WAIT_FOR_NODES, address, str(count), timeout=180, check=True)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as err:
        tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)
        raise RuntimeError(f"the Ray cluster at {address} did not get {count} nodes ({err}):\n{tails}") from None


def _python(
    script: str, *args: str, timeout: float = 900, check: bool = False, **env: str
) -> subprocess.CompletedProcess:
    """Run Python code as a separate driver process with the cluster's token settings."""
    env = {**os.environ, **RAY_AUTH, "PYTHONUTF8": "1", "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
        env=env, timeout=timeout, check=check,
    )


@pytest.fixture(scope="module")
def cluster_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TSRT_HOME of the cluster's nodes (empty until a test imports models into it)."""
    return tmp_path_factory.mktemp("cluster_tsrt_home")


@pytest.fixture(scope="module")
def ray_cluster(cluster_home: Path):
    """HOST:PORT of a running two-node Ray cluster on 127.0.0.1 (1 CPU per node)."""
    pytest.importorskip("ray", reason="the cluster extra is not installed: pip install 'tsrt[cluster]'")
    temp = Path(tempfile.mkdtemp(prefix="tsrt-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    address = f"127.0.0.1:{_free_port()}"
    processes: list[subprocess.Popen] = []
    logs = [temp / "head.log", temp / "node.log"]
    try:
        processes.append(_start_node(
            ["--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp}", "--include-dashboard=false",
             f"--ray-client-server-port={_free_port()}"],
            logs[0], cluster_home,
        ))
        _wait_for_nodes(address, 1, logs[:1])
        processes.append(_start_node([f"--address={address}"], logs[1], cluster_home))
        _wait_for_nodes(address, 2, logs)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """cases/: five phantoms plus one truncated file; and each phantom's single-process label map."""
    from tsrt.api import segment

    root = tmp_path_factory.mktemp("cohort")
    cases = root / "cases"
    cases.mkdir()
    references = {}
    for index, name in enumerate(GOOD_CASES):
        phantom = make_phantom(shape=(44, 40, 32), spacing=(3.0, 3.0, 3.0), seed=index, vary=True)
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), cases / f"{name}.nii.gz")
        run = segment(cases / f"{name}.nii.gz", root / "single" / f"{name}.nii.gz", DEMO_MODEL, progress=False)
        references[name] = run.labels
    whole = (cases / "case0.nii.gz").read_bytes()
    (cases / "corrupt.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped halfway
    return cases, references


def _assert_same_as_single_process(out: Path, references: dict[str, np.ndarray], single: Path) -> None:
    for name, labels in references.items():
        written = nib.load(out / name / f"{name}.nii.gz")
        expected = nib.load(single / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
        assert written.header.get_data_dtype() == expected.header.get_data_dtype()
        np.testing.assert_array_equal(written.affine, expected.affine)
        assert labels.any()


def _leftovers(out: Path) -> list[Path]:
    return [path for path in out.rglob("*") if "tsrt-partial" in path.name]


def _tsrt(*args: str, **env: str) -> subprocess.CompletedProcess:
    return _python("from tsrt.cli.root import main; main()", *args, **env)


@pytest.mark.slow
def test_two_node_cluster_matches_one_process_reports_the_corrupt_case_and_resumes(
    ray_cluster: str, cohort: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    cases, references = cohort
    out = tmp_path / "out"
    run = _tsrt("segment", str(cases), "-o", str(out), "--model", str(DEMO_MODEL), "--ray", ray_cluster)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "tsrt: error: 1 of 6 cases failed" in run.stderr
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"], summary["workers"]) == (5, 0, 1, 2)
    by_name = {case["name"]: case for case in summary["cases"]}
    assert by_name["corrupt"]["status"] == "failed" and "corrupt.nii.gz" in by_name["corrupt"]["reason"]
    assert "corrupt" in run.stdout and "failed" in run.stdout  # the printed table
    done = [by_name[name] for name in GOOD_CASES]
    assert all(case["status"] == "done" and case["seconds"] > 0 and case["peak_memory_mb"] > 0 for case in done)
    assert len({case["node"] for case in done}) == 2  # both nodes segmented
    _assert_same_as_single_process(out, references, cases.parent / "single")
    assert not _leftovers(out) and not (out / "corrupt").exists()
    graph = read_plan(DEMO_MODEL / "fold_0.plan.json").graph_sha256
    for name in GOOD_CASES:  # each Ray case's run manifest, written by its worker into the case folder
        manifest = json.loads((out / name / f"{name}.tsrt.json").read_text())
        assert manifest["request"] == summary["request"] and manifest["request"]["kind"] == "model"
        assert [entry["sha256"] for entry in manifest["request"]["graphs"]] == [graph]
        assert manifest["input"]["sha256"] == hashlib.sha256((cases / f"{name}.nii.gz").read_bytes()).hexdigest()
        assert (manifest["provider"], manifest["outputs"]) == ("cpu", [f"{name}.nii.gz"])
        assert manifest["peak_memory_mb"] == pytest.approx(by_name[name]["peak_memory_mb"], abs=0.051)  # rounded

    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.parent != out}
    again = _tsrt("segment", str(cases), "-o", str(out), "--model", str(DEMO_MODEL), "--ray", ray_cluster)
    assert again.returncode != 0, again.stdout + again.stderr
    rerun = json.loads((out / "cohort_summary.json").read_text())
    assert (rerun["done"], rerun["skipped"], rerun["failed"]) == (0, 5, 1)  # only the corrupt case is tried again
    states = {case["name"]: case["manifest"] for case in rerun["cases"]}
    assert states == {**{name: "matched" for name in GOOD_CASES}, "corrupt": "missing"}
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.parent != out} == written


#: A driver that SIGKILLs a worker process in the middle of a case: after the first case finishes,
#: it waits until both workers are writing a case (two staging folders) and kills the one that
#: finished first. Prints the run summary and the killed pid as JSON.
_KILL_A_WORKER = """
import json, os, signal, sys, time
from pathlib import Path
from tsrt.api import ModelJob
from tsrt.cohort.cases import find_cases
from tsrt.cohort.run import run_job

cases, out, model, address = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
good = [case for case in find_cases(Path(cases), out, multilabel=True) if case.name != "corrupt"]
killed = []

def kill_a_busy_worker(record):
    if killed:
        return
    deadline = time.monotonic() + 60
    while len(list(out.glob(".tsrt-partial.*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit("the workers did not start their next cases")
        time.sleep(0.01)
    pid = int(record.worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    killed.append(record.worker)

summary = run_job(good, ModelJob(model), ray=address, progress=False, on_case=kill_a_busy_worker)
print(json.dumps({"killed": killed, **summary.to_json()}))
"""


@pytest.mark.slow
def test_a_worker_killed_mid_case_is_retried_and_leaves_no_partial_output(
    ray_cluster: str, cohort: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    cases, references = cohort
    out = tmp_path / "out"
    run = _python(_KILL_A_WORKER, str(cases), str(out), str(DEMO_MODEL), ray_cluster)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(summary["killed"]) == 1
    assert [case["name"] for case in summary["cases"] if case["status"] == "done"] == GOOD_CASES
    retried = [case for case in summary["cases"] if case["attempts"] > 1]
    assert retried and all(case["worker"] != summary["killed"][0] for case in retried)
    assert not _leftovers(out)
    _assert_same_as_single_process(out, references, cases.parent / "single")


#: The single-process path: tsrt.totalseg.segment on each image, one process.
_SEGMENT_EACH = """
import sys
from tsrt.totalseg.task import segment
for image, output in zip(sys.argv[1::2], sys.argv[2::2]):
    segment(image, output, task="total", fastest=True, ml=True, statistics=True, quiet=True, device="cpu")
"""


@pytest.mark.slow
def test_a_totalsegmentator_task_on_the_cluster_equals_the_single_process_path(
    ray_cluster: str, cluster_home: Path, cohort: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    pytest.importorskip("nnunetv2", reason="making fixture TotalSegmentator weights needs the export extra")
    from tsrt_export.fixtures import write_totalseg_home

    cases, _ = cohort
    ts_home = write_totalseg_home(tmp_path / "ts_home", ("total_fastest",))
    home = {"TSRT_HOME": str(cluster_home)}
    imported = _tsrt("models", "import", "total", "--fastest", "--totalseg-home", str(ts_home), "-q", **home)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    listed = tmp_path / "cases.txt"
    listed.write_text("\n".join(str(cases / f"{name}.nii.gz") for name in GOOD_CASES[:3]))

    out = tmp_path / "out"
    run = _tsrt("segment", str(listed), "-o", str(out), "-ta", "total", "--fastest", "--ml", "--statistics",
                "--device", "cpu", "--ray", ray_cluster, "-q", **home)
    assert run.returncode == 0, run.stdout + run.stderr
    single = tmp_path / "single"
    pairs = [
        str(path) for name in GOOD_CASES[:3] for path in (cases / f"{name}.nii.gz", single / name / f"{name}.nii.gz")
    ]
    alone = _python(_SEGMENT_EACH, *pairs, **home)
    assert alone.returncode == 0, alone.stderr
    for name in GOOD_CASES[:3]:
        expected = np.asanyarray(nib.load(single / name / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / name / f"{name}.nii.gz").dataobj), expected)
        assert len(np.unique(expected)) > 1
        statistics = (out / name / "statistics.json").read_text()
        assert json.loads(statistics) == json.loads((single / name / "statistics.json").read_text())


@pytest.mark.slow
def test_ray_alone_starts_ray_in_process(cohort: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the cluster extra is not installed: pip install 'tsrt[cluster]'")
    cases, references = cohort
    listed = tmp_path / "cases.csv"
    listed.write_text(f"case,path\nfirst,{cases / 'case1.nii.gz'}\nsecond,{cases / 'case2.nii.gz'}\n")
    out = tmp_path / "out"
    ray_temp = tempfile.mkdtemp(prefix="tsrt-ray-", dir="/tmp")  # Ray's session files, not /tmp/ray; short paths
    try:
        run = _tsrt(
            "segment", str(listed), "-o", str(out), "--model", str(DEMO_MODEL), "--ray", "-q", RAY_TMPDIR=ray_temp
        )
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 segmented, 0 already done, 0 failed" in run.stdout
    renamed = {"first": references["case1"], "second": references["case2"]}
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "first" / "first.nii.gz").dataobj), renamed["first"])
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "second" / "second.nii.gz").dataobj), renamed["second"])


def test_ray_without_the_cluster_extra_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "cases").mkdir()
    phantom = make_phantom(shape=(20, 20, 16), spacing=(3.0, 3.0, 3.0))
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), tmp_path / "cases" / "a.nii.gz")
    hide_ray = "import sys; sys.modules['ray'] = None; from tsrt.cli.root import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", hide_ray, "segment", str(tmp_path / "cases"), "-o", str(tmp_path / "out"),
         "--model", str(DEMO_MODEL), "--ray", "-q"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUTF8": "1"},
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == ["tsrt: error: --ray needs Ray, which is not installed: "
                                               "pip install 'tsrt[cluster]'."]


def test_cohorts_from_csv_lists_and_globs(tmp_path: Path) -> None:
    from tsrt.cohort.cases import find_cases
    from tsrt.errors import InputError

    for folder in ("p1", "p2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ct.nii.gz").write_bytes(b"")
    (tmp_path / "list.csv").write_text("Case,Path,age\nfirst,p1/ct.nii.gz,50\nsecond,p2/ct.nii.gz,61\n")
    cases = find_cases(tmp_path / "list.csv", tmp_path / "out", multilabel=False)
    assert [(case.name, case.input, case.output) for case in cases] == [
        ("first", tmp_path / "p1" / "ct.nii.gz", tmp_path / "out" / "first"),
        ("second", tmp_path / "p2" / "ct.nii.gz", tmp_path / "out" / "second"),
    ]
    (tmp_path / "plain.csv").write_text(f"{tmp_path / 'p1' / 'ct.nii.gz'},x\n")
    assert [case.name for case in find_cases(tmp_path / "plain.csv", tmp_path / "out", multilabel=True)] == ["ct"]
    with pytest.raises(InputError, match="would both write"):  # both are named ct
        find_cases(str(tmp_path / "p*" / "ct.nii.gz"), tmp_path / "out", multilabel=True)
    (tmp_path / "g" / "sub").mkdir(parents=True)
    for image in ("g/x1.nii.gz", "g/sub/x2.nii", "g/sub/y.nii.gz"):
        (tmp_path / image).write_bytes(b"")
    globbed = find_cases(str(tmp_path / "g" / "**" / "x*.nii*"), tmp_path / "out", multilabel=True)
    assert [(case.name, case.output) for case in globbed] == [
        ("x2", tmp_path / "out" / "x2" / "x2.nii.gz"), ("x1", tmp_path / "out" / "x1" / "x1.nii.gz")
    ]
    with pytest.raises(InputError, match="matches no files"):
        find_cases(str(tmp_path / "nothing" / "*.nii.gz"), tmp_path / "out", multilabel=True)
