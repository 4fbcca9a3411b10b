"""A 5x7 bitmap font (with 2 rows for descenders), so the preview PNG can carry structure names without PIL or a font file.

The runtime install has no imaging library (numpy + zlib draw the preview); names in the legend are
TotalSegmentator class names (letters, digits, `_`), so a small fixed font covers them. Characters
without a glyph are drawn as `?`.
"""

from __future__ import annotations

import numpy as np

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 9
#: Rows above the baseline; the two below are for descenders (g j p q y ,).
CAP_HEIGHT = 7
#: One blank column between characters.
ADVANCE = GLYPH_WIDTH + 1

# Each glyph: 7 rows of 5 columns above the baseline ('#' is ink), plus 2 below for letters with descenders.
_GLYPH_ROWS: dict[str, str] = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "%": "##..# ##..# ...#. ..#.. .#... #..## #..##",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    " ": "..... ..... ..... ..... ..... ..... .....",
}



def _bitmap(rows: str) -> np.ndarray:
    """A glyph's rows as a (GLYPH_HEIGHT, GLYPH_WIDTH) bool array, blank below the baseline unless given."""
    ink = [[cell == "#" for cell in row] for row in rows.split()]
    return np.array(ink + [[False] * GLYPH_WIDTH] * (GLYPH_HEIGHT - len(ink)), dtype=bool)


#: Character -> (9, 5) bool bitmap.
FONT: dict[str, np.ndarray] = {char: _bitmap(rows) for char, rows in _GLYPH_ROWS.items()}


def glyph(char: str) -> np.ndarray:
    """The (9, 5) bitmap of one character (`?` for characters the font lacks)."""
    return FONT.get(char, FONT["?"])


def text_width(text: str, scale: int = 1) -> int:
    """Pixels `text` takes at `scale` (no trailing gap)."""
    return max(0, len(text) * ADVANCE - 1) * scale


def render_text(text: str, scale: int = 2) -> np.ndarray:
    """A bool mask (9*scale, text_width) of `text`, each font pixel drawn as a scale x scale block."""
    mask = np.zeros((GLYPH_HEIGHT, max(0, len(text) * ADVANCE - 1)), dtype=bool)
    for position, char in enumerate(text):
        mask[:, position * ADVANCE : position * ADVANCE + GLYPH_WIDTH] = glyph(char)
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def draw_text(canvas: np.ndarray, text: str, top: int, left: int, colour: tuple[int, int, int], scale: int = 2) -> None:
    """Paint `text` into an (H, W, 3) canvas in place, clipped at its edges."""
    mask = render_text(text, scale)
    height = max(0, min(mask.shape[0], canvas.shape[0] - top))
    width = max(0, min(mask.shape[1], canvas.shape[1] - left))
    region = canvas[top : top + height, left : left + width]
    region[mask[:height, :width]] = colour
