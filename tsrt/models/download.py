"""Download TotalSegmentator's released weights (and licensed ones) and import them into the store.

Open models are the GitHub release zips TotalSegmentator itself downloads (URLs in models.toml);
licensed models come from TotalSegmentator's license server, asked the way TotalSegmentator asks
(POST with the license key, task and version). Only the standard library talks HTTP, so the runtime
needs no extra dependency. Downloads go to $TSRT_HOME/downloads/NAME.zip.part and resume with an
HTTP Range request when a previous attempt stopped; a complete zip is unpacked into a temporary
folder and imported (exported to ONNX torch-free, see tsrt.models.totalseg_import) before it is deleted.
A zip already on disk from an earlier run is re-checked (every member's CRC, and the sha256 where
models.toml records one) before it is reused; a corrupt one is deleted and downloaded again.

Environment overrides (for mirrors and tests): TSRT_WEIGHTS_URL replaces the release base URL,
TSRT_LICENSE_URL the license server URL.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tsrt.errors import TsrtError
from tsrt.progress import progress as show_progress
from tsrt.config import LICENSE_URL_ENV, WEIGHTS_URL_ENV, default_totalseg_home, tsrt_home, url_override
from tsrt.models.registry import ModelPart, Registry, Task, load_registry
from tsrt.models.store import model_status, sha256_file

if TYPE_CHECKING:  # imported when used: it loads onnx, which `tsrt models set-license` does not need
    from tsrt.models.resources import ResourceSpec
    from tsrt.models.totalseg_import import Exporter, ImportOutcome

LOG = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHUNK_BYTES = 1 << 16
TIMEOUT_SECONDS = 60


class DownloadError(TsrtError):
    """A download failed, stopped, or delivered something that is not the expected model."""

    exit_code = 6


class LicenseError(DownloadError):
    """A licensed model was requested without a usable license key."""


# --------------------------------------------------------------------------------------------
# License key (stored like totalseg_set_license stores it)
# --------------------------------------------------------------------------------------------


def config_path() -> Path:
    return tsrt_home() / CONFIG_FILE


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise TsrtError(f"{path} is not readable JSON ({err}): fix or delete it.") from None
    return data if isinstance(data, dict) else {}


def read_license_key(registry: Registry | None = None) -> str | None:
    """The key stored by `tsrt models set-license`, else the one TotalSegmentator has stored."""
    key_name = (registry or load_registry()).license.config_key
    for path in (config_path(), default_totalseg_home() / CONFIG_FILE):
        key = _read_json(path).get(key_name)
        if key:
            return str(key)
    return None


def check_license_key_format(key: str, registry: Registry | None = None) -> None:
    server = (registry or load_registry()).license
    if not key.startswith(server.key_prefix) or len(key) != server.key_length:
        raise LicenseError(
            f"{key!r} is not a TotalSegmentator license key (they start with {server.key_prefix!r} and have "
            f"{server.key_length} characters): copy the key from your license e-mail."
        )


def license_server_url(registry: Registry | None = None) -> str:
    url = url_override(LICENSE_URL_ENV) or (registry or load_registry()).license.server_url
    return url if url.endswith("/") else url + "/"


def validate_license_key(key: str, registry: Registry | None = None) -> bool:
    """Ask the license server whether it accepts `key` (TotalSegmentator's is_valid_license)."""
    registry = registry or load_registry()
    url = license_server_url(registry) + registry.license.validate_endpoint
    request = _json_request(url, _license_body(registry.license.validate_body_keys, license_number=key))
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        answer = _json_body(err)
        if answer.get("status") is None:
            raise DownloadError(
                f"The license server answered HTTP {err.code} {err.reason}: try again later, or pass --skip-validation."
            ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DownloadError(
            f"Cannot reach the license server at {url} ({_reason(err)}): check the network, or pass --skip-validation."
        ) from None
    return answer.get("status") == registry.license.valid_status


def set_license_key(key: str, *, validate: bool = True, registry: Registry | None = None) -> Path:
    """Check and store the key in $TSRT_HOME/config.json (readable by the owner only); return that path."""
    registry = registry or load_registry()
    key = key.strip()
    check_license_key_format(key, registry)
    if validate and not validate_license_key(key, registry):
        raise LicenseError(
            f"The license server does not accept {key}: check the key, or get one at "
            f"{registry.license.academic_license_url}."
        )
    path = config_path()
    config = _read_json(path)
    config[registry.license.config_key] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=4)
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------------------------
# HTTP download with resume
# --------------------------------------------------------------------------------------------


def downloads_dir() -> Path:
    return tsrt_home() / "downloads"


def fetch(
    url: str,
    dest: Path,
    *,
    json_body: dict[str, Any] | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    label: str | None = None,
) -> Path:
    """Download `url` (POST `json_body` if given) to `dest`, resuming a previous partial download.

    The bytes go to DEST.part first; a stopped transfer keeps them and the next call asks only for
    the rest (HTTP Range). The file is renamed to DEST only once its length matches what the server
    announced and its sha256 matches `expected_sha256` (when given).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    label = label or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    response, offset = _open_resuming(url, json_body, part, label)
    with response:
        total = _receive(response, part, offset, label, progress)
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink()
        raise DownloadError(
            f"The server sent {size} bytes of {label} instead of {total}; the file was deleted: run the command again."
        )
    if expected_sha256 and sha256_file(part) != expected_sha256.lower():
        part.unlink()
        raise DownloadError(
            f"{label} does not have the expected sha256 (corrupt download); it was deleted: run the command again."
        )
    os.replace(part, dest)
    return dest


def _open_resuming(url: str, json_body: dict[str, Any] | None, part: Path, label: str) -> tuple[Any, int]:
    """Open the transfer asking only for the bytes after `part`; start over if the server refuses that range."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        return _open(url, json_body, offset), offset
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise _http_error(err, url, label) from None
    part.unlink()  # longer than the server's file: it belongs to another version of it
    try:
        return _open(url, json_body, 0), 0
    except urllib.error.HTTPError as err:
        raise _http_error(err, url, label) from None


def _open(url: str, json_body: dict[str, Any] | None, offset: int) -> Any:
    request = _json_request(url, json_body) if json_body is not None else urllib.request.Request(url)
    request.add_header("User-Agent", "tsrt")
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"Cannot reach {url} ({_reason(err)}): check the network connection{_override_hint(url)}."
        ) from None


