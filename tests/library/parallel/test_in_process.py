"""Both sequence-parallel strategies in this process: the devices emulated by ``jax.vmap``.

``jax.vmap(..., axis_name=...)`` gives the per-device functions (``ring_attention_shards``,
``replicated_attention_shards``) the collectives they use (``ppermute``, ``pmax``, ``psum``,
``pmin``, ``axis_index``), so their numerics run here on one device and ``pytest -k`` selects
one case. The test lays the sequence out itself (padding, zigzag order, one slice per device)
and compares outputs and gradients with the single-device core. ``shard_map`` itself, meshes
and sharded inputs are covered by ``multidevice_cases.py`` in a child process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import luong_attention as la
from luong_attention import parallel as lap
from luong_attention._src.parallel import blocks, sequence
from luong_attention._src.parallel.blocks import Plan
from luong_attention._src.parallel.replicated import replicated_attention_shards
from luong_attention._src.parallel.ring import ring_attention_shards
from luong_attention._src.primitives.scores import ScoreParams

AXIS = "devices"
TOL = {"rtol": 2e-5, "atol": 2e-5}
SCALE, WEIGHT = 0.7, 1.3


def _inputs(batch: int, q_length: int, kv_length: int, seed: int = 0):
    """query [B, Tq, 5], key [B, Tv, 5], value [B, Tv, 3], a value mask with a fully masked
    batch row and a row whose first keys are masked, and an output cotangent."""
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, q_length, 5)).astype(np.float32)
    key = rng.normal(size=(batch, kv_length, 5)).astype(np.float32)
    value = rng.normal(size=(batch, kv_length, 3)).astype(np.float32)
    value_mask = rng.random((batch, kv_length)) > 0.4
    value_mask[0] = False
    value_mask[-1, :3] = False
    value_mask[-1, 3] = True
    cotangent = rng.normal(size=(batch, q_length, 3)).astype(np.float32)
    return query, key, value, value_mask, cotangent


def _split(x: np.ndarray, devices: int, parts: int, padded: int, axis: int) -> np.ndarray:
    """Pads ``x`` along ``axis`` (1, the sequence) to ``padded``, puts it in zigzag order when
    ``parts == 2`` and cuts it into one slice per device: ``[devices, B, padded / n, ...]``."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded - x.shape[axis])
    x = np.pad(x, widths)
    if parts == 2:
        x = np.asarray(lap.to_zigzag(x, devices, axis=axis))
    return np.stack(np.split(x, devices, axis=axis))


def _join(x: jax.Array, devices: int, parts: int, length: int) -> jax.Array:
    """Inverse of :func:`_split` for ``[devices, B, rows, ...]`` results."""
    x = jnp.concatenate(list(x), axis=1)
    if parts == 2:
        x = lap.from_zigzag(x, devices, axis=1)
    return x[:, :length]


