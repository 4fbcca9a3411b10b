"""One typed request for a TotalSegmentator task: every option, TotalSegmentator's names and defaults.

The CLI, the Python API (`tsrt.segment`), cohorts (local and Ray) and the web UI each build one
`SegmentOptions` and hand it down unchanged; it normalises and checks itself once, on creation, so a
bad option is refused before any image is read and no layer below re-validates or re-defaults it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsrt.engines.providers import resolve_precision
from tsrt.errors import TsrtError
from tsrt.outputs.dicom import normalize_output_types

STATS_AGGREGATIONS = ("mean", "median")
#: Options that say where and how the models run, not what is written: a rerun that changes only these
#: keeps earlier results (the run manifest records the provider actually used instead).
RUNTIME_FIELDS = frozenset({"provider", "device", "threads", "quiet", "models_dir", "offline", "low_memory"})


@dataclass(frozen=True)
class SegmentOptions:
    """What `TotalSegmentator` (and `tsrt segment`) is asked to do with one image (or each image of a cohort).

    Field names are the keyword names of TotalSegmentator's python API (`totalsegmentator(...)`).
    """

    task: str = "total"
    fast: bool = False
    fastest: bool = False
    roi_subset: tuple[str, ...] | None = None
    roi_subset_robust: tuple[str, ...] | None = None
    ml: bool = False  # one multilabel file instead of a folder of per-class masks
    statistics: bool | Path = False  # True: statistics.json beside the output; a path: there (upstream 2.18)
    statistics_exclude_masks_at_border: bool = True
    stats_aggregation: str = "mean"
    statistics_normalized_intensities: bool = False
    radiomics: bool = False  # statistics_radiomics.json (the radiomics extra)
    preview: bool = False
    body_seg: bool = False
    force_split: bool = False
    robust_crop: bool = False
    v1_order: bool = False
    remove_small_blobs: bool | float = False  # True: 200 mm3 (upstream's default); a number: that many mm3
    no_derived_masks: bool = False
    skip_saving: bool = False  # no segmentation files, only statistics / preview (upstream's --skip_saving)
    output_type: tuple[str, ...] = ("nifti",)  # nifti, dicom_seg, dicom_rtstruct
    save_probabilities: Path | None = None  # nnU-Net's .npz (+ .pkl) of the task's last model
    provider: str = "auto"
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8: changes voxels, so a rerun at another precision is redone
    device: str | None = None
    threads: int | None = None
    quiet: bool = False
    models_dir: Path | None = None  # default $TSRT_HOME/models
    offline: bool = False  # never fetch a missing model on first use (also TSRT_OFFLINE=1)
    low_memory: bool = False  # large feature maps in slabs (tsrt.engines.slabs): the same masks in less memory

    def __post_init__(self) -> None:
        def set_field(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("roi_subset", "roi_subset_robust"):
            value = getattr(self, name)
            if value is not None:
                set_field(name, (value,) if isinstance(value, str) else tuple(value))
        set_field("output_type", normalize_output_types(self.output_type))
        if isinstance(self.statistics, str):
            set_field("statistics", Path(self.statistics) if self.statistics else True)
        for name in ("save_probabilities", "models_dir"):
            value = getattr(self, name)
            if value is not None:
                set_field(name, Path(value))
        if self.remove_small_blobs is None:
            set_field("remove_small_blobs", False)
        provider, precision = resolve_precision(self.provider, self.precision)  # openvino-bf16: openvino + bf16
        set_field("provider", provider)
        set_field("precision", precision)
        if self.stats_aggregation not in STATS_AGGREGATIONS:
            raise TsrtError(f"Statistics aggregate with mean or median, not {self.stats_aggregation!r}.")

    @classmethod
    def from_keywords(cls, **keywords: Any) -> SegmentOptions:
        """From `tsrt.segment`-style keywords; a name TotalSegmentator does not take is refused in one line."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)}: tsrt.segment takes {', '.join(sorted(known))}")
        return cls(**keywords)

    def replace(self, **changes: Any) -> SegmentOptions:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def written_options(self) -> dict[str, Any]:
        """Every option that changes what is written, by TotalSegmentator's names (the run manifest's options):
        the requested precision is one (bf16 changes voxels), the provider - the engine itself - is not."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}


@dataclass(frozen=True)
class RuntimeOptions:
    """Where the models are and how they run: the part of the options the companion tools share."""

    models_dir: str | Path | None = None
    provider: str = "auto"
    device: str | None = None
    quiet: bool = False
    threads: int | None = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8, checked against the provider on creation
    offline: bool = False  # never fetch a missing model (the web page: nothing leaves the machine)
    low_memory: bool = False  # large feature maps in slabs: the same masks in less memory

    def __post_init__(self) -> None:
        provider, precision = resolve_precision(self.provider, self.precision)  # refused before any image is read
        object.__setattr__(self, "provider", provider)
        object.__setattr__(self, "precision", precision)

    def segment_options(self, task: str, **options: Any) -> SegmentOptions:
        """The request for `task` with these runtime settings and the given task options."""
        return SegmentOptions(
            task=task, models_dir=self.models_dir, provider=self.provider, device=self.device, quiet=self.quiet,
            threads=self.threads, precision=self.precision, offline=self.offline, low_memory=self.low_memory,
            **options,
        )