def _receive(response: http.client.HTTPResponse, part: Path, offset: int, label: str, progress: bool) -> int | None:
    """Append (206) or write (200) the body to `part`; return the full file length when announced."""
    if (response.headers.get("Content-Type") or "").startswith("application/json"):
        raise _json_answer_error(_json_body(response), label)
    length = response.headers.get("Content-Length")
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range", ""))
        if start != offset:
            raise DownloadError(
                f"The server resumed {label} at byte {start}, not {offset}: delete {part} and run again."
            )
    else:
        offset, total = 0, None  # the server ignored the Range header: start over
    if total is None and length is not None:
        total = offset + int(length)
    received = offset
    with open(part, "ab" if offset else "wb") as handle, show_progress(label, total, enabled=progress, completed=offset, unit="bytes") as advance:
        try:
            while True:
                chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                advance(len(chunk))
        except (http.client.IncompleteRead, OSError) as err:
            handle.flush()
            of_total = f" of {total}" if total is not None else ""
            raise DownloadError(
                f"The download of {label} stopped after {received}{of_total} bytes ({type(err).__name__}): "
                "run the same command again to resume it."
            ) from None
    if total is not None and received < total:
        raise DownloadError(
            f"The download of {label} stopped after {received} of {total} bytes: "
            "run the same command again to resume it."
        )
    return total


