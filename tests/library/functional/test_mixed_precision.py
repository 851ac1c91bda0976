"""Mixed precision: bfloat16/float16 inputs, low-precision matmul operands, float32 statistics.

The accuracy contract, on both paths and both operand choices, each forced with
``matmul_dtype`` (the low-precision operands that GPUs, TPUs and AMX/AVX-512 BF16 CPUs use,
and the float32 operands picked on CPUs without matrix units for the dtype), against a float64 reference computed from the *rounded* inputs:

* nothing is NaN or inf, in the output or the gradients;
* the output's rms error is at most twice that of an independent NumPy emulation of the
  FlashAttention recipe (float32 scores and softmax from the rounded inputs, weights rounded
  to the input dtype for the value product, float32 sum, output rounded), which is what
  torch's CPU ``scaled_dot_product_attention`` does for bfloat16 (the benchmark reports
  torch's own error where torch is installed);
* the max error of the output and of every gradient never exceeds that of Keras's own layer
  under the same dtype policy (which runs its softmax in that dtype);
* blocked == dense within ``LOW_PRECISION_TOL`` (below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import KERAS_PENALTY

import luong_attention as la

B, TQ, TV, DIM, DIM_V = 2, 40, 56, 24, 20
BLOCKS = {"block_q": 16, "block_kv": 24}  # several tiles in both directions
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
# blocked vs dense on the same low-precision inputs: max |difference| relative to max |out|
# (two roundings of the weights in different tile orders; 2**-7 is bfloat16's epsilon).
LOW_PRECISION_TOL = {"bfloat16": 2.0**-6, "float16": 2.0**-9}
# (score_mode, mask kind, causal): masks "none", "lengths" (right padding) and "full" (the
# first example fully masked).
# The default run keeps one masked causal case per mode; the rest run with `pytest -m slow`.
_SLOW = pytest.mark.slow
CASES = [
    pytest.param("dot", "none", False, marks=_SLOW),
    pytest.param("dot", "lengths", False, marks=_SLOW),
    ("dot", "lengths", True),
    pytest.param("dot", "full", False, marks=_SLOW),
    ("concat", "lengths", True),
    pytest.param("concat", "none", False, marks=_SLOW),
]


def _inputs(dtype, seed: int = 0, spread: float = 1.0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, TQ, DIM)) * spread
    k = rng.normal(size=(B, TV, DIM)) * spread
    v = rng.normal(size=(B, TV, DIM_V))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _mask(kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    lengths = np.array([0 if kind == "full" else TV - 9, TV - 21])
    return np.arange(TV)[None, :] < lengths[:, None]


def _full_mask(kind: str, causal: bool) -> np.ndarray:
    """The bool ``[B, TQ, TV]`` mask the scores see."""
    mask = np.ones((B, TQ, TV), bool)
    value_mask = _mask(kind)
    if value_mask is not None:
        mask &= value_mask[:, None, :]
    if causal:
        mask &= np.tril(np.ones((TQ, TV), bool))[None]
    return mask


def _keras_fill(s: np.ndarray) -> np.ndarray:
    """Keras's masked score, ``score - 1e9`` in float32 (so a fully masked row is a softmax of
    scores rounded to float32's spacing of 64 there), as float64."""
    return (s.astype(np.float32) - KERAS_PENALTY).astype(np.float64)


def _ref_forward_backward(q, k, v, g, mode: str, mask: np.ndarray):
    """float64 attention and its gradients (loss ``sum(out * g)``), written out in NumPy."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    if mode == "dot":
        s = q @ np.swapaxes(k, -1, -2)
    else:
        tanh = np.tanh(q[:, :, None, :] + k[:, None, :, :])
        s = tanh.sum(-1)
    s = np.where(mask, s, _keras_fill(s))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dv = np.swapaxes(p, -1, -2) @ g
    dp = g @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if mode == "dot":
        dq, dk = ds @ k, np.swapaxes(ds, -1, -2) @ q
    else:
        inner = ds[..., None] * (1.0 - tanh**2)
        dq, dk = inner.sum(2), inner.sum(1)
    return out, (dq, dk, dv)


def _flash_emulation(q, k, v, mode: str, mask: np.ndarray, dtype) -> np.ndarray:
    """The FlashAttention/torch recipe in NumPy: float32 scores and softmax from the rounded
    inputs, the weights rounded to ``dtype`` for the value product, float32 sum, rounded."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    if mode == "dot":
        s = q @ np.swapaxes(k, -1, -2)
    else:
        s = np.tanh(q[:, :, None, :] + k[:, None, :, :]).sum(-1)
    s = np.where(mask, s, _keras_fill(s)).astype(np.float32)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dtype).astype(np.float32)
    return (p @ v).astype(dtype).astype(np.float64)


