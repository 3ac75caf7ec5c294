"""Figures are written with reproducible bytes (artifacts.save_figure): regenerating a committed
figure from the same numbers leaves ``git status`` clean — the PDF carries no creation date."""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dve_repro import artifacts


def _figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [1, 0, 2])
    return fig


def test_the_same_figure_gives_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        fig = _figure()
        artifacts.save_figure(fig, tmp_path / name, "f")
        plt.close(fig)
        time.sleep(1.1)  # a creation date in seconds would differ
    for ext in ("png", "pdf"):
        assert (tmp_path / "a" / f"f.{ext}").read_bytes() == (tmp_path / "b" / f"f.{ext}").read_bytes(), ext
    assert b"CreationDate" not in (tmp_path / "a" / "f.pdf").read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.suffix not in (".png", ".pdf")]  # no temporary left
