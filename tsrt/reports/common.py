"""What every report shares: refusing to measure structures that are missing or cut by the field of view."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from tsrt.errors import InputError


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
