"""The Pallas kernels' tangent passes (forward mode): Triton interpreted, Mosaic in interpret
mode.

Each kernel's ``tangent`` is checked against the blocked kernel's ``lax`` loops with the same
dropout stream (``pallas_common.LAX_TWIN.tangent``) on tiny tiles, with a value mask, a
causal mask, fully masked rows, skipped causal tiles and padding; and ``jax.jvp`` of the
public ``attention(implementation="pallas")`` against ``jax.jvp`` of the dense XLA path in
float32 and bfloat16. The lowering checks sit with the kernels' other ones
(``test_pallas_gpu.py``, ``test_pallas_tpu.py``).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from luong_attention import attention
from luong_attention._src.kernels import api, pallas_common, pallas_gpu, pallas_tpu
from luong_attention._src.kernels.registry import get_kernel

B, DIM, DIM_V, RATE = 2, 5, 3, 0.3
# platform: (registry name, (Tq, Tv), (block_q, block_kv), interpret context). Causal with
# Tv > Tq: the last key tile is skipped by every query tile, key tile 1 by query tile 0 of
# the GPU kernel; rows 0-2 of example 0 see only masked keys (fully masked), so the first
# query tile visits every key.
CASES = {
    "gpu": ("pallas_gpu_interpret", (37, 53), (16, 16), contextlib.nullcontext),
    "tpu": ("pallas_tpu", (13, 139), (8, 128), pltpu.force_tpu_interpret_mode),
}


def _arrays(seed, tq, tv, dtype=np.float32):
    """``(q, k, v)`` and tangents ``(dq, dk, dv)`` from N(0, 1), and a value mask."""
    rng = np.random.default_rng(seed)
    shapes = [(B, tq, DIM), (B, tv, DIM), (B, tv, DIM_V)] * 2
    arrays = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
    mask = rng.random((B, tv)) > 0.3
    mask[0, :3] = False  # causal rows 0-2 of example 0 see no key: fully masked
    return arrays[:3], arrays[3:], jnp.asarray(mask)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_tangent_kernel_matches_the_lax_twin(platform):
    """The kernel's tangent pass against the same maths and dropout mask in ``lax`` loops,
    given the kernel's forward statistics: causal, value mask, dropout."""
    name, (tq, tv), (block_q, block_kv), context = CASES[platform]
    kernel = get_kernel(name)
    (q, k, v), d_qkv, mask = _arrays(0, tq, tv)
    cfg = kernel.config(
        "dot", tq, tv, DIM, causal=True, dropout_rate=RATE, block_q=block_q, block_kv=block_kv
    )
    offsets = (jnp.int32(0), jnp.int32(0))
    ops = api.Operands(q, k, v, jnp.zeros((), jnp.float32), mask, offsets, jax.random.key(3))
    d_ops = (*d_qkv, jnp.zeros((), jnp.float32))

    def run(ops, d_ops):
        state = kernel.forward(cfg, ops)
        stats = api.RowStats(api.finalise(state), state.m, state.denom)
        return kernel.tangent(cfg, ops, stats, d_ops), pallas_common.LAX_TWIN.tangent(
            cfg, ops, stats, d_ops
        )

    with context():
        (d_out, d_lse), (want_out, want_lse) = jax.jit(run)(ops, d_ops)
    assert d_out.shape == (B, tq, DIM_V) and d_lse.shape == (B, tq)
    assert d_out.dtype == d_lse.dtype == jnp.float32
    assert np.isfinite(d_out).all() and np.isfinite(d_lse).all()
    assert np.abs(want_out).max() > 0.1  # dropout kept weights, the tiles were visited
    np.testing.assert_allclose(d_out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_lse, want_lse, rtol=1e-5, atol=1e-5)


def _jvp(implementation, platform, mask, primals, tangents):
    """``jax.jvp`` of causal masked attention in ``(q, k, v, scale)``, jitted."""

    def fn(q, k, v, scale):
        return attention(
            q,
            v,
            k,
            value_mask=mask,
            use_causal_mask=True,
            scale=scale,
            implementation=implementation,
            pallas_platform=platform,
        )

    return jax.jit(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_jvp_of_pallas_attention_matches_xla(monkeypatch, platform, dtype):
    """``jax.jvp`` through ``attention(implementation="pallas")`` (several tiles: small
    default blocks) equals the XLA path's, no NaN in fully masked rows. bfloat16: both
    against float32 XLA on the same rounded inputs, to 4 roundings of ``2**-8`` times the
    largest magnitude (``p``, ``p ds`` and the results are rounded to bfloat16)."""
    monkeypatch.setattr(pallas_gpu, "DEFAULT_BLOCK", 16)
    monkeypatch.setattr(pallas_tpu, "DEFAULT_BLOCK_Q", 8)
    monkeypatch.setattr(pallas_tpu, "DEFAULT_BLOCK_KV", 128)
    _, (tq, tv), _, context = CASES[platform]
    (q, k, v), (dq, dk, dv), mask = _arrays(1, tq, tv, dtype)
    primals, tangents = (q, k, v, jnp.float32(0.7)), (dq, dk, dv, jnp.float32(0.3))
    # On this CPU, "gpu" is the interpreted Triton kernel (no pallas_platform).
    with context():
        out, d_out = _jvp("pallas", "tpu" if platform == "tpu" else None, mask, primals, tangents)
    assert out.dtype == d_out.dtype == dtype and d_out.shape == (B, tq, DIM_V)
    assert np.isfinite(np.asarray(d_out, np.float32)).all()
    wide = [x.astype(jnp.float32) for x in (*primals[:3], *tangents[:3])]
    want, want_d = _jvp("xla", None, mask, (*wide[:3], primals[3]), (*wide[3:], tangents[3]))
    if dtype == np.float32:
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_out, want_d, rtol=1e-4, atol=1e-4)
        return
    bf16 = 4 * 2.0**-8
    for got, ref in ((out, want), (d_out, want_d)):
        ref = np.asarray(ref)
        got = np.asarray(got, np.float32)
        np.testing.assert_allclose(got, ref, atol=bf16 * np.abs(ref).max(), rtol=0)