def _ours(q, k, v, g, mode, kind, causal, implementation, matmul_dtype):
    """Our output and gradients, as float64 NumPy arrays."""
    blocks = BLOCKS if implementation == "blocked" else {}

    def run(q, k, v):
        if implementation == "blocked":
            out, _ = la.blocked_attention_with_lse(
                q,
                v,
                k,
                value_mask=_mask(kind),
                use_causal_mask=causal,
                score_mode=mode,
                matmul_dtype=matmul_dtype,
                **blocks,
            )
            return out.astype(q.dtype)
        return la.attention(
            q,
            v,
            k,
            value_mask=_mask(kind),
            use_causal_mask=causal,
            score_mode=mode,
            implementation=implementation,
            matmul_dtype=matmul_dtype,
        )

    def loss(q, k, v):
        out = run(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * g), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert out.dtype == q.dtype and all(d.dtype == q.dtype for d in grads)
    return np.asarray(out, np.float64), tuple(np.asarray(d, np.float64) for d in grads)


def _keras(keras, q, k, v, g, mode, kind, causal, dtype_name):
    """Keras's own layer under the ``dtype_name`` policy: output and gradients."""
    layer = keras.layers.Attention(score_mode=mode, dtype=dtype_name)
    mask = _mask(kind)
    keras_mask = None if mask is None else [None, jnp.asarray(mask)]

    def loss(q, k, v):
        out = layer([q, v, k], mask=keras_mask, use_causal_mask=causal)
        return jnp.sum(out.astype(jnp.float32) * g), out

    layer([q, v, k], mask=keras_mask)  # builds the weights outside the trace
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return np.asarray(out, np.float64), tuple(np.asarray(d, np.float64) for d in grads)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def _max(x: np.ndarray) -> float:
    return float(np.max(np.abs(x)))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("mode", "kind", "causal"), CASES)
def test_accuracy_contract(keras, dtype_name, mode, kind, causal):
    dtype = DTYPES[dtype_name]
    q, k, v = _inputs(dtype, seed=len(mode) + len(kind) + causal)
    g = jnp.asarray(np.random.default_rng(7).normal(size=(B, TQ, DIM_V)), jnp.float32)
    mask = _full_mask(kind, causal)
    ref_out, ref_grads = _ref_forward_backward(q, k, v, g, mode, mask)
    emulated = _flash_emulation(q, k, v, mode, mask, dtype)
    keras_out, keras_grads = _keras(keras, q, k, v, g, mode, kind, causal, dtype_name)
    results = {}
    for implementation in ("xla", "blocked"):
        # Both operand paths forced: the default (None) depends on the CPU's flags.
        for operands in (dtype, jnp.float32):
            out, grads = _ours(q, k, v, g, mode, kind, causal, implementation, operands)
            label = f"{implementation}/{jnp.dtype(operands).name}"
            for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads), strict=True):
                assert np.isfinite(x).all(), f"{label}: {name} is not finite"
            assert _rms(out - ref_out) <= 2.0 * _rms(emulated - ref_out), label
            assert _max(out - ref_out) <= _max(keras_out - ref_out), label
            for name, ours_d, keras_d, ref_d in zip(
                ("dq", "dk", "dv"), grads, keras_grads, ref_grads, strict=True
            ):
                assert _max(ours_d - ref_d) <= _max(keras_d - ref_d), f"{label}: {name}"
            results[label] = out
    for operands in (dtype, jnp.float32):
        name = jnp.dtype(operands).name
        dense, blocked = results[f"xla/{name}"], results[f"blocked/{name}"]
        assert _max(dense - blocked) <= LOW_PRECISION_TOL[dtype_name] * _max(ref_out)


