"""``luong-attention bench-keras --quick``: both models train a step in a child process with
the same loss, and the report holds memory and interleaved times of both."""

from __future__ import annotations

import json

import pytest

from luong_attention.tools import bench_keras
from luong_attention.tools.cli import main


@pytest.mark.slow
def test_quick_bench_keras_writes_a_consistent_report(tmp_path, capsys):
    main(["bench-keras", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_keras.json").read_text())
    (row,) = report["rows"]
    assert row["length"] == 1024 and report["quick"] is True
    assert set(row["memory"]) == set(row["time_s"]) == {"ours", "keras"}
    for entry in row["memory"].values():
        assert 0 < entry["rss_growth_bytes"] < 2**30 and entry["seconds"] > 0
    # The same weights and data: one training step gives the same loss with either layer.
    assert row["loss_agreement"] < 1e-5
    assert all(t > 0 for t in row["time_s"].values())
    assert row["memory_keras_over_ours"] > 0 and row["time_ours_over_keras"] > 0
    assert "| 1024 | 1 | 16 |" in capsys.readouterr().out


def test_the_plain_layer_is_skipped_where_its_scores_pass_the_dense_limit():
    assert bench_keras._plain_runs(dict(length=8192, batch=1, dim=64))
    # 32768^2 float32 scores: 4 GiB per example.
    assert not bench_keras._plain_runs(dict(length=32768, batch=1, dim=64))
