"""The Pallas GPU (Triton) kernel: numbers in the Pallas interpreter, programs lowered for CUDA.

Outputs are checked against the float64 NumPy loop (``helpers.reference``), gradients against
autodiff of an independent dense float64 formula (:func:`_dense64`) and against the blocked
kernel. Tiles are forced to 16 rows (:func:`small_tiles`), so that several query and key
tiles, padded rows and keys and skipped causal tiles all occur at these tiny sizes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import reference_attention

from luong_attention import Attention, attention, select_implementation
from luong_attention._src.functional.kernel_call import kernel_attention
from luong_attention._src.kernels import pallas_gpu
from luong_attention._src.kernels.registry import get_kernel
from luong_attention._src.primitives.scores import ScoreParams

# (B, Tq, Tv, depth, dim_v): all distinct, lengths and depths odd (padded inside the kernel).
B, TQ, TV, DIM, DIM_V = 2, 37, 29, 5, 7
SCALE = 0.7
F32 = {"atol": 2e-6, "rtol": 1e-5}
F32_GRAD = {"atol": 2e-5, "rtol": 1e-4}
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def small_tiles(monkeypatch):
    """16-row tiles (the smallest Triton takes) instead of the default 64."""
    monkeypatch.setattr(pallas_gpu, "DEFAULT_BLOCK", 16)


def _inputs(seed=0, batch=(B,), tq=TQ, tv=TV, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(*batch, tq, DIM)), dtype)
    k = jnp.asarray(rng.normal(size=(*batch, tv, DIM)), dtype)
    v = jnp.asarray(rng.normal(size=(*batch, tv, DIM_V)), dtype)
    return q, k, v


def _value_mask(seed=1, batch=(B,), tv=TV):
    """Random keys masked; example 0 has none visible (a fully masked row, Keras's mean)."""
    mask = np.random.default_rng(seed).random((*batch, tv)) > 0.4
    mask.reshape(-1, tv)[0] = False
    return jnp.asarray(mask)


def _dense64(q, k, v, scale, value_mask, causal, q_offset=0, kv_offset=0):
    """Keras attention written densely (scores, ``- 1e9`` at masked keys, softmax, weighted
    sum) for float64 autodiff; the causal mask on global positions. The penalty is applied
    in float32 as Keras does (``helpers.reference`` too), so that a fully masked row is
    Keras's near-uniform one."""
    s = jnp.einsum("...qd,...kd->...qk", q * scale, k)
    rows = q_offset + jnp.arange(q.shape[-2])[:, None]
    allowed = (kv_offset + jnp.arange(k.shape[-2])[None, :] <= rows) | (not causal)
    if value_mask is not None:
        allowed = allowed & value_mask[..., None, :]
    penalised = (s.astype(jnp.float32) - 1e9).astype(s.dtype)
    weights = jax.nn.softmax(jnp.where(allowed, s, penalised), axis=-1)
    return jnp.einsum("...qk,...kv->...qv", weights, v)


def _cotangent(shape):
    """A fixed non-uniform cotangent, so that every gradient term is exercised."""
    return jnp.cos(jnp.arange(np.prod(shape)).reshape(shape))


def _grads(fn, q, k, v, scale):
    """``(out, (dq, dk, dv, dscale))`` of ``sum(fn(q, k, v, scale) * cotangent)``."""

    def loss(q, k, v, scale):
        out = fn(q, k, v, scale)
        return (out.astype(jnp.float32) * _cotangent(out.shape)).sum(), out

    # One compiled program instead of op-by-op dispatch of the interpreted kernel.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, out), grads = value_and_grad(q, k, v, scale)
    return out, grads


def _reference_grads(q, k, v, value_mask, causal, q_offset=0, kv_offset=0):
    """float64 gradients of the same loss, by autodiff of :func:`_dense64`."""
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        mask = None if value_mask is None else jnp.asarray(value_mask)

        def loss(q, k, v, scale):
            out = _dense64(q, k, v, scale, mask, causal, q_offset, kv_offset)
            return (out * _cotangent(out.shape).astype(jnp.float64)).sum()

        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, jnp.float64(SCALE))
        return [np.asarray(g) for g in grads]


