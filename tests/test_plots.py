"""medgpt.plots: the one way runs, sweeps and reports draw their PNG charts."""

from __future__ import annotations

import pytest

from medgpt.plots import Series, figure, line_chart

PNG = b"\x89PNG\r\n\x1a\n"


def test_line_chart_writes_a_png_or_nothing(tmp_path) -> None:
    out = line_chart([Series("loss", [1, 2, 3], [3.0, 2.5, 2.0]), Series("val", [], [], "o-")],
                     tmp_path / "c.png", "step", "loss")  # fmt: skip
    assert out == tmp_path / "c.png" and out.read_bytes().startswith(PNG)
    assert line_chart([Series("x", [], [])], tmp_path / "none.png", "s", "l") is None
    assert not (tmp_path / "none.png").exists()


def test_a_failed_drawing_writes_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="boom"), figure(tmp_path / "f.png", (4, 3)) as ax:
        ax.plot([1], [1])
        raise ValueError("boom")
    assert not (tmp_path / "f.png").exists()
