"""Dropout inside the Pallas kernels (GPU interpreted, TPU in Mosaic interpret mode).

Both kernels draw their mask in-tile from ``pallas_common``'s counter-based hash. Checked
here: the keep rate of :func:`pallas_common.dropout_multiplier` and of the mask each kernel
applies (read off its output: zero queries give uniform weights, one-hot values copy each
weight times its multiplier into the output), that both kernels apply the same mask, the
forward and the gradients against float64 autodiff of a dense formula given that mask,
determinism in the rng, and that programs with dropout lower for CUDA and export for TPU.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from luong_attention import attention
from luong_attention._src.functional.kernel_call import kernel_attention
from luong_attention._src.kernels import pallas_common
from luong_attention._src.kernels.registry import get_kernel
from luong_attention._src.primitives.scores import ScoreParams

# (B, Tq, Tv, depth, dim_v): all distinct; no length a multiple of the tiles.
B, TQ, TV, DIM, DIM_V = 2, 37, 29, 5, 7
SCALE, RATE = 0.7, 0.3
# name: (registry name, (block_q, block_kv), interpret context)
KERNELS = {
    "gpu": ("pallas_gpu_interpret", (16, 16), contextlib.nullcontext),
    "tpu": ("pallas_tpu", (8, 128), pltpu.force_tpu_interpret_mode),
}


def _call(platform, q, k, v, rng, *, rate=RATE, mask=None, causal=False, scale=SCALE):
    """``(out, lse)`` of the interpreted kernel ``platform`` with dropout, jitted."""
    name, (block_q, block_kv), context = KERNELS[platform]

    def fn(q, k, v, rng):
        return kernel_attention(
            get_kernel(name),
            q,
            v,
            k,
            mask,
            scores=ScoreParams("dot", scale),
            use_causal_mask=causal,
            dropout_rate=rate,
            dropout_rng=rng,
            block_q=block_q,
            block_kv=block_kv,
        )

    with context():
        return jax.jit(fn)(q, k, v, rng)


def _multiplier(platform, rng, batch, tq, tv, rate=RATE):
    """The kernel's ``dropout_multiplier`` ``[batch, tq, tv]``."""
    name, (block_q, block_kv), _ = KERNELS[platform]
    kernel = get_kernel(name)
    cfg = kernel.config("dot", tq, tv, DIM, dropout_rate=rate, block_q=block_q, block_kv=block_kv)
    return np.asarray(kernel.dropout_multiplier(cfg, rng, batch))


def _inputs(seed, tv=TV):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, TQ, DIM)).astype(np.float32)
    k = rng.standard_normal((B, tv, DIM)).astype(np.float32)
    v = rng.standard_normal((B, tv, DIM_V)).astype(np.float32)
    mask = rng.random((B, tv)) > 0.3
    mask[1] = False  # example 1: every row fully masked (Keras's near-uniform weights)
    return q, k, v, mask


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_multiplier_keeps_one_minus_rate(rate):
    """10^5 draws (4 x 250 x 100): kept with ``1 - rate`` (within 1%), each kept weight
    scaled by ``1 / (1 - rate)``; examples and rows draw different masks."""
    mult = _multiplier("gpu", jax.random.key(7), 4, 250, 100, rate)
    kept = mult > 0
    assert abs(kept.mean() - (1 - rate)) < 0.01 * (1 - rate), kept.mean()
    np.testing.assert_array_equal(np.unique(mult), [0.0, np.float32(1 / (1 - rate))])
    assert (kept[0] != kept[1]).mean() > 0.5 * 2 * rate * (1 - rate)
    assert (kept[:, 0] != kept[:, 1]).mean() > 0.5 * 2 * rate * (1 - rate)


def _applied_mask(platform, rng, batch, tq):
    """The multipliers the kernel applies, ``[batch, tq, 256]``, read off its output: zero
    queries weigh the 256 keys (two TPU key blocks) 1/256 each (exact), one-hot values put
    weight ``c`` times its multiplier in output column ``c``."""
    q = jnp.zeros((batch, tq, DIM), jnp.float32)
    k = jnp.ones((batch, 256, DIM), jnp.float32)
    v = jnp.broadcast_to(jnp.eye(256, dtype=jnp.float32), (batch, 256, 256))
    out, _ = _call(platform, q, k, v, rng)
    return np.asarray(out) * 256


def test_both_kernels_apply_dropout_multiplier_and_keep_one_minus_rate():
    """10^5 weights (2 x 200 x 256) per kernel: each kernel's applied mask is its
    ``dropout_multiplier``, keeps ``1 - rate`` within 1%, and the GPU and TPU kernels draw
    the same mask for the same rng."""
    rng = jax.random.key(11)
    applied = {p: _applied_mask(p, rng, 2, 200) for p in KERNELS}
    for platform, mask in applied.items():
        want = _multiplier(platform, rng, 2, 200, 256)
        np.testing.assert_allclose(mask, want, rtol=1e-6, atol=1e-6, err_msg=platform)
        kept = (mask > 0.5).mean()
        assert abs(kept - (1 - RATE)) < 0.01 * (1 - RATE), (platform, kept)
    np.testing.assert_allclose(applied["gpu"], applied["tpu"], rtol=1e-6, atol=1e-6)


