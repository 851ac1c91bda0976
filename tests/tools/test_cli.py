"""Smoke tests of the ``luong-attention`` command line and the heatmap helper."""

from __future__ import annotations

import numpy as np
import pytest

from luong_attention.date_demo.plotting import plot_attention
from luong_attention.tools import cli


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_plot_attention_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"weights must have shape \[q_length, kv_length\]"):
        plot_attention(np.ones((2, 3, 4)))