def _attention(implementation, value_mask, causal):
    def fn(q, k, v, scale):
        return attention(
            q,
            v,
            k,
            value_mask=value_mask,
            use_causal_mask=causal,
            scale=scale,
            implementation=implementation,
        )

    return fn


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize(
    ("masked", "causal", "batch"),
    [
        (False, False, (B,)),  # no mask: padded keys only
        (True, False, (B,)),  # a fully masked row
        (True, True, (B,)),  # causal, Tq != Tv, fully masked rows: no tile skipped for them
        (False, True, (3, B)),  # two batch dims, causal tiles above the diagonal skipped
    ],
)
def test_forward_and_gradients_match_float64_and_blocked(masked, causal, batch):
    q, k, v = _inputs(batch=batch)
    value_mask = _value_mask(batch=batch) if masked else None
    out, grads = _grads(_attention("pallas", value_mask, causal), q, k, v, SCALE)
    want, _ = reference_attention(
        q, v, k, value_mask=value_mask, causal=causal, scale=SCALE, score_mode="dot"
    )
    assert out.dtype == jnp.float32 and out.shape == (*batch, TQ, DIM_V)
    np.testing.assert_allclose(out, want, **F32)
    blocked_out, blocked_grads = _grads(_attention("blocked", value_mask, causal), q, k, v, SCALE)
    np.testing.assert_allclose(out, blocked_out, **F32)
    reference = _reference_grads(q, k, v, value_mask, causal)
    for name, got, ref, blocked in zip("qkvs", grads, reference, blocked_grads, strict=True):
        assert got.dtype == jnp.float32 and np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, ref, **F32_GRAD, err_msg=name)
        np.testing.assert_allclose(got, blocked, **F32_GRAD, err_msg=name)


@pytest.mark.parametrize(("q_offset", "kv_offset"), [(3, 5), (21, 0)])
def test_causal_offsets_and_a_shared_value_mask(q_offset, kv_offset):
    """Global positions through the kernel call (as sequence parallelism uses it), 16-row
    tiles, and a ``[1, Tv]`` mask shared by the batch: with ``kv_offset > q_offset`` the first
    queries see no key (fully masked rows, so their tiles visit every key)."""
    q, k, v = _inputs(seed=2)
    value_mask = _value_mask(seed=3, batch=(1,)).at[0, 1:].set(True)
    kernel = get_kernel("pallas_gpu_interpret")

    def fn(q, k, v, scale):
        out, _ = kernel_attention(
            kernel,
            q,
            v,
            k,
            value_mask,
            scores=ScoreParams("dot", scale),
            use_causal_mask=True,
            q_offset=q_offset,
            kv_offset=kv_offset,
            block_q=16,
            block_kv=16,
        )
        return out

    out, grads = _grads(fn, q, k, v, SCALE)
    with jax.enable_x64(True):
        want = _dense64(
            *(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)),
            SCALE,
            value_mask,
            True,
            q_offset,
            kv_offset,
        )
    np.testing.assert_allclose(out, want, **F32)
    reference = _reference_grads(q, k, v, value_mask, True, q_offset, kv_offset)
    for name, got, ref in zip("qkvs", grads, reference, strict=True):
        np.testing.assert_allclose(got, ref, **F32_GRAD, err_msg=name)


@pytest.mark.usefixtures("small_tiles")
def test_bfloat16_operands_with_float32_statistics():
    """bfloat16 inputs multiply as bfloat16 (rounding ``p`` and ``ds`` to bfloat16 before
    their matmuls) and come back as bfloat16. The float64 reference sees the same rounded
    inputs, so the error is the rounding of the weights, of the score gradients and of the
    results, each a relative ``2**-8``: we allow 4 of them, times the largest reference
    magnitude (``4 * 2**-8 * max|ref|``), far below what a wrong mask or schedule gives
    (errors of order ``max|ref|``)."""
    q, k, v = _inputs(seed=4, dtype=jnp.bfloat16)
    value_mask = _value_mask(seed=5)
    out, grads = _grads(_attention("pallas", value_mask, True), q, k, v, SCALE)
    assert out.dtype == jnp.bfloat16
    assert [g.dtype for g in grads[:3]] == [jnp.bfloat16] * 3
    with jax.enable_x64(True):
        want = _dense64(
            *(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)),
            SCALE,
            value_mask,
            True,
        )
    reference = _reference_grads(q, k, v, value_mask, True)
    bf16 = 4 * 2.0**-8
    for name, got, ref in zip("oqkvs", (out, *grads), (want, *reference), strict=True):
        got = np.asarray(got, np.float64)
        np.testing.assert_allclose(got, ref, atol=bf16 * np.abs(ref).max(), rtol=0, err_msg=name)


