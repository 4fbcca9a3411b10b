"""`--radiomics`: shape and first-order radiomics features per mask (`statistics_radiomics.json`).

TotalSegmentator's recipe, reproduced: for every `*.nii.gz` in the mask folder (sorted by name),
PyRadiomics' feature extractor with image and mask resampled to 3 mm, geometry tolerance 1e-3 and
only the shape and first-order classes; keys lose their "original_" prefix and values are rounded
to 4 decimals. An empty mask, or one PyRadiomics cannot handle, gets 0 for each of the 107 names of
TotalSegmentator's standard feature list (which also names texture features it never computes).

PyRadiomics is an optional extra (`pip install 'tsrt[radiomics]'`). The original `pyradiomics`
does not install on Python 3.11 (its 3.1.0 source archive declares version 3.0.1a1, so pip
discards it, and does not build; 3.0.1 does not build either), so the extra uses
`pyradiomics-cuda`, a maintained fork of PyRadiomics 3.1 that builds from PyPI with plain pip (on CPU
its shape and first-order features were identical to a pyradiomics-bhklab 3.1.4 build, which needs
`versioneer` and `--no-build-isolation` to install). Everything is computed before the JSON is
written, in one atomic write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tsrt.progress import progress as show_progress
from tsrt.errors import TsrtError, missing_extra

if TYPE_CHECKING:
    from tsrt.pipeline.read import Image

log = logging.getLogger("tsrt")

RADIOMICS_FILE = "statistics_radiomics.json"
#: PyRadiomics settings TotalSegmentator uses.
EXTRACTOR_SETTINGS: dict[str, Any] = {
    "resampledPixelSpacing": [3, 3, 3],
    "geometryTolerance": 1e-3,
    "featureClass": ["shape"],
}
FEATURE_CLASSES = ("shape", "firstorder")
DECIMALS = 4
#: The names TotalSegmentator sets to 0 for an empty mask (its standard list, texture classes included).
STANDARD_FEATURES = (
    "shape_Elongation", "shape_Flatness", "shape_LeastAxisLength", "shape_MajorAxisLength",
    "shape_Maximum2DDiameterColumn", "shape_Maximum2DDiameterRow", "shape_Maximum2DDiameterSlice",
    "shape_Maximum3DDiameter", "shape_MeshVolume", "shape_MinorAxisLength", "shape_Sphericity", "shape_SurfaceArea",
    "shape_SurfaceVolumeRatio", "shape_VoxelVolume", "firstorder_10Percentile", "firstorder_90Percentile",
    "firstorder_Energy", "firstorder_Entropy", "firstorder_InterquartileRange", "firstorder_Kurtosis",
    "firstorder_Maximum", "firstorder_MeanAbsoluteDeviation", "firstorder_Mean", "firstorder_Median",
    "firstorder_Minimum", "firstorder_Range", "firstorder_RobustMeanAbsoluteDeviation", "firstorder_RootMeanSquared",
    "firstorder_Skewness", "firstorder_TotalEnergy", "firstorder_Uniformity", "firstorder_Variance",
    "glcm_Autocorrelation", "glcm_ClusterProminence", "glcm_ClusterShade", "glcm_ClusterTendency", "glcm_Contrast",
    "glcm_Correlation", "glcm_DifferenceAverage", "glcm_DifferenceEntropy", "glcm_DifferenceVariance", "glcm_Id",
    "glcm_Idm", "glcm_Idmn", "glcm_Idn", "glcm_Imc1", "glcm_Imc2", "glcm_InverseVariance", "glcm_JointAverage",
    "glcm_JointEnergy", "glcm_JointEntropy", "glcm_MCC", "glcm_MaximumProbability", "glcm_SumAverage",
    "glcm_SumEntropy", "glcm_SumSquares", "gldm_DependenceEntropy", "gldm_DependenceNonUniformity",
    "gldm_DependenceNonUniformityNormalized", "gldm_DependenceVariance", "gldm_GrayLevelNonUniformity",
    "gldm_GrayLevelVariance", "gldm_HighGrayLevelEmphasis", "gldm_LargeDependenceEmphasis",
    "gldm_LargeDependenceHighGrayLevelEmphasis", "gldm_LargeDependenceLowGrayLevelEmphasis",
    "gldm_LowGrayLevelEmphasis", "gldm_SmallDependenceEmphasis", "gldm_SmallDependenceHighGrayLevelEmphasis",
    "gldm_SmallDependenceLowGrayLevelEmphasis", "glrlm_GrayLevelNonUniformity",
    "glrlm_GrayLevelNonUniformityNormalized", "glrlm_GrayLevelVariance", "glrlm_HighGrayLevelRunEmphasis",
    "glrlm_LongRunEmphasis", "glrlm_LongRunHighGrayLevelEmphasis", "glrlm_LongRunLowGrayLevelEmphasis",
    "glrlm_LowGrayLevelRunEmphasis", "glrlm_RunEntropy", "glrlm_RunLengthNonUniformity",
    "glrlm_RunLengthNonUniformityNormalized", "glrlm_RunPercentage", "glrlm_RunVariance", "glrlm_ShortRunEmphasis",
    "glrlm_ShortRunHighGrayLevelEmphasis", "glrlm_ShortRunLowGrayLevelEmphasis", "glszm_GrayLevelNonUniformity",
    "glszm_GrayLevelNonUniformityNormalized", "glszm_GrayLevelVariance", "glszm_HighGrayLevelZoneEmphasis",
    "glszm_LargeAreaEmphasis", "glszm_LargeAreaHighGrayLevelEmphasis", "glszm_LargeAreaLowGrayLevelEmphasis",
    "glszm_LowGrayLevelZoneEmphasis", "glszm_SizeZoneNonUniformity", "glszm_SizeZoneNonUniformityNormalized",
    "glszm_SmallAreaEmphasis", "glszm_SmallAreaHighGrayLevelEmphasis", "glszm_SmallAreaLowGrayLevelEmphasis",
    "glszm_ZoneEntropy", "glszm_ZonePercentage", "glszm_ZoneVariance", "ngtdm_Busyness", "ngtdm_Coarseness",
    "ngtdm_Complexity", "ngtdm_Contrast", "ngtdm_Strength",
)
_INSTALL_NOTE = " (installs pyradiomics-cuda, a PyRadiomics 3.1 fork that builds on this Python)"


def require_pyradiomics() -> Any:
    """PyRadiomics' feature extractor module, or one line saying what to install (checked before segmenting)."""
    try:
        import radiomics
        from radiomics import featureextractor
    except ImportError as err:
        if (getattr(err, "name", None) or "radiomics").split(".")[0] not in ("radiomics", "pywt", "pykwalify"):
            raise
        raise missing_extra("--radiomics", "PyRadiomics", "radiomics", _INSTALL_NOTE) from None
    radiomics.setVerbosity(logging.ERROR)  # PyRadiomics logs every step at INFO
    return featureextractor


