"""Smoke tests of the ``luong-attention`` command line and the heatmap helper."""

from __future__ import annotations

import numpy as np
import pytest

from luong_attention import cli
from luong_attention.plotting import plot_attention


def test_demo_prints_and_saves_heatmap(tmp_path, capsys):
    cli.main(["demo", "--out", str(tmp_path), "--seed", "3"])
    text = capsys.readouterr().out
    assert "output (2, 4, 3)" in text and "weights (2, 4, 6)" in text
    png = tmp_path / "demo_attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_plot_attention_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"weights must have shape \[q_length, kv_length\]"):
        plot_attention(np.ones((2, 3, 4)))
