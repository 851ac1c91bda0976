"""The Pallas TPU kernel, run here in Mosaic interpret mode, against float64 NumPy.

Forward (output, logsumexp) and gradients (query, key, value, scale) are compared with a
float64 NumPy formula of Keras's masked softmax (itself checked against the loop reference
``helpers.reference``) and with the blocked kernel. Tiles are TPU tiles (8 queries x 128
keys); lengths are not multiples of them and depths (5, 7) are far from 128 lanes, so padding
is everywhere. The compile checks export the kernel for ``tpu`` from this CPU and look for
Mosaic's custom call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import reference_attention
from jax.experimental.pallas import tpu as pltpu

import luong_attention as la
from luong_attention._src.functional.kernel_call import kernel_attention
from luong_attention._src.kernels import api
from luong_attention._src.kernels.registry import get_kernel
from luong_attention._src.primitives.scores import ScoreParams

# (B, Tq, Tv, depth, dim_v), all distinct; Tq and Tv are no multiples of the tiles below.
B, TQ, TV, DIM, DIM_V = 2, 37, 300, 5, 7
BLOCK_Q, BLOCK_KV = 8, 128
KERNEL = get_kernel("pallas_tpu")
NAMES = ("query", "key", "value", "scale")


def _inputs(seed: int, dtype=np.float32):
    """``q``, ``k``, ``v`` from N(0, 1) and a value mask (about 70% kept)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, TQ, DIM)).astype(dtype)
    k = rng.standard_normal((B, TV, DIM)).astype(dtype)
    v = rng.standard_normal((B, TV, DIM_V)).astype(dtype)
    return q, k, v, rng.random((B, TV)) > 0.3


def _cotangents():
    """Non-uniform cotangents of output ``[B, Tq, dim_v]`` and logsumexp ``[B, Tq]``."""
    c_out = np.cos(np.arange(B * TQ * DIM_V)).reshape(B, TQ, DIM_V)
    return c_out, 0.5 * np.sin(np.arange(B * TQ)).reshape(B, TQ)


def _allowed(mask, causal: bool, q_offset: int = 0, kv_offset: int = 0) -> np.ndarray:
    """``[B, Tq, Tv]``: the keys each query sees."""
    allowed = (
        np.ones((B, TQ, TV), bool) if mask is None else np.broadcast_to(mask[:, None], (B, TQ, TV))
    )
    if causal:
        rows = q_offset + np.arange(TQ)[:, None]
        allowed = allowed & (kv_offset + np.arange(TV)[None, :] <= rows)
    return allowed