def _lowered(fn, *args):
    """The StableHLO text of ``fn`` lowered for CUDA from this CPU."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_cuda_as_triton_calls(causal, dtype):
    """Forward (one Triton call), forward plus gradient (three: forward, dK/dV, dQ) and
    forward plus ``jax.jvp`` tangent (two: forward, tangent) of a masked or causal call lower
    for CUDA from this CPU with every kernel a Triton custom call: no Mosaic GPU call, no
    interpreter loop."""
    q, k, v = _inputs(seed=6, dtype=dtype)
    value_mask = None if causal else _value_mask(seed=7)

    def forward(q, k, v):
        return attention(
            q,
            v,
            k,
            value_mask=value_mask,
            use_causal_mask=causal,
            scale=SCALE,
            implementation="pallas",
            pallas_platform="gpu",
        )

    def gradient(q, k, v):
        return jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    def tangent(q, k, v):
        return jax.jvp(forward, (q, k, v), (q, k, v))

    for fn, calls in ((forward, 1), (gradient, 3), (tangent, 2)):
        text = _lowered(fn, q, k, v)
        targets = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
        assert targets == [TRITON_CALL] * calls, targets
        assert "stablehlo.while" not in text  # the interpreter would loop in HLO
    assert "luong_pallas_gpu_tangent" in text  # the tangent pass's kernel


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_dispatch_on_cpu_is_unchanged_and_accelerators_pick_pallas_for_dot(
    monkeypatch, accelerator
):
    q, k, v = _inputs()
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    cpu = [select_implementation(mode, q, k, v) for mode in ("dot", "concat")]
    assert cpu == ["xla", "xla"]
    monkeypatch.setattr(jax, "default_backend", lambda: accelerator)
    assert select_implementation("dot", q, k, v) == "pallas"
    assert select_implementation("concat", q, k, v) == "xla"
    assert select_implementation("dot", q, k, v, dropout_rate=0.1) == "pallas"
    assert select_implementation("dot", q, k, v, return_attention_scores=True) == "xla"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"implementation": "pallas", "score_mode": "concat"},
            "computes score_mode='dot' only ('concat' runs on the blocked kernel)",
        ),
        (
            {"implementation": "pallas", "pallas_platform": "tpu", "score_mode": "concat"},
            "score_mode='dot' only; 'concat' runs on the blocked kernel",
        ),
        ({"implementation": "blocked", "pallas_platform": "gpu"}, "pallas_platform chooses"),
        ({"implementation": "pallas", "pallas_platform": "cuda"}, "Expected None, 'gpu' or"),
        ({"implementation": "triton"}, "Expected None, 'xla', 'blocked' or 'pallas'"),
    ],
)
def test_bad_requests_raise_value_errors(kwargs, message):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=re.escape(message)):
        attention(q, v, k, **kwargs)


@pytest.mark.parametrize("block", [8, 24, 0])
def test_blocks_must_be_triton_tiles(block):
    with pytest.raises(ValueError, match=f"block_q must be a power of two >= 16.*{block}"):
        pallas_gpu.config("dot", TQ, TV, DIM, block_q=block)


def test_default_tiles_clamp_to_the_lengths():
    cfg = pallas_gpu.config("dot", 5, 100, DIM)
    assert (cfg.block_q, cfg.block_kv) == (16, 64)
    cfg = pallas_gpu.config("dot", 37, 29, DIM, block_q=128, block_kv=16)
    assert (cfg.block_q, cfg.block_kv, cfg.n_q, cfg.n_kv) == (64, 16, 1, 2)


def test_the_flax_module_passes_pallas_through():
    """``implementation="pallas"`` passes the module's field checks and runs (interpreted)."""
    q, k, v = _inputs(seed=8)
    layer = Attention(use_scale=True, implementation="pallas")
    variables = layer.init(jax.random.key(0), [q, v, k])
    out = layer.apply(variables, [q, v, k], use_causal_mask=True)
    want, _ = reference_attention(q, v, k, causal=True, scale=1.0, score_mode="dot")
    np.testing.assert_allclose(out, want, **F32)
