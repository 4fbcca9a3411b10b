"""Label tables: the names and colours stored inside a label map, and tsrt's one colour palette.

TotalSegmentator stores a multilabel file's class names as a CaretExtension XML label table (read
back by its `load_multilabel_nifti` and by Connectome Workbench). tsrt writes and reads the same
table, and colours every picture it draws (preview PNG, the UI's overlay) with the table's palette,
so a structure has one colour everywhere tsrt chooses it. (DICOM SEG/RTSTRUCT use the colour
TotalSegmentator codes for each structure, as upstream does; see tsrt.outputs.dicom.)
"""

from __future__ import annotations

from xml.etree import ElementTree
from xml.sax.saxutils import escape

import numpy as np

#: TotalSegmentator's label colours (CaretExtension), so label maps look the same in viewers.
LABEL_COLOURS = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (255, 0, 128), (128, 255, 128), (0, 128, 255), (128, 128, 128), (185, 170, 155),
)


def label_colour(label: int) -> tuple[int, int, int]:
    """The palette colour of a label number (the palette repeats every 12 labels)."""
    return LABEL_COLOURS[int(label) % len(LABEL_COLOURS)]


def label_colours(n_labels: int) -> np.ndarray:
    """RGB rows for labels 0..n_labels (row 0, the background, is never drawn)."""
    return np.array([label_colour(label) for label in range(n_labels + 1)], dtype=np.uint8).reshape(-1, 3)


def caret_label_table(label_names: dict[int, str]) -> bytes:
    """The CaretExtension XML TotalSegmentator stores in multilabel files."""
    rows = "\n".join(
        f'<Label Key="{int(key)}" Red="{r / 255}" Green="{g / 255}" Blue="{b / 255}" Alpha="1">{escape(str(name))}</Label>'
        for key, name in sorted(label_names.items())
        for r, g, b in [label_colour(key)]
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<CaretExtension><VolumeInformation Index="0"><LabelTable>\n'
        f"{rows}\n</LabelTable><VolumeType>Label</VolumeType></VolumeInformation></CaretExtension>\n"
    )
    return xml.encode("utf-8")


def read_label_table(nifti) -> dict[int, str]:
    """The label map TotalSegmentator stores in a multilabel file's CaretExtension (load_multilabel_nifti)."""
    for extension in nifti.header.extensions:
        content = extension.get_content()
        if isinstance(content, bytes) and b"<CaretExtension" in content:
            root = ElementTree.fromstring(content.decode("utf-8").strip())
            return {int(label.attrib["Key"]): (label.text or "").strip() for label in root.iter("Label")}
    return {}