def _numpy(q, k, v, allowed, scale: float):
    """float64 ``(out, lse, (dq, dk, dv, dscale))`` of ``sum(out * c_out) + sum(lse *
    c_lse)``, masked scores filled as Keras does (``score - 1e9`` in float32)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    c_out, c_lse = _cotangents()
    raw = np.einsum("bqd,bkd->bqk", q, k)
    s = scale * raw
    filled = np.where(allowed, s, np.float32(s) - np.float32(1e9))
    top = filled.max(-1, keepdims=True)
    e = np.exp(filled - top)
    p = e / e.sum(-1, keepdims=True)
    out = p @ v
    lse = top[..., 0] + np.log(e.sum(-1))
    dp = np.einsum("bqv,bkv->bqk", c_out, v)
    # d out / d s_j = p_j (v_j - out), d lse / d s_j = p_j.
    ds = p * (dp - (c_out * out).sum(-1, keepdims=True) + c_lse[..., None])
    grads = (
        scale * ds @ k,
        scale * np.einsum("bqk,bqd->bkd", ds, q),
        np.einsum("bqk,bqv->bkv", p, c_out),
        (ds * raw).sum(),
    )
    return out, lse, grads


def _kernel_loss(
    kernel, mask, causal, q_offset=0, kv_offset=0, matmul_dtype=None, blocks=(BLOCK_Q, BLOCK_KV)
):
    """``(q, k, v, scale) -> (loss, (out, lse))`` through ``kernel_attention``."""
    c_out, c_lse = (jnp.asarray(c, jnp.float32) for c in _cotangents())

    def loss(q, k, v, scale):
        out, lse = kernel_attention(
            kernel,
            q,
            v,
            k,
            None if mask is None else jnp.asarray(mask),
            scores=ScoreParams("dot", scale),
            use_causal_mask=causal,
            q_offset=q_offset,
            kv_offset=kv_offset,
            block_q=blocks[0],
            block_kv=blocks[1],
            matmul_dtype=matmul_dtype,
        )
        return (out * c_out).sum() + (lse * c_lse).sum(), (out, lse)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _run_pallas(mask, causal, q, k, v, scale, **kwargs):
    with pltpu.force_tpu_interpret_mode():
        return _kernel_loss(KERNEL, mask, causal, **kwargs)(q, k, v, scale)


def test_numpy_formula_matches_the_loop_reference():
    """The float64 formula this file trusts equals ``helpers.reference`` (a fully masked
    row and causal Tq != Tv included)."""
    q, k, v, mask = _inputs(0)
    mask[0] = False
    out, _, _ = _numpy(q, k, v, _allowed(mask, True), 0.7)
    ref, _ = reference_attention(q, v, k, value_mask=mask, causal=True, scale=0.7)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


CASES = {
    # name: (causal, mask, q_offset, kv_offset)
    "plain": (False, None, 0, 0),
    "value mask, a fully masked row": (False, "full_row", 0, 0),
    # Rows 0-8 of example 0 see no key (keys 0-11 masked, q_offset 3): query tiles 0-1 must
    # visit every key block; tiles 2-4 skip key blocks 1-2.
    "causal, offsets, fully masked rows": (True, "prefix", 3, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_float64_and_blocked(case):
    causal, mask_kind, q_offset, kv_offset = CASES[case]
    q, k, v, mask = _inputs(1)
    if mask_kind == "full_row":
        mask[1] = False
    elif mask_kind == "prefix":
        mask[0, :12] = False
    else:
        mask = None
    allowed = _allowed(mask, causal, q_offset, kv_offset)
    out, lse, grads = _numpy(q, k, v, allowed, 0.7)
    kwargs = dict(q_offset=q_offset, kv_offset=kv_offset)
    (_, (p_out, p_lse)), p_grads = _run_pallas(mask, causal, q, k, v, 0.7, **kwargs)
    (_, (b_out, _)), b_grads = _kernel_loss(
        get_kernel("blocked"), mask, causal, blocks=(8, 64), **kwargs
    )(q, k, v, 0.7)
    live = allowed.any(-1)  # a fully masked row's lse is about -1e9 (float32 spacing 64)
    assert p_out.dtype == p_lse.dtype == jnp.float32
    np.testing.assert_allclose(p_out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p_lse)[live], lse[live], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(p_out, b_out, rtol=1e-5, atol=1e-6)
    for name, got, want, blocked in zip(NAMES, p_grads, grads, b_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got, blocked, rtol=1e-4, atol=1e-5, err_msg=name)


def test_tiles_above_the_diagonal_are_skipped():
    """Causal, no fully masked row, queries at 100-136: key block 2 (keys 256-299) lies above
    every row, and query tiles 0-2 skip key block 1. NaN keys and values there never reach
    the result; their gradients are exactly 0, as their weights are."""
    q, k, v, _ = _inputs(2)
    out, lse, grads = _numpy(q, k, v, _allowed(None, True, 100), 0.7)
    k[:, 256:], v[:, 256:] = np.nan, np.nan
    (_, (p_out, p_lse)), p_grads = _run_pallas(None, True, q, k, v, 0.7, q_offset=100)
    np.testing.assert_allclose(p_out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_lse, lse, rtol=1e-6, atol=1e-5)
    for name, got, want in zip(NAMES, p_grads, grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    assert not np.asarray(p_grads[1])[:, 256:].any() and not np.asarray(p_grads[2])[:, 256:].any()


def test_bfloat16_operands_with_float32_statistics():
    """bf16 q, k, v (scale 0.5 folds in exactly) against float64 on the same bf16 values.

    Tolerance from bf16's rounding, u = 2**-8: the kernel rounds p (forward), p, dO and ds
    (backward) to bf16 before the matmuls and the gradients once more on output, each a
    relative error of at most u on terms bounded by the largest entry; so the output may be
    off by 2u max|v| and a gradient by about 4 roundings, 4u of its largest entry (rtol 4u).
    """
    q, k, v, mask = _inputs(3)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    mask[0] = False
    u = 2.0**-8
    out, lse, grads = _numpy(*(np.float32(x) for x in (q, k, v)), _allowed(mask, False), 0.5)
    (_, (p_out, p_lse)), p_grads = _run_pallas(mask, False, q, k, v, 0.5, matmul_dtype=jnp.bfloat16)
    assert p_out.dtype == p_lse.dtype == jnp.float32
    assert [g.dtype for g in p_grads[:3]] == [jnp.bfloat16] * 3
    np.testing.assert_allclose(p_out, out, rtol=0, atol=2 * u * np.abs(np.float32(v)).max())
    live = mask.any(-1)
    np.testing.assert_allclose(np.asarray(p_lse)[live], lse[live], rtol=u, atol=0)
    for name, got, want in zip(NAMES, p_grads, grads, strict=True):
        got = np.float32(got)
        np.testing.assert_allclose(
            got, want, rtol=4 * u, atol=4 * u * np.abs(want).max(), err_msg=name
        )


def test_ring_halves_merge_and_backward_from_merged_stats():
    """Ring attention's use: keys in two calls (kv offsets 0 and 150, causal, example 0
    fully masked); the merged states give the whole output, and each call's backward, given
    the merged RowStats, gives its share of the whole gradient (dq summed over the calls)."""
    q, k, v, mask = _inputs(4)
    mask[0, :40] = False
    half = TV // 2
    cfg = KERNEL.config("dot", TQ, half, DIM, causal=True, block_q=BLOCK_Q, block_kv=BLOCK_KV)
    out, lse, (dq, dk, dv, _) = _numpy(q, k, v, _allowed(mask, True), 1.0)
    c_out, c_lse = (jnp.asarray(c, jnp.float32) for c in _cotangents())

    def operands(keys: slice, offset: int) -> api.Operands:
        arrays = (jnp.asarray(x[:, keys]) for x in (k, v, mask))
        offsets = (jnp.int32(0), jnp.int32(offset))
        return api.Operands(
            jnp.asarray(q),
            *list(arrays)[:2],
            jnp.float32(0),
            jnp.asarray(mask[:, keys]),
            offsets,
            None,
        )

    calls = (operands(slice(0, half), 0), operands(slice(half, TV), half))
    forward = jax.jit(KERNEL.forward, static_argnums=0)
    backward = jax.jit(KERNEL.backward, static_argnums=0)
    with pltpu.force_tpu_interpret_mode():
        merged = api.merge(*(forward(cfg, ops) for ops in calls))
        stats = api.RowStats(api.finalise(merged), merged.m, merged.denom)
        grads = [backward(cfg, ops, stats, c_out, c_lse) for ops in calls]
    live = _allowed(mask, True).any(-1)
    np.testing.assert_allclose(stats.out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(api.logsumexp(merged))[live], lse[live], rtol=1e-6, atol=1e-5
    )
    np.testing.assert_allclose(grads[0][0] + grads[1][0], dq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([g[1] for g in grads], 1), dk, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([g[2] for g in grads], 1), dv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_exports_for_tpu_as_mosaic_kernels(causal):
    """Forward and forward + gradient of masked (and causal) "dot" attention, exported for
    ``tpu`` from this CPU: one Mosaic custom call per kernel (forward; dK/dV and dQ), no
    interpret-mode fallback (which would lower to host callbacks)."""
    shapes = (
        jax.ShapeDtypeStruct((2, 300, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 700, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 700, 96), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 700), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.float32),
    )

    def attend(q, k, v, mask, scale):
        return kernel_attention(
            KERNEL, q, v, k, mask, scores=ScoreParams("dot", scale), use_causal_mask=causal
        )

    def loss(*args):
        out, lse = attend(*args)
        return out.sum() + lse.sum()

    for fn, kernels in ((attend, 1), (jax.value_and_grad(loss, argnums=(0, 1, 2, 4)), 3)):
        text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
        assert text.count("stablehlo.custom_call @tpu_custom_call") == kernels
        assert "callback" not in text


def test_attention_with_pallas_platform_tpu_exports_the_mosaic_kernels():
    """The public path: ``attention(implementation="pallas", pallas_platform="tpu")``
    (scale, value mask, causal), forward + gradient and forward + ``jax.jvp`` tangent
    exported for ``tpu`` from this CPU."""
    shapes = (
        jax.ShapeDtypeStruct((3, 40, 16), jnp.float32),
        jax.ShapeDtypeStruct((3, 200, 16), jnp.float32),
        jax.ShapeDtypeStruct((3, 200, 24), jnp.float32),
        jax.ShapeDtypeStruct((3, 200), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.float32),
    )

    def loss(q, k, v, mask, scale):
        out = la.attention(
            q,
            v,
            k,
            value_mask=mask,
            scale=scale,
            use_causal_mask=True,
            implementation="pallas",
            pallas_platform="tpu",
        )
        return out.sum()

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 4))
    text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3
    assert "callback" not in text

    def tangent(q, k, v, mask, scale):
        """Forward mode: the forward and the tangent pass, two Mosaic kernels."""
        return jax.jvp(lambda *a: loss(*a, mask, scale), (q, k, v), (k[:, :40], k, v))

    text = jax.export.export(jax.jit(tangent), platforms=["tpu"])(*shapes).mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 2
    assert 'kernel_name = "_tangent_kernel"' in text and "callback" not in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score_mode": "concat"}, "score_mode='dot' only; 'concat' runs on the blocked kernel"),
        (
            {"block_q": 12},
            "block_q must be None or a positive multiple of 8 .* Received: block_q=12",
        ),
        (
            {"block_kv": 64},
            "block_kv must be None or a positive multiple of 128 .* Received: block_kv=64",
        ),
    ],
)
def test_config_refuses_what_the_kernel_does_not_do(kwargs, match):
    args = {"score_mode": "dot", "q_length": TQ, "kv_length": TV, "depth": DIM, **kwargs}
    with pytest.raises(ValueError, match=match):
        KERNEL.config(**args)


def test_default_tiles_are_tpu_tiles_with_little_padding():
    """Query blocks of a multiple of 16 (bf16 tiles), key blocks of 128, split evenly near
    256 x 512."""
    cfg = KERNEL.config("dot", 1500, 1000, 64)
    assert (cfg.block_q, cfg.block_kv, cfg.n_q, cfg.n_kv) == (256, 512, 6, 2)
    cfg = KERNEL.config("dot", 19, 150, 5)
    assert (cfg.block_q, cfg.block_kv, cfg.n_q, cfg.n_kv) == (32, 256, 1, 1)