def _content_range(header: str) -> tuple[int, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL or None for `*`)."""
    try:
        _unit, _, spec = header.partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.split("-")[0])
        return start, None if total in ("", "*") else int(total)
    except ValueError:
        raise DownloadError(f"The server sent an unreadable Content-Range {header!r}: try again later.") from None


def _json_request(url: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )


def _json_body(response: Any) -> dict[str, Any]:
    try:
        data = json.loads(response.read() or b"{}")
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _rejected_license(label: str) -> LicenseError:
    return LicenseError(
        f"The license server rejected the license key for {label}: check it, or store another with "
        "`tsrt models set-license KEY`."
    )


def _detail(answer: dict[str, Any]) -> str:
    return str(answer.get("message") or answer.get("detail") or answer.get("status") or "")


def _json_answer_error(answer: dict[str, Any], label: str) -> DownloadError:
    """A server that answers JSON instead of the zip (TotalSegmentator's license server does so for bad keys)."""
    if answer.get("status") == load_registry().license.invalid_status:
        return _rejected_license(label)
    detail = _detail(answer) or "no details"
    return DownloadError(f"The server answered a message ({detail}) instead of {label}: try again later.")


def _http_error(err: urllib.error.HTTPError, url: str, label: str) -> DownloadError:
    answer = _json_body(err)
    if answer.get("status") == load_registry().license.invalid_status:
        return _rejected_license(label)
    if err.code == 404:
        return DownloadError(f"{url} answered 404 Not Found: {label} is not published there{_override_hint(url)}.")
    detail = f" ({_detail(answer)})" if _detail(answer) else ""
    return DownloadError(f"{url} answered HTTP {err.code} {err.reason}{detail}: try again later.")


def _override_hint(url: str) -> str:
    for name in (WEIGHTS_URL_ENV, LICENSE_URL_ENV):
        override = url_override(name)
        if override and url.startswith(override):
            return f" (set by {name})"
    return ""


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def model_url(model: ModelPart, registry: Registry | None = None) -> str:
    """The release zip of an open model, with TSRT_WEIGHTS_URL replacing the base URL when set."""
    registry = registry or load_registry()
    if model.license or model.release is None:
        raise DownloadError(f"{model.name} is only available from the license server.")
    base = url_override(WEIGHTS_URL_ENV)
    if not base:
        return model.url or f"{registry.release_base_url}/{model.release}/{model.name}.zip"
    return f"{base.rstrip('/')}/{model.release}/{model.name}.zip"


def model_source(model: ModelPart, registry: Registry | None = None) -> str:
    """Where `model` is downloaded from (its release zip, or the license server), for what a run logs."""
    if model.license or model.release is None:
        return license_server_url(registry)
    return model_url(model, registry)


def download_model_zip(model: ModelPart, *, progress: bool = True, registry: Registry | None = None) -> Path:
    """The model's zip in $TSRT_HOME/downloads (downloaded or resumed unless already complete)."""
    registry = registry or load_registry()
    dest = downloads_dir() / f"{model.name}.zip"
    if dest.is_file():
        problem = zip_problem(dest, model.zip_sha256)
        if problem is None:
            return dest
        LOG.warning("%s from an earlier download %s; it was deleted and is downloaded again.", dest.name, problem)
        dest.unlink()
    if not model.license:
        url = model_url(model, registry)
        return fetch(url, dest, expected_sha256=model.zip_sha256, progress=progress, label=model.name)
    key = read_license_key(registry)
    if key is None:
        raise LicenseError(
            f"{model.name} needs a TotalSegmentator license: get one at {registry.license.academic_license_url} "
            "and store it with `tsrt models set-license KEY`."
        )
    body = _license_body(
        registry.license.download_body_keys,
        license_number=key, task=model.license_task, version=registry.totalsegmentator_version,
    )
    url = license_server_url(registry) + registry.license.download_endpoint
    return fetch(url, dest, json_body=body, expected_sha256=model.zip_sha256, progress=progress, label=model.name)


def resource_source(spec: "ResourceSpec", registry: Registry | None = None) -> str:
    """Where a store resource (tsrt.models.resources) is downloaded from: its release zip, or the license server."""
    registry = registry or load_registry()
    if spec.license_task is not None:
        return license_server_url(registry)
    if spec.release is None or spec.totalseg_folder is None:
        raise DownloadError(f"{spec.what.capitalize()} come with the totalsegmentator package; they cannot be downloaded.")
    base = (url_override(WEIGHTS_URL_ENV) or registry.release_base_url).rstrip("/")
    return f"{base}/{spec.release}/{Path(spec.totalseg_folder).name}.zip"


def download_resource_zip(spec: "ResourceSpec", *, progress: bool = True, registry: Registry | None = None) -> Path:
    """A store resource's zip in $TSRT_HOME/downloads, as TotalSegmentator downloads it (reused when intact).

    Unpacked into TotalSegmentator's weights folder layout, the zip gives the parent of `spec.totalseg_folder`.
    """
    registry = registry or load_registry()
    dest = downloads_dir() / f"{spec.name}.zip"
    if dest.is_file():
        problem = zip_problem(dest)
        if problem is None:
            return dest
        LOG.warning("%s from an earlier download %s; it was deleted and is downloaded again.", dest.name, problem)
        dest.unlink()
    url = resource_source(spec, registry)
    if spec.license_task is None:
        return fetch(url, dest, progress=progress, label=spec.name)
    key = read_license_key(registry)
    if key is None:
        raise LicenseError(
            f"{spec.what.capitalize()} need a TotalSegmentator license: get one at "
            f"{registry.license.academic_license_url} and store it with `tsrt models set-license KEY`."
        )
    body = _license_body(
        registry.license.download_body_keys,
        license_number=key, task=spec.license_task, version=registry.totalsegmentator_version,
    )
    return fetch(url + registry.license.download_endpoint, dest, json_body=body, progress=progress, label=spec.name)


#: What reading a damaged zip can raise (zlib.error: a damaged deflate stream; RuntimeError: encrypted members;
#: NotImplementedError: an unknown compression method).
_UNREADABLE_ZIP = (
    zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
    NotImplementedError,
)


def zip_problem(path: Path, expected_sha256: str | None = None) -> str | None:
    """What is wrong with a zip on disk (None: intact), checked before an earlier download is reused.

    A zip can be damaged after its download was checked (disk errors, a copy cut short, a file replaced
    by hand): every member is read and its CRC checked, and the sha256 compared where models.toml has one.
    """
    if expected_sha256 and sha256_file(path) != expected_sha256.lower():
        return "does not have the expected sha256"
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except _UNREADABLE_ZIP as err:
        return f"is not a readable zip archive ({' '.join(str(err).split()) or type(err).__name__})"
    if bad_member is not None:
        return f"has a corrupt member {bad_member} (CRC mismatch)"
    return None


def _license_body(keys: Sequence[str], **values: Any) -> dict[str, Any]:
    """The JSON request in the field order models.toml records from TotalSegmentator."""
    unknown = [key for key in keys if key not in values]
    if unknown:
        raise DownloadError(f"The license server expects {unknown}, which this tsrt cannot send: update tsrt.")
    return {key: values[key] for key in keys}


def unpack(zip_path: Path, into: Path) -> None:
    """Extract a release zip; a truncated or corrupt one is deleted so the next run downloads it anew."""
    into = Path(into).resolve()
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for member in archive.namelist():
                if not (into / member).resolve().is_relative_to(into):
                    raise DownloadError(
                        f"{Path(zip_path).name} holds a file outside its folder ({member}); it was not unpacked."
                    )
            archive.extractall(into)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error) as err:
        Path(zip_path).unlink(missing_ok=True)
        raise DownloadError(
            f"{Path(zip_path).name} is not a complete zip archive ({err}); it was deleted: run the command again."
        ) from None


