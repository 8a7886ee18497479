"""Small helpers for the inline SVG that graphopt's HTML pages draw (no script, no network).

Text is set in a monospace font so that its width can be known in advance:
`text_width("MatMul", 12)` is an upper bound of what a browser renders. `place_labels`
puts short labels (such as point numbers) next to their anchors so that no two labels, and
no label and marker, overlap.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Optional, Sequence

MONOSPACE = "ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', 'Liberation Mono', monospace"
"""The font family of all text drawn in SVG (advance width at most 0.62 em in all of them)."""

_ADVANCE = 0.62


def escape(text: str) -> str:
    """`text` safe inside an SVG/HTML element or a quoted attribute."""
    return html.escape(text, quote=True)


def text_width(text: str, size: float) -> float:
    """The width, in px, that `text` takes at most in `MONOSPACE` at font size `size`."""
    return len(text) * size * _ADVANCE


def shorten(text: str, limit: int, keep_end: bool = False) -> str:
    """`text` cut to `limit` characters with an ellipsis (at the front when `keep_end`)."""
    if len(text) <= limit:
        return text
    return "\u2026" + text[-(limit - 1):] if keep_end else text[: limit - 1] + "\u2026"


@dataclasses.dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle: left, top, right, bottom (y grows downwards)."""

    left: float
    top: float
    right: float
    bottom: float

    @classmethod
    def around(cls, x: float, y: float, width: float, height: float) -> "Box":
        """The box of size `width` x `height` centred on (x, y)."""
        return cls(x - width / 2, y - height / 2, x + width / 2, y + height / 2)

    def intersects(self, other: "Box", margin: float = 0.0) -> bool:
        """Whether the two boxes, each grown by `margin`, overlap."""
        return not (
            self.right + margin <= other.left or other.right + margin <= self.left
            or self.bottom + margin <= other.top or other.bottom + margin <= self.top
        )

    def inside(self, other: "Box") -> bool:
        return self.left >= other.left and self.right <= other.right and self.top >= other.top and self.bottom <= other.bottom


_DIRECTIONS = [(math.cos(math.radians(a)), -math.sin(math.radians(a))) for a in (30, 150, 330, 210, 90, 270, 0, 180, 60, 120, 300, 240)]
_DISTANCES = (3, 9, 16, 25, 36, 50, 66, 85)


def place_labels(
    anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], area: Box, obstacles: Sequence[Box] = (), gap: float = 2.0
) -> list[tuple[float, float]]:
    """Centres for labels of `sizes` (width, height) near `anchors`, inside `area`, so that no
    two labels overlap and no label covers an obstacle (e.g. the markers), all `gap` apart.

    Each label tries positions around its anchor, nearest first; a label that finds no free
    place keeps the one that overlaps least.
    """
    placed: list[Box] = []
    centres = []
    for (x, y), (width, height) in zip(anchors, sizes):
        best: Optional[tuple[float, tuple[float, float], Box]] = None
        for distance in _DISTANCES:
            for dx, dy in _DIRECTIONS:
                cx = x + dx * (distance + width / 2)
                cy = y + dy * (distance + height / 2)
                box = Box.around(cx, cy, width, height)
                if not box.inside(area):
                    continue
                clashes = sum(box.intersects(other, gap) for other in [*placed, *obstacles])
                if best is None or clashes < best[0]:
                    best = (clashes, (cx, cy), box)
                if clashes == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # no position inside the area at all: at the anchor
            best = (0, (x, y), Box.around(x, y, width, height))
        placed.append(best[2])
        centres.append(best[1])
    return centres
