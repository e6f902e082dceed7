"""Figure plumbing shared by every stage that draws: matplotlib on its file-only backend, and one way to
save a figure (PNG + PDF, each written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

# Before pyplot is imported: files only, never a window, so drawing works on a node without a display.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rome.pipeline.core.atomic import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf, each written under a temporary name and renamed; closes ``fig``."""
    out = []
    for fmt in ("png", "pdf"):
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=200, bbox_inches="tight")
        out.append(path)
    plt.close(fig)  # pyplot keeps every open figure alive: a dataset run draws hundreds
    return out
