"""Expert identity colors, shared by every view and every exported figure.

Expert ids are CATEGORIES, not magnitudes: expert 12 is not "more" than expert 3. A color scheme
for them must therefore have no order - no lightness ramp, no sequential map. (The first
version took expert colors from viridis, the ramp the heatmaps use for values: a short bright
yellow bar then read as "high load", and neighbouring viridis shades were hard to tell apart.)
Viridis / RdBu stay reserved for VALUES (:data:`SEQUENTIAL`, :data:`DIVERGING`).

Two regimes, picked by the number of experts of the layer:

* ``n_experts <= 16`` (Scout, the embedded models): :data:`CATEGORICAL`, 16 fixed colors.
  The first 8 are the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), designed
  to stay distinguishable under protanopia, deuteranopia and tritanopia. No published
  categorical palette keeps 16 hues apart for every viewer, so the other 8 were chosen from
  Paul Tol's colorblind-safe schemes ("bright", "muted", "light", "dark", "high-contrast";
  personal.sron.nl/~pault) by a greedy max-min search: each added color maximizes the smallest
  CIE76 color difference to the colors already chosen, taken over normal vision and the three
  dichromacies simulated with Machado et al. (2009, severity 1). Result (the check is
  ``tests/test_widgets.py::test_categorical_palette_is_distinct_under_color_vision_deficiencies``):
  every pair differs by Delta E >= 18 for normal vision, >= 13 under protanopia / deuteranopia
  and >= 15 under tritanopia (10 is a clearly visible difference side by side). Colors mix
  light and dark on purpose, in no relation to the id, and every view also prints the expert
  number (key, hover, labels): color is never the only cue.
* ``n_experts > 16`` (Maverick's 128): no set of 128 colors is distinguishable, and a ramp would
  read as magnitude. Every expert is :data:`NEUTRAL` grey by default and the experts the user
  selects or pins (or that a view picks as the most used, and says so) are HIGHLIGHTED with the
  categorical colors in highlight order (:func:`expert_color_map`).

Highlighting works the same way below 16 experts: with a highlight set, the highlighted experts
keep their colors and all others turn :data:`NEUTRAL`.

``expert_color(e, n_experts)`` depends only on ``(e, n_experts)``, so expert 5 of a 16-expert
model has the same color in the load bars, the token view, the Sankey, the comparison and the
paper figures, in every notebook and session.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

__all__ = ["expert_color", "expert_colors", "expert_color_map", "text_color_on", "is_categorical", "rgba",
           "OKABE_ITO", "CATEGORICAL", "NEUTRAL", "MAX_CATEGORICAL", "SEQUENTIAL", "DIVERGING"]

OKABE_ITO = (
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#F0E442",  # yellow
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#000000",  # black
)

#: 16 categorical expert colors: Okabe-Ito, then 8 of Paul Tol's colors picked by max-min Delta E
#: under simulated color-vision deficiencies (see the module docstring)
CATEGORICAL = OKABE_ITO + (
    "#004488",  # high-contrast blue
    "#222255",  # dark indigo
    "#663333",  # dark red
    "#666633",  # dark olive
    "#AA3377",  # bright purple
    "#FFAABB",  # light pink
    "#99DDFF",  # light cyan
    "#999933",  # muted olive
)
MAX_CATEGORICAL = len(CATEGORICAL)
#: the color of an expert that is not highlighted (n_experts > 16, or outside a highlight set)
NEUTRAL = "#E0E0E0"

#: colorscale of sequential heatmaps (counts, shares, attention)
SEQUENTIAL = "Viridis"
#: colorscale of signed heatmaps (deviation from uniform, differences), centred on 0
DIVERGING = "RdBu_r"


def is_categorical(n_experts: int) -> bool:
    """Whether every expert of an ``n_experts`` layer has its own color (``n_experts <= 16``)."""
    return int(n_experts) <= MAX_CATEGORICAL


def _check(e: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"n_experts must be >= 1, got {n}")
    if not 0 <= e < n:
        raise ValueError(f"expert id {e} is outside [0, {n}) (n_experts={n})")


@lru_cache(maxsize=4096)
def expert_color(e: int, n_experts: int) -> str:
    """Hex color (``"#RRGGBB"``) of expert ``e`` of a layer with ``n_experts`` experts:
    ``CATEGORICAL[e]`` up to 16 experts, :data:`NEUTRAL` beyond (highlight with :func:`expert_color_map`)."""
    e, n = int(e), int(n_experts)
    _check(e, n)
    return CATEGORICAL[e] if n <= MAX_CATEGORICAL else NEUTRAL


def expert_colors(n_experts: int) -> list[str]:
    """``[expert_color(e, n_experts) for e in range(n_experts)]``."""
    return [expert_color(e, n_experts) for e in range(int(n_experts))]


def expert_color_map(n_experts: int, highlight: Iterable[int] = ()) -> list[str]:
    """One color per expert with ``highlight`` (expert ids, in order) emphasized.

    No highlight: :func:`expert_colors`. With a highlight set: the highlighted experts get their
    own color (``n_experts <= 16``) or the categorical colors in highlight order (more experts:
    the first highlighted expert ``CATEGORICAL[0]``, the second ``CATEGORICAL[1]``, ...; past 16
    they repeat), every other expert :data:`NEUTRAL`."""
    n = int(n_experts)
    hl = _unique(highlight, n)
    if not hl:
        return expert_colors(n)
    out = [NEUTRAL] * n
    for rank, e in enumerate(hl):
        out[e] = CATEGORICAL[e] if n <= MAX_CATEGORICAL else CATEGORICAL[rank % MAX_CATEGORICAL]
    return out


def _unique(experts: Iterable[int], n: int) -> list[int]:
    out: list[int] = []
    for e in experts:
        e = int(e)
        _check(e, n)
        if e not in out:
            out.append(e)
    return out


def text_color_on(background: str) -> str:
    """Black or white, whichever contrasts more with a ``#RRGGBB`` background (WCAG luminance)."""
    h = background.lstrip("#")
    rgb = [int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#FFFFFF"


def rgba(color: str, alpha: float) -> str:
    h = color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha:g})"


def swatch_html(e: int, color: str, label: str | None = None) -> str:
    """An inline HTML chip with the expert number on its color (label: the chip text, default ``e``)."""
    return (f'<span class="wb-swatch" style="background:{color};color:{text_color_on(color)};'
            f'padding:0 4px;border-radius:3px;border:1px solid #888">{e if label is None else label}</span>')


def key_experts(counts: Sequence[int], n_experts: int, highlight: Iterable[int] = (), limit: int = 16) -> list[int]:
    """The experts a color key lists: the highlighted ones, then (categorical palettes) every expert
    with a nonzero count, most used first, at most ``limit``."""
    hl = _unique(highlight, int(n_experts))
    rest = [int(e) for e in sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))
            if int(counts[e]) > 0 and e not in hl]
    return (hl + rest)[:max(limit, len(hl))]
