"""Half precision, float64 and the no-NaN guarantees (pitfalls B1-B4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import make_masks, random_inputs, reference_attention

import luong_attention as la
from luong_attention import Attention

ROOT = Path(__file__).resolve().parents[3]
# Tolerances against a float64 reference fed the same (rounded) half-precision inputs: the
# softmax runs in float32, so the error is the final rounding of output and weights
# (float16: 11-bit mantissa, bfloat16: 8-bit mantissa) on values of order 1. Half-precision
# matmul operands round the weights once more for the value product (about twice the
# output's error); both paths stay within a few tenths of these tolerances.
HALF_TOL = {jnp.float16: 2e-3, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("operands", ["float32", "half"])
def test_half_inputs_keep_dtype_and_match_f32(dtype, score_mode, operands):
    """B2: half inputs with float32 params -> half output and weights, close to a reference,
    on each forced operand path (the default depends on the CPU's flags)."""
    query, value, key = random_inputs(30, (3,), 4, 6, 5, 2)
    query, value, key = (jnp.asarray(x, dtype) for x in (query, value, key))
    query_mask, value_mask = make_masks("both", 30, (3,), 4, 6)
    matmul_dtype = jnp.float32 if operands == "float32" else dtype
    layer = Attention(use_scale=True, score_mode=score_mode, matmul_dtype=matmul_dtype)
    params = {"scale": jnp.float32(0.7)}
    if score_mode == "concat":
        params["concat_score_weight"] = jnp.float32(1.6)
    out, w = layer.apply(
        {"params": params},
        [query, value, key],
        mask=[query_mask, value_mask],
        use_causal_mask=True,
        return_attention_scores=True,
    )
    assert out.dtype == dtype and w.dtype == dtype
    r_out, r_w = reference_attention(
        *(np.asarray(x, np.float64) for x in (query, value, key)),
        query_mask=query_mask,
        value_mask=value_mask,
        causal=True,
        score_mode=score_mode,
        scale=0.7,
        concat_score_weight=params.get("concat_score_weight"),
    )
    tol = HALF_TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float64), r_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(w, np.float64), r_w, atol=tol, rtol=tol)
    # Masked weights are exactly 0 in half precision too (rows with some key left).
    vm = np.broadcast_to(value_mask[:, None, :] & np.tril(np.ones((4, 6), bool)), w.shape)
    has_key = vm.any(-1, keepdims=True)
    assert (np.asarray(w)[~vm & has_key] == 0).all()

    def loss(params, query, value, key):
        out = layer.apply({"params": params}, [query, value, key], mask=[query_mask, value_mask])
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, query, value, key)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(g, np.float32)).all()
    assert grads[0]["scale"].dtype == jnp.float32 and grads[1].dtype == dtype