def test_float16_scores_near_its_limit_stay_finite():
    """Scores far beyond float16's range (about 6e4) in a half-precision call: the scores
    accumulate in float32, so softmax, output and gradients stay finite on both paths."""
    q, k, v = _inputs(jnp.float16, seed=3, spread=60.0)  # |scores| up to ~1e5
    g = jnp.ones((B, TQ, DIM_V), jnp.float32)
    mask = _full_mask("lengths", True)
    ref_out, _ = _ref_forward_backward(q, k, v, g, "dot", mask)
    for implementation in ("xla", "blocked"):
        out, grads = _ours(q, k, v, g, "dot", "lengths", True, implementation, jnp.float16)
        assert all(np.isfinite(x).all() for x in (out, *grads)), implementation
        assert _max(out - ref_out) <= 2.0**-8 * _max(ref_out) * 8, implementation


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_low_precision_operands_reach_the_matmuls(dtype_name):
    """With low-precision operands the compiled program multiplies ``dtype`` matrices into
    float32, in the forward and the backward of both paths (no silent upcast)."""
    dtype = DTYPES[dtype_name]
    q, k, v = _inputs(dtype)

    def loss(q, k, v, implementation):
        out = la.attention(q, v, k, implementation=implementation, matmul_dtype=dtype)
        return jnp.sum(out.astype(jnp.float32))

    for implementation in ("xla", "blocked"):
        text = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
            .lower(q, k, v, implementation)
            .as_text()
        )
        dots = [line for line in text.splitlines() if "dot_general" in line]
        operand = f"x{'bf16' if dtype_name == 'bfloat16' else 'f16'}>"
        # "(tensor<...xbf16>, tensor<...xbf16>) -> tensor<...xf32>"
        low = [line for line in dots if line.split("->")[0].count(operand) == 2]
        assert len(low) >= 5, (implementation, dots)  # 2 forward + 3 backward products
        assert all(line.split("->")[-1].strip().endswith("xf32>") for line in low), low


@pytest.mark.parametrize(
    "flags",
    [
        frozenset({"avx2", "fma"}),
        frozenset({"avx2", "avx512f", "avx512_bf16"}),
        frozenset({"avx2", "amx_bf16", "amx_fp16"}),
    ],
    ids=["avx2", "avx512_bf16", "amx"],
)
def test_float32_operands_are_the_default_only_where_the_cpu_lacks_units(flags, monkeypatch):
    """The automatic operand dtype, on each kind of CPU (its flags patched in): float32 inputs
    always multiply in float32; half inputs multiply in their own dtype off the CPU or with
    the CPU's matrix-unit flags for that dtype."""
    from luong_attention._src.primitives import scores

    monkeypatch.setattr(scores, "_cpu_flags", lambda: flags)
    assert scores.resolve_matmul_dtype(jnp.float32) == jnp.float32
    for name, needed in scores._NATIVE_CPU_FLAGS.items():
        native = jax.default_backend() != "cpu" or bool(needed & flags)
        expected = jnp.dtype(name) if native else jnp.dtype(jnp.float32)
        assert scores.resolve_matmul_dtype(jnp.dtype(name)) == expected
        assert scores.resolve_matmul_dtype(jnp.dtype(name), jnp.float32) == jnp.float32
    with pytest.raises(TypeError, match="matmul_dtype"):
        scores.resolve_matmul_dtype(jnp.float32, jnp.int8)


def test_module_with_bfloat16_dtype_runs_low_precision_matmuls():
    """``Attention(dtype=bfloat16)`` with float32 parameters: bfloat16 output, the matmuls
    on bfloat16 operands when asked, and the same numbers as the functional call."""
    q, k, v = _inputs(jnp.float32)
    layer = la.Attention(use_scale=True, dtype=jnp.bfloat16, matmul_dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), [q, v, k])
    assert variables["params"]["scale"].dtype == jnp.float32
    out = layer.apply(variables, [q, v, k])
    assert out.dtype == jnp.bfloat16
    expected = la.attention(
        *(x.astype(jnp.bfloat16) for x in (q, v, k)), scale=1.0, matmul_dtype=jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    text = jax.jit(layer.apply).lower(variables, [q, v, k]).as_text()
    assert any(
        "dot_general" in line and line.split("->")[0].count("xbf16>") == 2
        for line in text.splitlines()
    )