def download_models(
    models: Sequence[ModelPart],
    *,
    store_root: Path | None = None,
    progress: bool = True,
    exporter: "Exporter | None" = None,
) -> list["ImportOutcome"]:
    """Download and import each model that is not complete in the store (torch-free unless `exporter` is given)."""
    from tsrt.models.exporter import export_result_folder
    from tsrt.models.totalseg_import import ImportOutcome, import_models

    registry = load_registry()
    outcomes: list[ImportOutcome] = []
    for model in models:
        status = model_status(model, store_root)
        if status.complete:
            outcomes.append(ImportOutcome(model, "present", status.path))
            continue
        archive = download_model_zip(model, progress=progress, registry=registry)
        with scratch_dir() as results:
            unpack(archive, results)
            if not (results / model.result_folder).is_dir():
                archive.unlink()
                raise DownloadError(
                    f"The zip for {model.name} does not hold {model.result_folder}; it was deleted: check "
                    f"{WEIGHTS_URL_ENV}/{LICENSE_URL_ENV} if set, else report this to tsrt."
                )
            outcomes.extend(
                import_models(
                    [model], results, store_root=store_root, progress=progress,
                    exporter=exporter or export_result_folder,
                )
            )
        archive.unlink()
    return outcomes


def download_task(
    task: Task,
    *,
    with_optional: bool = False,
    store_root: Path | None = None,
    progress: bool = True,
    exporter: "Exporter | None" = None,
) -> list["ImportOutcome"]:
    """Download and import every model the task's mode runs (and those of its options, if asked)."""
    models = list(task.required_models) + (list(task.optional_models) if with_optional else [])
    return download_models(models, store_root=store_root, progress=progress, exporter=exporter)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder next to the downloads (usually the store's disk), removed afterwards."""
    downloads_dir().mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".unpack-", dir=downloads_dir()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
