"""The PNG charts of runs, sweeps and evaluation reports, drawn one way.

matplotlib runs headless (Agg) and is imported only when a chart is drawn: it costs a second
of import time that no other command should pay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"


@contextmanager
def figure(path: str | Path, size: tuple[float, float], dpi: int = 110) -> Iterator[Any]:
    """An Axes to draw on; on leaving the block the figure is laid out, written to ``path``
    and closed (closed without writing when the block raises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def line_chart(
    series: Sequence[Series],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    legend_size: float | None = None,
) -> Path | None:
    """Lines against a shared x axis; None (nothing written) when there is no series."""
    drawn = [s for s in series if len(s.x)]
    if not drawn:
        return None
    with figure(path, (7, 4)) as ax:
        for s in drawn:
            ax.plot(s.x, s.y, s.style, ms=4 if "o" in s.style or "x" in s.style else 3,
                    label=s.label)  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    return Path(path)