def _ring(
    score_mode, causal, devices, parts, query, key, value, value_mask, cotangent, kernel="blocked"
):
    """Output and (query, key, value, scale, weight) gradients of the ring, vmapped."""
    q_length, kv_length = query.shape[1], key.shape[1]
    q_chunk, kv_chunk = (-(-t // (devices * parts)) for t in (q_length, kv_length))
    plan = Plan(AXIS, devices, parts, q_chunk, kv_chunk, kv_length, score_mode, causal, kernel)
    q_pad, kv_pad = devices * parts * q_chunk, devices * parts * kv_chunk
    shards = (
        _split(query, devices, parts, q_pad, 1),
        _split(key, devices, parts, kv_pad, 1),
        _split(value, devices, parts, kv_pad, 1),
        _split(value_mask, devices, parts, kv_pad, 1),
        _split(cotangent, devices, parts, q_pad, 1),
    )

    def local(q, k, v, scale, weight, mask, ct):
        q, k, w = ScoreParams(score_mode, scale, weight).fold(q, k, jnp.float32)
        out = ring_attention_shards(plan, q, k, v, w, mask)
        return jnp.sum(out * ct), out

    grad = jax.grad(local, argnums=(0, 1, 2, 3, 4), has_aux=True)
    in_axes = (0, 0, 0, None, None, 0, 0)
    (dq, dk, dv, dscale, dweight), out = jax.jit(jax.vmap(grad, in_axes, axis_name=AXIS))(
        *shards[:3], jnp.float32(SCALE), jnp.float32(WEIGHT), *shards[3:]
    )
    joined = (_join(x, devices, parts, t) for x, t in ((out, q_length), (dq, q_length)))
    out, dq = joined
    dk, dv = (_join(x, devices, parts, kv_length) for x in (dk, dv))
    return out, (dq, dk, dv, dscale.sum(), dweight.sum())


def _replicated(
    score_mode, causal, devices, query, key, value, value_mask, cotangent, kernel="blocked"
):
    """The same for replicated queries (every device holds all queries)."""
    q_length, kv_length = query.shape[1], key.shape[1]
    kv_chunk = -(-kv_length // devices)
    plan = Plan(AXIS, devices, 1, q_length, kv_chunk, kv_length, score_mode, causal, kernel)
    kv_pad = devices * kv_chunk
    key, value, mask = (_split(x, devices, 1, kv_pad, 1) for x in (key, value, value_mask))

    def local(q, k, v, scale, weight, mask):
        q, k, w = ScoreParams(score_mode, scale, weight).fold(q, k, jnp.float32)
        out = replicated_attention_shards(plan, q, k, v, w, mask)
        # The output is replicated: each device counts 1/n of the loss, as shard_map's
        # transpose hands each device 1/n of a replicated output's cotangent.
        return jnp.sum(out * cotangent) / devices, out

    grad = jax.grad(local, argnums=(0, 1, 2, 3, 4), has_aux=True)
    in_axes = (None, 0, 0, None, None, 0)
    (dq, dk, dv, dscale, dweight), out = jax.jit(jax.vmap(grad, in_axes, axis_name=AXIS))(
        query, key, value, jnp.float32(SCALE), jnp.float32(WEIGHT), mask
    )
    for device_out in out[1:]:
        np.testing.assert_array_equal(device_out, out[0])  # the same on every device
    dk, dv = (_join(x, devices, 1, kv_length) for x in (dk, dv))
    return out[0], (dq.sum(0), dk, dv, dscale.sum(), dweight.sum())


def _core(score_mode, causal, query, key, value, value_mask, cotangent):
    """Output and gradients of the single-device core."""

    def loss(q, k, v, scale, weight):
        extra = {"concat_score_weight": weight} if score_mode == "concat" else {}
        out = la.attention(
            q,
            v,
            k,
            value_mask=value_mask,
            use_causal_mask=causal,
            score_mode=score_mode,
            scale=scale,
            **extra,
        )
        return jnp.sum(out * cotangent), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        query, key, value, jnp.float32(SCALE), jnp.float32(WEIGHT)
    )
    return out, grads


def _assert_close(got, want):
    out, grads = got
    ref_out, ref_grads = want
    np.testing.assert_allclose(out, ref_out, **TOL)
    for name, g, r in zip(
        ("query", "key", "value", "scale", "weight"), grads, ref_grads, strict=True
    ):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, r, **TOL, err_msg=name)


# (score_mode, causal, devices, layout, q_length, kv_length): Tq != Tv, lengths that do not
# divide (slices of padding only: 11 keys on 8 devices), zigzag, both modes, causal or not.
# Two of them, each like another in the default run, in `pytest -m slow` only (time).
RING_CASES = [
    ("dot", False, 2, "contiguous", 12, 9),
    pytest.param("dot", True, 4, "contiguous", 7, 11, marks=pytest.mark.slow),
    ("concat", True, 8, "contiguous", 9, 11),
    ("concat", True, 2, "zigzag", 12, 8),
    ("dot", True, 4, "zigzag", 16, 24),
    pytest.param("concat", False, 3, "zigzag", 18, 12, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("score_mode", "causal", "devices", "layout", "tq", "tv"), RING_CASES)
def test_ring_equals_core(score_mode, causal, devices, layout, tq, tv):
    arrays = _inputs(3, tq, tv)
    parts = 2 if layout == "zigzag" else 1
    got = _ring(score_mode, causal, devices, parts, *arrays)
    _assert_close(got, _core(score_mode, causal, *arrays))


# (score_mode, causal, devices, q_length, kv_length)
REPLICATED_CASES = [
    ("dot", False, 2, 4, 12),
    ("dot", True, 4, 7, 11),
    ("concat", True, 8, 5, 11),
    ("concat", False, 3, 6, 13),
]


@pytest.mark.parametrize(("score_mode", "causal", "devices", "tq", "tv"), REPLICATED_CASES)
def test_replicated_equals_core(score_mode, causal, devices, tq, tv):
    arrays = _inputs(2, tq, tv, seed=3)
    got = _replicated(score_mode, causal, devices, *arrays)
    _assert_close(got, _core(score_mode, causal, *arrays))


@pytest.mark.parametrize("strategy", ["ring", "replicated"])
@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_fully_masked_rows_in_several_chunks(monkeypatch, strategy, score_mode):
    """The fully-masked-row path with 2 queries per chunk (several chunks, the last one
    padded), the only path of rows that see no key; scores of +-40 make the core's
    ``score - 1e9`` round to multiples of 64, so the fill is not a plain mean."""
    tq, tv, devices = 7, 11, 4
    keys_per_device = -(-tv // devices)
    per_query = keys_per_device * (5 if score_mode == "concat" else 1)
    monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 2 * per_query)
    query, key, value, value_mask, cotangent = _inputs(3, tq, tv, seed=5)
    query = 40.0 * query
    arrays = (query, key, value, value_mask, cotangent)
    if strategy == "ring":
        got = _ring(score_mode, True, devices, 1, *arrays)
    else:
        got = _replicated(score_mode, True, devices, *arrays)
    want = _core(score_mode, True, *arrays)
    if score_mode == "dot":
        assert np.abs(want[0][0] - value[0].mean(0)).max() > 1e-2  # really not the plain mean
    _assert_close(got, want)


# An accelerator kernel as each step's kernel (what the strategies pick on GPUs and TPUs:
# sequence.step_kernel): the Pallas GPU kernel, interpreted. (The TPU kernel's interpret mode
# has IO effects, which vmap cannot batch under the strategies' lax.cond, and it aborts under
# shard_map on host devices; its ring-style use, key blocks merged and the backward from
# merged statistics, is tested in tests/library/kernels/test_pallas_tpu.py.)
@pytest.mark.parametrize("strategy", ["ring", "replicated"])
def test_strategies_run_the_pallas_gpu_kernel(strategy):
    """Causal "dot" with a fully masked row and padding keys (11 keys on 2 devices)."""
    arrays = _inputs(2, 6, 11, seed=7)
    kernel = "pallas_gpu_interpret"
    if strategy == "ring":
        got = _ring("dot", True, 2, 1, *arrays, kernel=kernel)
    else:
        got = _replicated("dot", True, 2, *arrays, kernel=kernel)
    _assert_close(got, _core("dot", True, *arrays))


@pytest.mark.parametrize(
    ("backend", "kernel"), [("cpu", "blocked"), ("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")]
)
def test_each_step_runs_the_backends_kernel(monkeypatch, backend, kernel):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert sequence.step_kernel("dot") == kernel
    assert sequence.step_kernel("concat") == "blocked"


# Forward mode and second order (issue 19): the strategies as functions of the whole
# arrays, laid out with jnp so that JAX differentiates through the layout, against the dense
# XLA core. Sizes all distinct: B=2, Tq, Tv, depth 5, dim_v 3 (see _inputs).
JVP_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _layout(x: jax.Array, devices: int, parts: int, padded: int) -> jax.Array:
    """:func:`_split` in ``jnp`` (differentiable), along axis 1."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, padded - x.shape[1])
    x = jnp.pad(x, widths)
    if parts == 2:
        x = lap.to_zigzag(x, devices, axis=1)
    return jnp.stack(jnp.split(x, devices, axis=1))


def _ring_attention(score_mode, causal, devices, parts, value_mask, q_length, kv_length):
    """``(query, key, value, scale, weight) -> output`` of the ring, devices vmapped."""
    q_chunk, kv_chunk = (-(-t // (devices * parts)) for t in (q_length, kv_length))
    plan = Plan(AXIS, devices, parts, q_chunk, kv_chunk, kv_length, score_mode, causal)
    q_pad, kv_pad = devices * parts * q_chunk, devices * parts * kv_chunk
    mask = _layout(jnp.asarray(value_mask), devices, parts, kv_pad)

    def local(q, k, v, scale, weight, mask):
        q, k, w = ScoreParams(score_mode, scale, weight).fold(q, k, jnp.float32)
        return ring_attention_shards(plan, q, k, v, w, mask)

    def attention(query, key, value, scale, weight):
        shards = (
            _layout(query, devices, parts, q_pad),
            _layout(key, devices, parts, kv_pad),
            _layout(value, devices, parts, kv_pad),
        )
        in_axes = (0, 0, 0, None, None, 0)
        out = jax.vmap(local, in_axes, axis_name=AXIS)(*shards, scale, weight, mask)
        return _join(out, devices, parts, q_length)

    return attention


def _replicated_attention(score_mode, causal, devices, value_mask, q_length, kv_length):
    """``(query, key, value, scale, weight) -> output`` of every device, ``[devices, B, Tq,
    dim_v]``, replicated queries, devices vmapped."""
    kv_chunk = -(-kv_length // devices)
    plan = Plan(AXIS, devices, 1, q_length, kv_chunk, kv_length, score_mode, causal)
    mask = _layout(jnp.asarray(value_mask), devices, 1, devices * kv_chunk)

    def local(q, k, v, scale, weight, mask):
        q, k, w = ScoreParams(score_mode, scale, weight).fold(q, k, jnp.float32)
        return replicated_attention_shards(plan, q, k, v, w, mask)

    def attention(query, key, value, scale, weight):
        key, value = (_layout(x, devices, 1, devices * kv_chunk) for x in (key, value))
        in_axes = (None, 0, 0, None, None, 0)
        return jax.vmap(local, in_axes, axis_name=AXIS)(query, key, value, scale, weight, mask)

    return attention


def _core_attention(score_mode, causal, value_mask):
    """``(query, key, value, scale, weight) -> output`` of the dense XLA core."""

    def attention(query, key, value, scale, weight):
        extra = {"concat_score_weight": weight} if score_mode == "concat" else {}
        return la.attention(
            query,
            value,
            key,
            value_mask=value_mask,
            use_causal_mask=causal,
            score_mode=score_mode,
            scale=scale,
            implementation="xla",
            **extra,
        )

    return attention


def _primals_and_tangents(batch, tq, tv, seed):
    """Primals ``(query, key, value, scale, weight)``, tangents of the same shapes and the
    value mask (a fully masked batch row)."""
    query, key, value, value_mask, _ = _inputs(batch, tq, tv, seed)
    primals = (query, key, value, np.float32(SCALE), np.float32(WEIGHT))
    rng = np.random.default_rng(seed + 1)
    tangents = tuple(rng.normal(size=np.shape(x)).astype(np.float32) for x in primals)
    return primals, tangents, value_mask


def test_ring_jvp_equals_core():
    """Causal "concat", zigzag on 2 devices (pairs above the diagonal skipped), fully masked
    rows; "dot", contiguous, on 4 devices: multidevice_cases.py through shard_map."""
    score_mode, causal, devices, tq, tv = "concat", True, 2, 12, 8
    primals, tangents, mask = _primals_and_tangents(2, tq, tv, seed=11)
    ring = _ring_attention(score_mode, causal, devices, 2, mask, tq, tv)
    out, d_out = jax.jit(lambda p, t: jax.jvp(ring, p, t))(primals, tangents)
    ref_out, ref_d_out = jax.jvp(_core_attention(score_mode, causal, mask), primals, tangents)
    np.testing.assert_allclose(out, ref_out, **TOL)
    np.testing.assert_allclose(d_out, ref_d_out, **JVP_TOL)


# (score_mode, causal, devices, q_length, kv_length)
def test_replicated_jvp_equals_core():
    """Non-causal "concat" on 3 devices; the output is replicated: its tangent is whole on
    every device."""
    score_mode, causal, devices, tq, tv = "concat", False, 3, 6, 13
    primals, tangents, mask = _primals_and_tangents(2, tq, tv, seed=13)
    replicated = _replicated_attention(score_mode, causal, devices, mask, tq, tv)
    out, d_out = jax.jit(lambda p, t: jax.jvp(replicated, p, t))(primals, tangents)
    ref_out, ref_d_out = jax.jvp(_core_attention(score_mode, causal, mask), primals, tangents)
    for device in range(devices):
        np.testing.assert_allclose(out[device], ref_out, **TOL)
        np.testing.assert_allclose(d_out[device], ref_d_out, **JVP_TOL)


def _hessian_vector(attention, primals, tangents, cotangent, forward):
    """``H t`` of ``<attention(*primals), cotangent>`` for ``t = tangents``: forward over
    reverse (as ``jax.hessian``) or reverse over reverse (the gradient of ``<grad, t>``)."""

    def loss(*args):
        return jnp.sum(attention(*args) * cotangent)

    grad = jax.grad(loss, argnums=range(5))
    if forward:
        return jax.jvp(grad, primals, tangents)[1]

    def directional(*args):
        return sum(jnp.vdot(g, t) for g, t in zip(grad(*args), tangents, strict=True))

    return jax.grad(directional, argnums=range(5))(*primals)


@pytest.mark.parametrize(
    ("strategy", "forward"),
    [
        ("ring", True),
        pytest.param("replicated", False, marks=pytest.mark.slow),
        pytest.param("ring", False, marks=pytest.mark.slow),
    ],
)
def test_second_order_equals_core(strategy, forward):
    """Causal "dot" on 2 devices with fully masked rows and padding keys (9 keys)."""
    tq, tv, devices = 6, 9, 2
    primals, tangents, mask = _primals_and_tangents(2, tq, tv, seed=17)
    cotangent = np.random.default_rng(19).normal(size=(2, tq, 3)).astype(np.float32)
    if strategy == "ring":
        attention = _ring_attention("dot", True, devices, 1, mask, tq, tv)
    else:
        replicated = _replicated_attention("dot", True, devices, mask, tq, tv)

        def attention(*args):
            return replicated(*args).mean(0)

    hvp = jax.jit(_hessian_vector, static_argnums=(0, 4))
    got = hvp(attention, primals, tangents, cotangent, forward)
    core = _core_attention("dot", True, mask)
    want = _hessian_vector(core, primals, tangents, cotangent, forward)
    for name, g, w in zip(("query", "key", "value", "scale", "weight"), got, want, strict=True):
        np.testing.assert_allclose(g, w, **JVP_TOL, err_msg=name)
