"""tsrt's clinical web page (Streamlit): open a CT or MR, segment it, look at the result, make reports, download them.

Start it with `tsrt ui` (tsrt/cli/ui.py), which binds it to this machine and switches off Streamlit's
usage statistics. Streamlit runs this script top to bottom on every click; what must survive a
click (the opened image, the result and its reports) lives in `st.session_state`. The logic is in the sibling
modules; this file only lays out widgets and wires them to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from tsrt.errors import TsrtError
from tsrt.ui.reports import (
    AORTA,
    EVANS,
    REFERENCE_RANGES_NOTE,
    REPORT_NAMES,
    REPORT_TITLES,
    VOLUMES,
    AortaPageReport,
    EvansPageReport,
    ReportFile,
    VolumeReport,
    aorta_phase_choices,
    aorta_report_for_page,
    evans_index_for_page,
    report_runtime,
    volume_report,
)
from tsrt.ui.results import (
    STATUS_NOT_FOUND,
    ResultFiles,
    file_stem,
    mean_column,
    structure_report,
    write_result_files,
)
from tsrt.ui.runner import (
    DEMO_KEY,
    DEMO_WARNING,
    ModelChoice,
    default_choice,
    default_fast,
    demo_fits,
    has_gated_int8,
    import_page_modules,
    model_choices,
    precision_choices,
    provider_choices,
    scan_modality,
    segment_for_ui,
)
from tsrt.ui.settings import UiSettings
from tsrt.ui.slices import DEFAULT_ALPHA, VIEWS, WINDOW_PRESETS, SliceViewer, colour_hex
from tsrt.ui.uploads import INPUT_ENDINGS, SessionFolder, find_images, human_size, save_upload

if TYPE_CHECKING:
    from streamlit.delta_generator import DeltaGenerator

PRIVACY_NOTE = (
    "Everything runs on this computer: the scan, the results and how you use this page never leave it "
    "(no external requests, no usage statistics)."
)


@dataclass
class OpenedImage:
    key: str  # identifies the upload or file, so a new one resets the result
    name: str
    source: object  # tsrt.totalseg.SourceImage
    read_seconds: float
    modality: str  # CT or MR: picks the default model
    phantom: bool  # one of tsrt's phantoms, the only scans the demo model fits


@dataclass
class RunOptions:
    choice: ModelChoice
    fast: bool
    structures: list[str]
    provider: str
    precision: str = "fp32"
    low_memory: bool = False


@dataclass
class PageResult:
    image_key: str
    model_key: str  # ModelChoice.key of the model that made it
    files: ResultFiles
    report: dict[str, list]
    viewer: SliceViewer
    seconds: dict[str, float]
    #: The Reports step's reports made from this result so far (or the one line refusing one), by kind.
    reports: dict[str, object] = field(default_factory=dict)


class ProgressBars:
    """One progress bar per stage on the page (tsrt.ui.runner.StageReporter)."""

    def __init__(self, container) -> None:
        self.container = container
        self.bar = None
        self.name = ""
        self.started = 0.0
        self.shown = -1
        self.seconds: dict[str, float] = {}

    def stage(self, name: str) -> None:
        self._finish_current()
        self.name, self.started, self.shown = name, time.perf_counter(), -1
        self.bar = self.container.progress(0, text=f"{name} ...")

    def tiles(self, done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        if self.bar is not None and percent != self.shown:  # one message per percent, not per tile
            self.shown = percent
            self.bar.progress(percent, text=f"{self.name}: {done} of {total} tiles")

    def finish(self) -> None:
        self._finish_current()
        self.bar = None

    def _finish_current(self) -> None:
        if self.bar is not None:
            seconds = time.perf_counter() - self.started
            self.seconds[self.name] = seconds
            self.bar.progress(100, text=f"{self.name}: done in {seconds:.1f} s")


def _workspace(settings: UiSettings) -> SessionFolder:
    if "workspace" not in st.session_state:
        st.session_state["workspace"] = SessionFolder(settings.temp_dir)
    return st.session_state["workspace"]


# --------------------------------------------------------------------------------------------- input


def _pick_image(settings: UiSettings, workspace: SessionFolder) -> OpenedImage | None:
    st.header("1. Scan")
    sources = ["Upload"] + (["Image folder"] if settings.data_dir is not None else [])
    source = st.radio("Open from", sources, horizontal=True, key="source") if len(sources) > 1 else "Upload"
    if source == "Upload":
        upload = st.file_uploader(
            "CT or MR: a NIfTI file or a zip of one DICOM series",
            type=list(INPUT_ENDINGS),
            key="upload",
            max_upload_size=settings.max_upload_mb,
            help=f"Up to {human_size(settings.max_upload_bytes)}. The file stays on this computer.",
        )
        if upload is None:
            _close_upload(workspace)
            return None
        key = f"upload:{upload.file_id}"

        def locate() -> Path:
            return save_upload(upload.name, upload.size, upload, workspace.new_folder("upload"), settings.max_upload_bytes)

        return _open(key, upload.name, locate)
    assert settings.data_dir is not None
    images = find_images(settings.data_dir)
    if not images:
        st.info(f"No NIfTI files, DICOM zips or DICOM folders in {settings.data_dir}.")
        return None
    path = st.selectbox(
        "Scan", images, index=None, key="folder_image", placeholder="Choose a scan",
        format_func=lambda p: str(p.relative_to(settings.data_dir)),
    )
    if path is None:
        return None
    return _open(f"file:{path}:{path.stat().st_mtime_ns}", path.name, lambda: path)


def _close_upload(workspace: SessionFolder) -> None:
    """The upload was removed from the page: forget it and its result, and delete their files."""
    opened: OpenedImage | None = st.session_state.get("opened")
    if opened is not None and opened.key.startswith("upload:"):
        st.session_state.pop("opened", None)
        st.session_state.pop("result", None)
        workspace.clear("upload")
        workspace.clear("result")


def _open(key: str, name: str, locate) -> OpenedImage | None:
    """Read the scan once per upload/file; a failure is one message, and nothing stays open."""
    opened: OpenedImage | None = st.session_state.get("opened")
    if opened is not None and opened.key == key:
        return opened
    st.session_state.pop("opened", None)
    st.session_state.pop("result", None)
    from tsrt.totalseg.source import read_source

    started = time.perf_counter()
    try:
        with st.spinner(f"Reading {name} ..."):
            source = read_source(locate())
    except TsrtError as err:
        st.error(str(err))
        return None
    opened = OpenedImage(key, name, source, time.perf_counter() - started, scan_modality(source), demo_fits(source))
    st.session_state["opened"] = opened
    return opened


def _describe(opened: OpenedImage) -> str:
    image = opened.source.image
    shape = " x ".join(str(n) for n in image.spatial_shape)
    spacing = " x ".join(f"{s:.2f}" for s in image.spacing)
    modality = image.extra.get("modality")
    return f"**{opened.name}**: {shape} voxels of {spacing} mm{f', {modality}' if modality else ''}"


# --------------------------------------------------------------------------------------------- options


@st.cache_data(ttl=30, show_spinner=False)
def _model_choices(store: str) -> list[ModelChoice]:
    """Installed tasks, looked up at most every 30 s (a status check reads every model's plan)."""
    return model_choices(Path(store))


@st.cache_data(ttl=30, show_spinner=False)
def _has_gated_int8(key: str, fast: bool, store: str) -> bool:
    """Whether the model has gated int8 graphs, looked up at most every 30 s (it reads the models' plans)."""
    return has_gated_int8(key, fast, Path(store))


def _run_options(opened: OpenedImage | None) -> tuple[RunOptions, bool]:
    st.header("2. Segmentation")
    from tsrt.models.store import models_root

    choices = _model_choices(str(models_root()))
    default = default_choice(choices, opened.modality if opened is not None else None)
    if st.session_state.get("model_default") != default or st.session_state.get("model") not in choices:
        # A new best model (first visit, a scan of the other modality, a task installed): select it once;
        # the clinician's own choice stands until the best model changes again.
        st.session_state["model_default"] = default
        st.session_state["model"] = default
    choice = st.selectbox("Model", choices, format_func=lambda c: c.label, key="model")
    providers = provider_choices()
    fast_only = "normal" not in choice.modes
    fast = st.checkbox(
        "fast (lower resolution, quicker)", value=default_fast(choice, providers), key=f"fast:{choice.key}",
        disabled=len(choice.modes) < 2,
        help="Only the installed modes can be chosen; fast is preselected when there is no GPU.",
    )
    fast = fast or fast_only
    names = sorted(choice.classes(fast).values())
    structures = st.multiselect(
        "Structures", names, key=f"structures:{choice.key}", placeholder="All structures (type to search)",
        help="Leave empty for all. Whole-body tasks then crop around the chosen ones, which is faster.",
    )
    provider = st.selectbox("Compute on", providers, key="provider")
    precisions = precision_choices(providers, provider, _has_gated_int8(choice.key, fast, str(models_root())))
    if st.session_state.get("precision") not in precisions:  # int8 gone with another model or provider: fp32
        st.session_state["precision"] = precisions[0]
    precision = st.selectbox(
        "Precision", precisions, key="precision", disabled=len(precisions) < 2,
        help="fp32 gives the reference masks; bf16 (OpenVINO on a CPU with native bf16), fp16 (TensorRT) and int8 "
        "(on the CPU, for a model with int8 graphs from `tsrt models quantize`) are faster and may differ in a few voxels.",
    )
    low_memory = st.checkbox(
        "Save memory (slower, same masks)", key="low_memory",
        help="Runs the network's large feature maps a few rows at a time: about half the memory, the same masks "
        "(--low-memory; on the CPU at fp32).",
    )
    run = st.button("Segment", type="primary", disabled=opened is None, key="run", width="stretch")
    return RunOptions(choice, fast, structures, provider, precision, low_memory), run


# --------------------------------------------------------------------------------------------- run


def _run(opened: OpenedImage, options: RunOptions, workspace: SessionFolder, messages: DeltaGenerator) -> None:
    """Segment and keep the result; progress bars and a failure's one line go into `messages` (a container)."""
    bars = ProgressBars(messages)
    try:
        segmentation = segment_for_ui(
            opened.source, options.choice, fast=options.fast, structures=options.structures,
            provider=options.provider, precision=options.precision, reporter=bars, low_memory=options.low_memory,
        )
        bars.stage("Measuring volumes and intensities")
        report = structure_report(segmentation)
        bars.stage("Writing the label file and the overview")
        files = write_result_files(segmentation, report, workspace.new_folder("result"), file_stem(opened.name))
        bars.stage("Preparing the viewer")
        viewer = SliceViewer.from_volume(
            segmentation.values, segmentation.labels, segmentation.image.affine, max(segmentation.label_names, default=0)
        )
        bars.finish()
    except TsrtError as err:
        messages.error(str(err))
        return
    for key in [k for k in st.session_state if str(k).startswith(("show:", "slice:"))]:
        del st.session_state[key]  # the new result starts with every structure shown, at its centre
    st.session_state["result"] = PageResult(
        opened.key, options.choice.key, files, report, viewer, {"read": opened.read_seconds, **bars.seconds}
    )


# --------------------------------------------------------------------------------------------- result


def _show_result(result: PageResult) -> None:
    seg = result.files.segmentation
    report = result.report
    found = [
        (label, name)
        for label, name, status in zip(report["label"], report["structure"], report["status"])
        if status != STATUS_NOT_FOUND
    ]
    st.header("3. Result")
    total = sum(result.seconds.values())
    st.caption(
        f"{seg.model_label} on {seg.provider}: {len(found)} of {len(seg.label_names)} structures found "
        f"in {total:.1f} s (reading the scan included)."
    )
    for note in seg.notes:
        st.info(note)
    viewer = result.viewer

    window_column, overlay_column, alpha_column = st.columns([2, 1, 1])
    presets = list(WINDOW_PRESETS)
    default = presets.index("Soft tissue" if seg.modality == "CT" else "Auto")
    preset = window_column.radio("Window", presets, index=default, horizontal=True, key="window")
    overlay = overlay_column.toggle("Overlay", value=True, key="overlay")
    alpha = alpha_column.slider("Opacity", 0.1, 1.0, DEFAULT_ALPHA, 0.05, key="alpha")
    ticked = _structure_toggles(found, viewer)  # always drawn: Streamlit forgets widgets a run leaves out
    visible = ticked if overlay else set()

    centre = viewer.centre()
    level_width = viewer.window_for(preset)
    for column, view in zip(st.columns(3), VIEWS):
        with column:
            count = viewer.size(view)
            number = st.slider(view.capitalize(), 1, count, centre[view] + 1, key=f"slice:{view}")
            picture = viewer.render(view, number - 1, level_width, visible, alpha)
            st.image(picture, width="stretch", output_format="PNG", caption=f"{view} {number} of {count}")

    st.subheader("Overview")
    st.image(
        str(result.files.overview),
        caption="Axial, coronal and sagittal through the centre of the segmented anatomy, with a legend "
        "(the preview PNG `tsrt segment --preview` writes)",
    )

    st.subheader("Report")
    st.dataframe(
        result.report, hide_index=True, key="report",
        column_config={
            "volume (ml)": st.column_config.NumberColumn(format="%.1f"),
            mean_column(seg.modality): st.column_config.NumberColumn(format="%.0f"),
        },
    )
    files = result.files
    csv_column, label_column, masks_column = st.columns(3)
    csv_column.download_button(
        "Report (CSV)", data=files.report.read_bytes(), file_name=files.report.name, mime="text/csv",
        on_click="ignore", key="download_report", width="stretch",
    )
    label_column.download_button(
        "Label file (NIfTI, all structures)", data=files.multilabel.read_bytes(), file_name=files.multilabel.name,
        mime="application/gzip", on_click="ignore", key="download_multilabel", width="stretch",
    )
    masks_column.download_button(
        "Masks (zip, one NIfTI per structure)", data=files.masks_zip_bytes, file_name=files.masks_zip_name,
        mime="application/zip", on_click="ignore", key="download_masks", width="stretch",
    )
    if files.manifest is not None:
        st.download_button(
            "Run manifest (JSON: model, options, checksums)", data=files.manifest.read_bytes(),
            file_name=files.manifest.name, mime="application/json", on_click="ignore", key="download_manifest",
        )


def _structure_toggles(found: list[tuple[int, str]], viewer: SliceViewer) -> set[int]:
    """A coloured checkbox per structure found; returns the labels to colour in."""
    visible: set[int] = set()
    with st.expander(f"Structures in the overlay ({len(found)})", expanded=len(found) <= 24):
        columns = st.columns(4)
        for index, (label, name) in enumerate(found):
            with columns[index % 4]:
                swatch, box = st.columns([1, 9], vertical_alignment="center", gap="small")
                swatch.html(
                    f'<div style="width:1em;height:1em;border-radius:3px;background:{colour_hex(viewer.colours, label)}"></div>'
                )
                if box.checkbox(name, value=True, key=f"show:{name}"):
                    visible.add(label)
    return visible


# --------------------------------------------------------------------------------------------- reports


def _show_reports(result: PageResult, opened: OpenedImage, options: RunOptions) -> None:
    """One tab per report: a button makes it from this result (or refuses in one line); its files download."""
    st.header("4. Reports")
    seg, folder, stem = result.files.segmentation, result.files.folder, result.files.stem
    volumes_tab, aorta_tab, evans_tab = st.tabs([REPORT_TITLES[kind] for kind in (VOLUMES, AORTA, EVANS)])
    with volumes_tab:
        st.caption("Volume and mean density of every structure this segmentation found (no further model runs).")
        if st.button("Create the volume report", key=f"report:{VOLUMES}"):
            _make_report(result, VOLUMES, lambda: volume_report(seg, folder, stem))
        _show_report(result, VOLUMES)
    with aorta_tab:
        st.caption(
            "Diameters at eleven landmarks and along the centerline, as `tsrt report aorta` measures them: runs "
            "the report's own models on the scan (several minutes on a CPU)."
        )
        phase = st.selectbox(
            "Contrast phase", aorta_phase_choices(), key="aorta_phase",
            help="native ignores the true/false lumen model; estimating needs `tsrt models import phase`.",
        )
        if st.button("Create the aorta report", key=f"report:{AORTA}"):
            _make_report(result, AORTA, lambda: aorta_report_for_page(
                opened.source, seg, report_runtime(options.provider, options.precision), phase, folder, stem,
            ))
        _show_report(result, AORTA)
    with evans_tab:
        st.caption(
            "Widest frontal horns over the widest inner skull on the same slice, as `tsrt evans-index` measures "
            "them on a head CT: runs its own models on the scan."
        )
        if st.button("Create the Evans index", key=f"report:{EVANS}"):
            _make_report(result, EVANS, lambda: evans_index_for_page(
                opened.source, seg, report_runtime(options.provider, options.precision), folder, stem,
            ))
        _show_report(result, EVANS)


def _make_report(result: PageResult, kind: str, make) -> None:
    """Run one report; keep it, or the one line that refuses it, with the result (both survive reruns)."""
    try:
        with st.spinner(f"Making the {REPORT_NAMES[kind]} report ..."):
            result.reports[kind] = make()
    except TsrtError as err:
        result.reports[kind] = str(err)


def _show_report(result: PageResult, kind: str) -> None:
    made = result.reports.get(kind)
    if made is None:
        return
    if isinstance(made, str):
        st.error(made)
        return
    if isinstance(made, VolumeReport):
        mean_name = mean_column(result.files.segmentation.modality)
        st.dataframe(
            made.table, hide_index=True,
            column_config={
                "volume (ml)": st.column_config.NumberColumn(format="%.1f"),
                mean_name: st.column_config.NumberColumn(format="%.0f"),
            },
        )
        st.caption(f"{made.measured} of {len(made.table['structure'])} structures found measured. {REFERENCE_RANGES_NOTE}")
    elif isinstance(made, AortaPageReport):
        widest = made.json["section_stats"]["aorta_total"]["max_diameter"]
        st.markdown(f"Widest aorta diameter: **{'-' if widest is None else f'{widest} cm'}**; "
                    f"{len(made.points)} of 11 landmarks measured.")
        st.image(made.profile_png, caption="Diameter along the centerline; discs: the measured landmarks (numbers "
                 "as on the report page)", output_format="PNG")
        for start in range(0, len(made.landmark_pictures), 6):
            row = made.landmark_pictures[start : start + 6]
            for column, (picture, caption) in zip(st.columns(6), row):
                column.image(picture, caption=caption, output_format="PNG")
        with st.expander("Report page"):
            st.image(str(made.page))
    elif isinstance(made, EvansPageReport):
        values = made.values
        index_column, brain_column, ventricle_column = st.columns(3)
        index_column.metric("Evans index", f"{values['evans_index']:.3f}", help="Above 0.3 suggests enlarged ventricles.")
        brain_column.metric("Brain volume", f"{values['brain_volume_ml']:.0f} ml")
        ventricle_column.metric("Ventricle volume", f"{values['ventricle_volume_ml']:.0f} ml")
        st.image(str(made.picture), caption="The measured slice: brain width green, frontal horns orange")
    _download_buttons(kind, made.files)


def _download_buttons(kind: str, files: list[ReportFile]) -> None:
    for column, (index, file) in zip(st.columns(len(files)), enumerate(files)):
        column.download_button(
            file.label, data=file.path.read_bytes(), file_name=file.path.name, mime=file.mime, on_click="ignore",
            key=f"download:{kind}:{index}", width="stretch",
        )


# --------------------------------------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="tsrt segmentation", layout="wide")
    settings = UiSettings.from_environment()
    workspace = _workspace(settings)
    st.title("tsrt: CT and MR segmentation")
    st.caption(PRIVACY_NOTE)
    import_page_modules()  # after the first paint, before anything imports on demand
    with st.sidebar:
        opened = _pick_image(settings, workspace)
        options, run = _run_options(opened)
    if opened is None:
        st.info("Open a scan in the sidebar: upload a NIfTI file or a zip of a DICOM series.")
        return
    st.markdown(_describe(opened))
    # Drawn on every run, empty or not: Streamlit places elements by their position, so a container present only
    # while segmenting would move the result on the next click and redraw it, resetting the open report tab.
    messages = st.container()
    if run:
        _run(opened, options, workspace, messages)
    result: PageResult | None = st.session_state.get("result")
    shown = result if result is not None and result.image_key == opened.key else None
    demo_used = options.choice.key == DEMO_KEY or (shown is not None and shown.model_key == DEMO_KEY)
    if demo_used and not opened.phantom:
        messages.warning(DEMO_WARNING)
    if shown is not None:
        _show_result(shown)
        _show_reports(shown, opened, options)


if __name__ == "__main__":
    main()
