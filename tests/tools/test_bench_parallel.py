"""``luong-attention bench-parallel --memory-only``: the HLO's ring transfers match the formula."""

from __future__ import annotations

import json

import pytest

from luong_attention.tools.cli import main

MIB = 2**20


@pytest.mark.slow
def test_ring_bytes_read_from_hlo_match_the_ring_formula(tmp_path, capsys):
    """4 devices, T=512, depth 64, f32: each step sends the K and V shards (2 * 128 * 64 * 4
    bytes) forward, K, V, dK and dV backward; per call 3 K/V transfers forward, 3 K/V and 4
    dK/dV backward (computed here by hand, not by the benchmark)."""
    out = tmp_path / "rows.json"
    flags = ["--memory-only", "--length", "512", "--devices", "1", "4"]
    main(["bench-parallel", *flags, "--strategies", "ring", "replicated", "--json", str(out)])
    rows = {(row["strategy"], row["devices"]): row for row in json.loads(out.read_text())}
    block = 2 * (512 // 4) * 64 * 4 / MIB
    ring = rows["ring", 4]
    assert ring["permute_fwd_step_mib"] == block
    assert ring["permute_bwd_step_mib"] == 2 * block
    assert ring["permute_fwd_mib"] == 3 * block
    assert ring["permute_bwd_mib"] == (3 + 4) * block
    assert ring["other_collectives_mib"] == 0  # no value mask: no pmin, no psum
    replicated = rows["replicated", 4]
    assert replicated["permute_fwd_mib"] == replicated["permute_bwd_mib"] == 0
    assert replicated["other_collectives_mib"] > 0  # its pmax/psum merges
    assert rows["ring", 1]["permute_fwd_mib"] == rows["ring", 1]["permute_bwd_mib"] == 0
    assert "| ring | 4 |" in capsys.readouterr().out