def test_module_dtype_casts_inputs():
    layer = Attention(dtype=jnp.bfloat16)
    query, value, key = random_inputs(31, (2,), 3, 5, 4, 6)
    out, w = layer.apply({}, [query, value, key], return_attention_scores=True)
    assert out.dtype == w.dtype == jnp.bfloat16


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.float16], ids=["f32-ops", "f16-ops"])
def test_f16_fully_masked_row_with_negative_scores_has_no_nan(matmul_dtype):
    """B1: scores in [-30, -17] and a fully masked row: Keras's f16 ``- 65504`` fill gives
    -inf and NaN there; we apply the fill in float32, so the row is the mean of the values."""
    tv, dim = 6, 4
    query = np.full((2, 3, dim), 2.0, np.float16)
    c = np.linspace(17 / 8, 30 / 8, tv)  # scores = -8 c, from -17 to -30
    key = np.broadcast_to(-c[:, None] * np.ones(dim), (2, tv, dim)).astype(np.float16)
    value = np.random.default_rng(32).standard_normal((2, tv, 5)).astype(np.float16)
    scores = np.asarray(la.dot_scores(query, key))
    assert scores.min() >= -30 and scores.max() <= -17
    value_mask = np.array([[False] * tv, [True, False, True, True, False, True]])
    out, w = la.attention(
        query,
        value,
        key,
        value_mask=value_mask,
        return_attention_scores=True,
        matmul_dtype=matmul_dtype,
    )
    assert out.dtype == w.dtype == jnp.float16
    assert (
        np.isfinite(np.asarray(out, np.float32)).all()
        and np.isfinite(np.asarray(w, np.float32)).all()
    )
    mean = value[0].astype(np.float32).mean(0)
    np.testing.assert_allclose(
        np.asarray(out[0], np.float32), np.broadcast_to(mean, (3, 5)), atol=2e-3
    )
    assert (np.asarray(w[1])[:, ~value_mask[1]] == 0).all()
    np.testing.assert_allclose(np.asarray(w, np.float32).sum(-1), 1.0, atol=2e-3)


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.bfloat16], ids=["f32-ops", "bf16-ops"])
def test_bf16_long_rows_sum_to_one(matmul_dtype):
    """B3: Tv=4096 in bfloat16: the float32 softmax keeps each row's sum within 1e-3 of 1."""
    query, value, key = random_inputs(33, (2,), 3, 4096, 8, 2)
    query, value, key = (jnp.asarray(x, jnp.bfloat16) for x in (query, value, key))
    _, w = la.attention(
        query, value, key, scale=0.5, return_attention_scores=True, matmul_dtype=matmul_dtype
    )
    assert w.dtype == jnp.bfloat16
    sums = np.asarray(w, np.float32).sum(-1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-3)
    assert np.asarray(w, np.float32).max() > 10 / 4096  # not a trivially uniform row


def test_f32_masking_trips_neither_nan_nor_inf_checks():
    query, value, key = random_inputs(34, (3,), 4, 5, 2, 6)
    query_mask, value_mask = make_masks("both", 34, (3,), 4, 5)

    def loss(query, value, key, scale):
        out = la.attention(
            query,
            value,
            key,
            query_mask=query_mask,
            value_mask=value_mask,
            use_causal_mask=True,
            score_mode="concat",
            scale=scale,
        )
        return jnp.sum(out)

    with jax.debug_nans(True), jax.debug_infs(True):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(query, value, key, 0.8)


X64_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import luong_attention as la
    from helpers.reference import make_masks, random_inputs, reference_attention

    query, value, key = random_inputs(35, (3,), 4, 5, 2, 6, dtype=np.float64)
    qm, vm = make_masks("both", 35, (3,), 4, 5)
    kw = dict(query_mask=qm, value_mask=vm, use_causal_mask=True, score_mode="concat")

    def loss(query, value, key, scale):
        return jnp.sum(la.attention(query, value, key, scale=scale, **kw))

    with jax.debug_infs(True), jax.debug_nans(True):
        out, w = la.attention(query, value, key, scale=0.8, return_attention_scores=True, **kw)
        jit_out = jax.jit(lambda q, v, k: la.attention(q, v, k, scale=0.8, **kw))(query, value, key)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(query, value, key, jnp.float64(0.8))
    assert out.dtype == w.dtype == jit_out.dtype == jnp.float64, (out.dtype, w.dtype)
    assert all(g.dtype == jnp.float64 for g in grads)
    assert la.dot_scores(query, key).dtype == jnp.float64
    r_out, r_w = reference_attention(
        query, value, key, query_mask=qm, value_mask=vm, causal=True, score_mode="concat",
        scale=0.8,
    )
    # Fully masked rows differ: Keras's fill in float32 flattens them, float64 keeps the scores.
    live = (vm[:, None, :] & np.tril(np.ones((4, 5), bool))).any(-1)
    assert 0 < live.sum() < live.size
    np.testing.assert_allclose(np.asarray(out)[live], r_out[live], atol=1e-12)
    np.testing.assert_allclose(np.asarray(jit_out)[live], r_out[live], atol=1e-12)
    print("x64 ok")
    """
)


def test_float64_with_mask_under_debug_infs():
    """B4: with x64 on (in a subprocess, so the flag does not leak), float64 stays float64 and
    the mask fill trips neither jax.debug_infs nor jax.debug_nans."""
    result = subprocess.run(
        [sys.executable, "-c", X64_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x64 ok" in result.stdout
