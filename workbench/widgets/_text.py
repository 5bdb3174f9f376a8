"""Text that reaches plotly: escaped exactly once.

plotly.js draws titles, tick labels, legend entries and hover text as its own small HTML subset: it
splits the string on ``<...>`` tags (keeping ``<b>``, ``<br>``, ``<i>``, ``<sup>``, ... and dropping
others) and decodes only a few entities (``&amp; &lt; &gt; &nbsp; &mu; &times; &plusmn; &deg;`` and
numeric ``&#NN;``). ``html.escape(s, quote=True)`` therefore shows a ``"`` token as the literal text
``&quot;``. :func:`plotly_text` escapes only what plotly parses (``& < >``), so every token string
shows as itself and cannot open a tag. Text for the page's own HTML (``ipywidgets.HTML``, the token
strip, the report's tables) is escaped with ``html.escape`` where it is inserted, not before.
"""
from __future__ import annotations

__all__ = ["plotly_text"]


def plotly_text(s) -> str:
    """``s`` as plotly text: ``&``, ``<`` and ``>`` as entities, nothing else touched."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
