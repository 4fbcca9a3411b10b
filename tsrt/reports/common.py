"""What every report shares: refusing to measure structures that are missing or cut by the field of view, and
handing report pages to image archives as RGB NIfTI."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tsrt.errors import InputError

if TYPE_CHECKING:
    import nibabel as nib


class MissingStructuresError(InputError):
    """A report needs structures the masks lack (or that the scan's field of view cuts)."""


def touches_border(mask: np.ndarray, axes: Iterable[int] = (0, 1, 2)) -> bool:
    """Whether a mask reaches the first or last slice along any of `axes` (the field of view cuts it)."""
    for axis in axes:
        first = np.take(mask, 0, axis=axis)
        last = np.take(mask, mask.shape[axis] - 1, axis=axis)
        if first.any() or last.any():
            return True
    return False


def require_structures(
    report: str,
    masks: Mapping[str, np.ndarray],
    required: Iterable[str],
    *,
    whole: Iterable[str] = (),
    min_voxels: int = 1,
) -> None:
    """Raise one line naming every required structure that is absent, and every `whole` one the field of view cuts.

    A report prints numbers only from masks that exist: a missing aorta gives "the aorta report needs
    aorta, which the scan does not show", not a diameter of zero.
    """
    missing = [name for name in required if name not in masks or int(np.count_nonzero(masks[name])) < min_voxels]
    cut = [name for name in whole if name not in missing and name in masks and touches_border(masks[name] > 0)]
    problems = []
    if missing:
        problems.append(f"needs {', '.join(missing)}, which the scan does not show")
    if cut:
        problems.append(f"needs {', '.join(cut)} whole, but the field of view cuts {'it' if len(cut) == 1 else 'them'}")
    if problems:
        raise MissingStructuresError(
            f"The {report} report {'; and '.join(problems)}: use a scan that covers "
            f"{'it' if len(missing) + len(cut) == 1 else 'them'} (nothing was measured)."
        )


def rgb_pages_nifti(pages: Sequence[np.ndarray]) -> nib.Nifti1Image:
    """Report pictures ((H, W, 3) uint8, top row first) stacked as one RGB NIfTI, one page per slice.

    TotalSegmentator's reports hand their pages to image archives (PACS) this way
    (reporting.combine_rgb_slices_as_nifti): each page turned so a viewer shows it upright, placed at
    the top of a canvas one pixel larger than the largest page, RGB24 voxels, affine diag(-1, -1, 1).
    """
    import nibabel as nib

    width = max(page.shape[1] for page in pages) + 1
    height = max(page.shape[0] for page in pages) + 1
    canvas = np.zeros((width, height, len(pages), 3), dtype=np.uint8)
    for index, page in enumerate(pages):
        turned = np.asarray(page, dtype=np.uint8).transpose(1, 0, 2)[::-1, ::-1]
        canvas[: turned.shape[0], canvas.shape[1] - turned.shape[1] :, index] = turned
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    voxels = np.ascontiguousarray(canvas[::-1, ::-1]).view(rgb).reshape(canvas.shape[:-1])
    return nib.Nifti1Image(voxels, np.diag([-1.0, -1.0, 1.0, 1.0]))