def _dense64(q, k, v, mask, mult, c_out, c_lse):
    """float64 ``sum(out * c_out) + sum(lse * c_lse)`` of Keras's causal masked softmax
    (``score - 1e9`` at hidden keys, as Keras in float32), ``out = (p * mult) @ v``."""
    s = SCALE * jnp.einsum("bqd,bkd->bqk", q, k)
    allowed = mask[:, None, :] & (jnp.arange(k.shape[1])[None, :] <= jnp.arange(TQ)[:, None])
    filled = jnp.where(allowed, s, (s.astype(jnp.float32) - 1e9).astype(s.dtype))
    lse = jax.nn.logsumexp(filled, axis=-1)
    out = jnp.einsum("bqk,bkv->bqv", jnp.exp(filled - lse[..., None]) * mult, v)
    return (out * c_out).sum() + (lse * c_lse).sum(), out


@pytest.mark.parametrize("platform", sorted(KERNELS))
def test_forward_and_gradients_match_float64_given_the_kernels_mask(platform):
    """Value mask, causal, a fully masked example, output and logsumexp cotangents: the
    output and dq, dk, dv equal float64 autodiff of the dense formula with the kernel's
    ``dropout_multiplier`` (dropped weights pass no gradient to v, nor through dp). Several
    query and key tiles in each kernel (300 keys: three TPU key blocks)."""
    tv = {"gpu": TV, "tpu": 300}[platform]
    q, k, v, mask = _inputs(3, tv)
    rng = jax.random.key(5)
    c_out = np.cos(np.arange(B * TQ * DIM_V)).reshape(B, TQ, DIM_V).astype(np.float32)
    c_lse = (0.5 * np.sin(np.arange(B * TQ)).reshape(B, TQ)).astype(np.float32)

    def loss(q, k, v):
        out, lse = _call(platform, q, k, v, rng, mask=jnp.asarray(mask), causal=True)
        return (out * c_out).sum() + (lse * c_lse).sum(), out

    with KERNELS[platform][2]():
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    mult = _multiplier(platform, rng, B, TQ, tv)
    assert 0 < (mult == 0).mean() < 0.5
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        consts = (jnp.asarray(mask), jnp.asarray(mult, jnp.float64), c_out, c_lse)
        (_, want), want_grads = jax.value_and_grad(
            lambda *a: _dense64(*a, *consts), (0, 1, 2), has_aux=True
        )(*args)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for label, got, ref in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=label)


@pytest.mark.parametrize("platform", sorted(KERNELS))
def test_the_same_rng_gives_the_same_output_another_rng_another(platform):
    q, k, v, _ = _inputs(4)
    first, _ = _call(platform, q, k, v, jax.random.key(1))
    again, _ = _call(platform, q, k, v, jax.random.key(1))
    other, _ = _call(platform, q, k, v, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 0.1


def test_attention_with_pallas_returns_the_weights_it_applied():
    """The public path (the GPU kernel interpreted on this CPU): the returned weights,
    dropout included, give the output."""
    q, k, v, mask = _inputs(6)
    out, weights = attention(
        q,
        v,
        k,
        value_mask=mask,
        dropout_rate=RATE,
        dropout_rng=jax.random.key(9),
        return_attention_scores=True,
        implementation="pallas",
    )
    assert 0 < (np.asarray(weights) == 0).mean() < 0.5
    np.testing.assert_allclose(out, np.einsum("bqk,bkv->bqv", weights, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_dropout_lowers_for_cuda_and_exports_for_tpu(platform):
    """Forward plus gradient with dropout (causal, bfloat16): three kernels, each a Triton
    (CUDA lowering) or Mosaic (TPU export) custom call, no interpreter loop or callback."""
    shapes = [jax.ShapeDtypeStruct((2, n, d), jnp.bfloat16) for n, d in ((40, 16), (70, 16))]
    shapes.append(jax.ShapeDtypeStruct((2, 70, 24), jnp.bfloat16))

    def loss(q, k, v):
        out = attention(
            q,
            v,
            k,
            use_causal_mask=True,
            dropout_rate=RATE,
            dropout_rng=jax.random.key(0),
            implementation="pallas",
            pallas_platform=platform,
        )
        return out.astype(jnp.float32).sum()

    fn = jax.jit(jax.grad(loss, (0, 1, 2)))
    if platform == "gpu":
        text = fn.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        target = "__gpu$xla.gpu.triton"
    else:
        text = jax.export.export(fn, platforms=["tpu"])(*shapes).mlir_module()
        target = "tpu_custom_call"
    assert re.findall(r"stablehlo\.custom_call @([\w$.]+)", text) == [target] * 3
    assert "stablehlo.while" not in text and "callback" not in text


def test_seed_mixes_in_every_counter():
    """Changing the seed, the example, the row or the column alone changes the draw."""
    base = dict(seed=jnp.int32(123), batch=jnp.int32(1), rows=jnp.arange(4096), cols=0)
    keep = pallas_common.dropout_scale(0.5, **base) > 0
    for name, other in (("seed", 124), ("batch", 2), ("cols", 1)):
        moved = pallas_common.dropout_scale(0.5, **{**base, name: jnp.int32(other)}) > 0
        assert 0.4 < (keep != moved).mean() < 0.6, name
    assert 0.4 < (keep[1:] != keep[:-1]).mean() < 0.6  # rows
