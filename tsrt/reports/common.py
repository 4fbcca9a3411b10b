"""What every report shares: refusing to measure structures that are missing or cut by the field of view,
drawing report pages with tsrt's bitmap font, and handing them to image archives as RGB NIfTI."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tsrt.errors import InputError
from tsrt.outputs.font import GLYPH_HEIGHT, draw_text, text_width

if TYPE_CHECKING:
    import nibabel as nib


class MissingStructuresError(InputError):
    """A report needs structures the masks lack (or that the scan's field of view cuts)."""


def touches_border(mask: np.ndarray, axes: Iterable[int] = (0, 1, 2), width: int = 1) -> bool:
    """Whether a mask reaches the first or last `width` slices along any of `axes` (the field of view cuts it)."""
    for axis in axes:
        size = mask.shape[axis]
        edges = sorted({*range(min(width, size)), *range(max(size - width, 0), size)})
        if np.take(mask, edges, axis=axis).any():
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


def wrap_text(text: str, width: int, scale: int) -> list[str]:
    """`text` broken into lines at most `width` pixels wide at `scale` (a single longer word keeps its own line)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if text_width(candidate, scale) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def centred_text(
    canvas: np.ndarray, text: str, top: int, left: int, width: int, colour: Sequence[int], scale: int = 2
) -> None:
    """`text` centred in the `width` pixels from `left` (left-aligned when it is wider)."""
    draw_text(canvas, text, top, left + max(0, (width - text_width(text, scale)) // 2), colour, scale)


def paste(canvas: np.ndarray, picture: np.ndarray, top: int, left: int) -> None:
    """`picture` copied onto `canvas` at (top, left), cut off at the canvas's edges."""
    height = min(picture.shape[0], canvas.shape[0] - top)
    width = min(picture.shape[1], canvas.shape[1] - left)
    canvas[top : top + height, left : left + width] = picture[:height, :width]


def draw_footer(page: np.ndarray, top: int, lines: Sequence[str], colour: Sequence[int]) -> None:
    """A rule 10 pixels above `top` across the page (10 pixels in from each side), then `lines` at scale 1."""
    page[top - 10, 10 : page.shape[1] - 10] = colour
    for number, line in enumerate(lines):
        draw_text(page, line, top + number * (GLYPH_HEIGHT + 4), 10, colour, 1)


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
