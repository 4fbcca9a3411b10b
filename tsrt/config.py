"""Where tsrt keeps things and every environment variable it reads, in one place.

Modules read settings through these functions (never `os.environ` directly), so the README's
list of variables and the code cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where models, engines and caches live (default ~/.tsrt).
TSRT_HOME_ENV = "TSRT_HOME"
#: TotalSegmentator's own home, read for its license key and its downloaded weights.
TOTALSEG_HOME_ENV = "TOTALSEG_HOME_DIR"
#: A mirror of TotalSegmentator's weight releases (replaces the GitHub release base URL).
WEIGHTS_URL_ENV = "TSRT_WEIGHTS_URL"
#: A different license server for licensed models.
LICENSE_URL_ENV = "TSRT_LICENSE_URL"
#: 1 (or true/yes/on): never fetch a missing model on first use; a run that needs one stops instead.
OFFLINE_ENV = "TSRT_OFFLINE"
#: What `tsrt ui` hands to its Streamlit page (which runs in another process).
UI_DATA_DIR_ENV = "TSRT_UI_DATA_DIR"
UI_MAX_UPLOAD_MB_ENV = "TSRT_UI_MAX_UPLOAD_MB"
UI_TEMP_DIR_ENV = "TSRT_UI_TEMP_DIR"
#: Threads each network runs on, as PyTorch (and so official TotalSegmentator) reads it; default every core.
THREADS_ENV = "OMP_NUM_THREADS"


def tsrt_home() -> Path:
    """Where models, engines and caches live: $TSRT_HOME, default ~/.tsrt."""
    return Path(os.environ.get(TSRT_HOME_ENV, Path.home() / ".tsrt")).expanduser()


def default_totalseg_home() -> Path:
    """TotalSegmentator's home: $TOTALSEG_HOME_DIR, else ~/.totalsegmentator (/tmp when HOME is /)."""
    if TOTALSEG_HOME_ENV in os.environ:
        return Path(os.environ[TOTALSEG_HOME_ENV])
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()
    return home / ".totalsegmentator"


def url_override(name: str) -> str | None:
    """The URL set in environment variable `name` (WEIGHTS_URL_ENV or LICENSE_URL_ENV), if any."""
    return os.environ.get(name) or None


def offline() -> bool:
    """Whether TSRT_OFFLINE forbids fetching models on first use (air-gapped sites, reproducible runs)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def threads_from_environment() -> int | None:
    """OMP_NUM_THREADS as a thread count for ONNX Runtime and OpenVINO sessions, or None (every core).

    PyTorch takes its thread count from this variable, so a site that caps official TotalSegmentator with it
    (several jobs on one server, a cohort beside other work) caps tsrt the same way. Oversubscribed cores cost
    more than they give: two 2-thread runs on 2 cores took 44 s, two 1-thread runs 32 s. A value that is not a
    positive whole number is left to the libraries that own the variable, as PyTorch does.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
