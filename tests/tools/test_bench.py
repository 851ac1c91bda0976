"""``luong-attention bench --quick`` runs and writes a complete, consistent JSON report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from luong_attention.tools.bench import IMPLS
from luong_attention.tools.cli import main

HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_quick_bench_writes_json_and_plots(tmp_path, capsys):
    main(["bench", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] is True
    assert report["machine"]["cores"] >= 1
    assert report["summary"]["matmul_gflops"] > 0
    rows = report["rows"]
    assert {(r["mode"], r["kind"]) for r in rows} == {
        ("dot", "fwd"),
        ("dot", "grad"),
        ("dot", "jvp"),
        ("dot", "hvp"),
        ("concat", "grad"),
    }
    # Forward mode beside forward and gradient of the same problem, as same-run ratios.
    for name in ("jvp/fwd T=64 B=2", "hvp/grad T=64 B=2"):
        assert report["summary"][name] > 0
    # The causal row went through every implementation's own causal mask, and they agreed.
    (causal,) = [r for r in rows if r.get("causal")]
    assert {"ours", "keras", "jax.nn"} <= set(causal["agreement"])
    for row in rows:
        assert set(row["time_s"]) == set(row["impls"]) <= set(IMPLS)
        assert {"ours", "keras"} <= set(row["impls"])
        assert ("jax.nn" in row["impls"]) == (row["mode"] == "dot")
        # torch (a child process) only where it is installed, and then on every dot row.
        forward_or_grad = row["kind"] in ("fwd", "grad")
        assert ("torch" in row["impls"]) == (
            row["mode"] == "dot" and forward_or_grad and HAVE_TORCH
        )
        assert ("ratio_to_torch" in row) == ("torch" in row["impls"])
        assert all(t > 0 for t in row["time_s"].values())
        # The agreement check ran on every implementation before timing.
        assert set(row["agreement"]) == set(row["impls"])
        bound = 1e-3 if row["dtype"] == "float32" else 0.25
        assert all(d < bound for d in row["agreement"].values())
        assert row["ratio_to_best_peer"] > 0
    # One row gets child-process memory measurements, with a plausible RSS growth.
    measured = [r for r in rows if r["memory"]]
    assert len(measured) == 1
    assert set(measured[0]["memory"]) == {"ours", "keras", "jax.nn"} | (
        {"torch"} & {*measured[0]["impls"]}
    )
    for entry in measured[0]["memory"].values():
        assert 0 <= entry["rss_growth_bytes"] < 2**30 and entry["seconds"] > 0
    assert (tmp_path / "bench_time.png").stat().st_size > 1000
    assert (tmp_path / "bench_memory.png").stat().st_size > 1000
    # The bfloat16 row: its speed against our float32 twin, its matmul efficiency against
    # the run's bfloat16 matmul, and every implementation's error against float64.
    (half,) = [r for r in rows if r["dtype"] == "bfloat16"]
    assert half["speedup_over_float32"] > 0 and half["efficiency"] > 0
    assert report["summary"]["bfloat16_matmul_gflops"] > 0
    assert set(half["errors"]) == set(half["impls"])
    for errors in half["errors"].values():
        assert 0 < errors["rms"] <= errors["max"] < 0.1
    out = capsys.readouterr().out
    assert "| dot | float32 | 2 | 64 |" in out and "| dot | bfloat16 | 2 | 64 |" in out