def _extractor(featureextractor: Any) -> Any:
    extractor = featureextractor.RadiomicsFeatureExtractor(**EXTRACTOR_SETTINGS)
    extractor.disableAllFeatures()
    for name in FEATURE_CLASSES:
        extractor.enableFeatureClassByName(name)
    return extractor


#: The key that explains why a mask's features are null.
FAILURE_KEY = "failure_reason"


def mask_features(image_path: Path, mask_path: Path, extractor: Any) -> dict[str, float | str | None]:
    """One mask's features, rounded like TotalSegmentator; zeros for an empty mask (as upstream).

    A failed extraction gives null features and the reason (upstream writes zeros there, which a reader
    cannot tell from real zeros).
    """
    import nibabel as nib

    try:
        mask = np.asanyarray(nib.load(mask_path).dataobj)
        if mask.size == 0 or mask.min() == mask.max():
            log.warning("%s is empty (or full): its radiomics features are all 0, as upstream.", mask_path.name)
            return {name: 0.0 for name in STANDARD_FEATURES}
        computed = extractor.execute(str(image_path), str(mask_path))
    except Exception as err:  # noqa: BLE001 - one mask's failure must not lose the others' features
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        log.warning("PyRadiomics failed on %s (%s): its features are null.", mask_path.name, reason)
        return {**{name: None for name in STANDARD_FEATURES}, FAILURE_KEY: reason}
    prefix = "original_"
    return {
        key[len(prefix):]: round(float(value), DECIMALS) for key, value in computed.items() if key.startswith(prefix)
    }


def mask_name(path: Path) -> str:
    """TotalSegmentator's key for a mask file: the name up to the first dot."""
    return path.name.split(".")[0]


def radiomics_for_masks(
    image_path: Path, masks: Sequence[Path], *, progress: bool = False
) -> dict[str, dict[str, float]]:
    """Features of each mask file against the image file (both NIfTI)."""
    extractor = _extractor(require_pyradiomics())
    results: dict[str, dict[str, float]] = {}
    with show_progress("radiomics", len(masks), enabled=progress, transient=True) as advance:
        for mask in masks:
            results[mask_name(mask)] = mask_features(Path(image_path), Path(mask), extractor)
            advance(1)
    return results


def write_radiomics(image_path: Path, mask_folder: Path, output: Path | None = None, *, progress: bool = False) -> Path:
    """statistics_radiomics.json for every *.nii.gz in `mask_folder` (sorted), written only when complete."""
    from tsrt.pipeline.write import write_json

    mask_folder = Path(mask_folder)
    output = Path(output) if output is not None else mask_folder / RADIOMICS_FILE
    masks = sorted(mask_folder.glob("*.nii.gz"))
    return write_json(radiomics_for_masks(Path(image_path), masks, progress=progress), output)


def check_radiomics(*, multilabel: bool) -> None:
    """--radiomics reads one mask file per class, and needs PyRadiomics: both checked before any work."""
    if multilabel:
        raise TsrtError("--radiomics works on the per-class masks: drop --ml (as in TotalSegmentator).")
    require_pyradiomics()


def write_source_radiomics(
    source: Image, path: Path | None, mask_folder: Path, *, progress: bool = False
) -> Path:
    """statistics_radiomics.json of the masks in `mask_folder` against the input image read from `path`.

    A NIfTI input is read by PyRadiomics itself; anything else is saved as NIfTI first.
    """
    import tempfile

    import nibabel as nib

    if path is not None and path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        return write_radiomics(path, mask_folder, progress=progress)
    with tempfile.TemporaryDirectory(prefix="tsrt-radiomics-") as folder:
        # A DICOM series (its stored integers) or an in-memory image (as upstream saves it). The stored type
        # matters: PyRadiomics resamples the image in it.
        image = Path(folder) / "image.nii.gz"
        nifti = nib.Nifti1Image(source.array, source.affine, source.header)
        if source.header is not None:
            nifti.set_data_dtype(source.header.get_data_dtype())
        nib.save(nifti, image)
        return write_radiomics(image, mask_folder, progress=progress)
