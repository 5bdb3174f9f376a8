"""One fixed, colorblind-safe color per expert, shared by every view.

``expert_color(e, n_experts)`` depends only on ``(e, n_experts)``, so expert 5 of a 16-expert model
has the same color in the load bars, the token view, the Sankey and the comparison, in every
notebook and session.

* ``n_experts <= 8``: the Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), designed
  to stay distinguishable under the common color-vision deficiencies.
* more experts: no categorical palette keeps 16 or 128 hues apart for every viewer, so colors are
  taken from viridis (perceptually uniform, readable in deuteranopia/protanopia/tritanopia and
  in grey scale: experts differ in lightness) at the van der Corput positions of the expert id:
  experts 0, 1, 2, 3 ... sit at 0, 1/2, 1/4, 3/4 ... of the map, so neighbouring ids (which tend
  to be compared) are far apart in lightness. Positions are distinct for all ``e < n_experts``.

Heatmaps use viridis (sequential values) or ColorBrewer RdBu (signed deviations), both
colorblind-safe.
"""
from __future__ import annotations

from functools import lru_cache

__all__ = ["expert_color", "expert_colors", "text_color_on", "OKABE_ITO", "SEQUENTIAL", "DIVERGING"]

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

#: colorscale of sequential heatmaps (counts, shares, attention)
SEQUENTIAL = "Viridis"
#: colorscale of signed heatmaps (deviation from uniform, differences), centred on 0
DIVERGING = "RdBu_r"

# viridis anchors (matplotlib's viridis at 0, 1/10, ..., 1), interpolated linearly in RGB
_VIRIDIS = (
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
    (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
)


def _van_der_corput(n: int) -> float:
    q, denom = 0.0, 1.0
    while n:
        denom *= 2.0
        n, r = divmod(n, 2)
        q += r / denom
    return q


def _viridis(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[c] + (b[c] - a[c]) * f) for c in range(3))
    return f"#{r:02X}{g:02X}{bl:02X}"


@lru_cache(maxsize=4096)
def expert_color(e: int, n_experts: int) -> str:
    """Hex color (``"#RRGGBB"``) of expert ``e`` of a layer with ``n_experts`` experts."""
    e, n = int(e), int(n_experts)
    if n < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if not 0 <= e < n:
        raise ValueError(f"expert id {e} is outside [0, {n}) (n_experts={n})")
    if n <= len(OKABE_ITO):
        return OKABE_ITO[e]
    # rank of e's van der Corput position among all n positions: evenly spaced, in bit-reversed order
    return _viridis(_ranks(n)[e] / (n - 1))


@lru_cache(maxsize=64)
def _ranks(n: int) -> tuple[int, ...]:
    order = sorted(range(n), key=_van_der_corput)
    rank = [0] * n
    for i, x in enumerate(order):
        rank[x] = i
    return tuple(rank)


def expert_colors(n_experts: int) -> list[str]:
    """``[expert_color(e, n_experts) for e in range(n_experts)]``."""
    return [expert_color(e, n_experts) for e in range(int(n_experts))]


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
