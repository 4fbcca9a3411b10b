"""What the person who started `tsrt ui` configured, handed to the Streamlit page by environment variables.

Streamlit runs the page as a script in its own process, so `tsrt ui` cannot pass Python objects:
it sets these variables and the page reads them back with `UiSettings.from_environment()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tsrt.config import UI_DATA_DIR_ENV as ENV_DATA_DIR
from tsrt.config import UI_MAX_UPLOAD_MB_ENV as ENV_MAX_UPLOAD_MB
from tsrt.config import UI_TEMP_DIR_ENV as ENV_TEMP_DIR

#: A whole-body CT as NIfTI is a few hundred MB; a zipped DICOM series can be larger.
DEFAULT_MAX_UPLOAD_MB = 2048


@dataclass(frozen=True)
class UiSettings:
    data_dir: Path | None = None  # a folder of images clinicians may open without uploading
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    temp_dir: Path | None = None  # parent of the per-session folders; None: the system's temp folder

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> UiSettings:
        data_dir = environ.get(ENV_DATA_DIR)
        temp_dir = environ.get(ENV_TEMP_DIR)
        limit = environ.get(ENV_MAX_UPLOAD_MB, "")
        return cls(
            data_dir=Path(data_dir) if data_dir else None,
            max_upload_mb=int(limit) if limit.isdigit() and int(limit) > 0 else DEFAULT_MAX_UPLOAD_MB,
            temp_dir=Path(temp_dir) if temp_dir else None,
        )

    def environment(self) -> dict[str, str]:
        """The variables that make `from_environment` return these settings."""
        variables = {ENV_MAX_UPLOAD_MB: str(self.max_upload_mb)}
        if self.data_dir is not None:
            variables[ENV_DATA_DIR] = str(self.data_dir)
        if self.temp_dir is not None:
            variables[ENV_TEMP_DIR] = str(self.temp_dir)
        return variables
