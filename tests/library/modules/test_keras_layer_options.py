"""The Keras layer's own constructor options ``implementation``, ``matmul_dtype`` and
``precision``: each is honoured, checked at construction, and kept out of ``get_config()``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import make_masks, random_inputs, reference_attention

import luong_attention as la

B, TQ, TV, DIM, DIM_V = 3, 5, 7, 4, 6  # all distinct
SCALE = 0.63


@pytest.fixture(scope="module")
def ours(keras):
    """The class under test (imported after the ``keras`` fixture set the JAX backend)."""
    from luong_attention.keras import Attention

    return Attention


def _inputs(seed: int) -> list[np.ndarray]:
    return list(random_inputs(seed, (B,), TQ, TV, DIM, DIM_V))


def _built(layer, inputs):
    layer.build([x.shape for x in inputs])
    layer.set_weights([np.float32(SCALE)] * len(layer.weights))
    return layer


def _lowered(layer, inputs, **call_kwargs) -> str:
    """The StableHLO text of the jitted call (forward only)."""

    def call(trainable, inputs):
        return layer.stateless_call(trainable, [], inputs, **call_kwargs)[0]

    trainable = [v.value for v in layer.trainable_variables]
    return jax.jit(call).lower(trainable, inputs).as_text()


def _dots(text: str) -> list[str]:
    return [line for line in text.splitlines() if "dot_general" in line]


def _primitives(layer, inputs, **call_kwargs) -> set[str]:
    """Every primitive of the call's jaxpr, sub-jaxprs (loops, custom derivatives) included."""

    def call(trainable, inputs):
        return layer.stateless_call(trainable, [], inputs, **call_kwargs)[0]

    def walk(jaxpr) -> set[str]:
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        names |= walk(inner)
        return names

    trainable = [v.value for v in layer.trainable_variables]
    return walk(jax.make_jaxpr(call)(trainable, inputs).jaxpr)


def test_options_stay_out_of_the_config(keras, ours):
    config = dict(use_scale=True, score_mode="concat", dropout=0.25, seed=1337, name="attn")
    options = dict(implementation="blocked", matmul_dtype="bfloat16", precision="highest")
    layer, plain = ours(**config, **options), keras.layers.Attention(**config)
    assert (layer.implementation, layer.matmul_dtype, layer.precision) == tuple(options.values())
    assert layer.get_config() == plain.get_config()
    clone = ours.from_config(layer.get_config())
    assert type(clone) is ours and clone.get_config() == plain.get_config()
    assert (clone.implementation, clone.matmul_dtype, clone.precision) == (None, None, None)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"implementation": "flash"}, ValueError, r"implementation='flash'"),
        ({"matmul_dtype": "int8"}, TypeError, "matmul_dtype must be a floating dtype"),
        ({"matmul_dtype": "no-such-dtype"}, TypeError, "no-such-dtype"),
    ],
)
def test_bad_options_raise_at_construction(ours, options, error, match):
    with pytest.raises(error, match=match):
        ours(**options)


@pytest.mark.parametrize("causal", [False, True])
def test_implementation_is_honoured(keras, ours, causal):
    """``"blocked"`` runs the tiled kernel (a loop), ``"xla"`` the dense path; the same numbers
    as each other, as Keras and as the NumPy reference."""
    x = _inputs(1)
    qm, vm = make_masks("both", 1, (B,), TQ, TV)
    kwargs = dict(mask=[qm, vm], use_causal_mask=causal)
    layers = {
        impl: _built(ours(use_scale=True, implementation=impl), x) for impl in ("xla", "blocked")
    }
    assert "while" in _primitives(layers["blocked"], x, **kwargs)
    assert "while" not in _primitives(layers["xla"], x, **kwargs)
    blocked, dense = (np.asarray(layers[impl](x, **kwargs)) for impl in ("blocked", "xla"))
    plain = _built(keras.layers.Attention(use_scale=True), x)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(dense, plain(x, **kwargs), rtol=1e-5, atol=2e-6)
    ref, _ = reference_attention(*x, query_mask=qm, value_mask=vm, causal=causal, scale=SCALE)
    np.testing.assert_allclose(blocked, ref, rtol=1e-5, atol=2e-6)
    # The weights are dense: asking for them on the blocked path still gives Keras's.
    _, weights = layers["blocked"](x, return_attention_scores=True, **kwargs)
    _, plain_weights = plain(x, return_attention_scores=True, **kwargs)
    np.testing.assert_allclose(weights, plain_weights, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("implementation", ["xla", "blocked"])
def test_matmul_dtype_is_honoured(ours, implementation):
    """float32 inputs with ``matmul_dtype="bfloat16"``: bfloat16 x bfloat16 -> float32 dots;
    with ``"float32"`` under ``mixed_bfloat16``, no bfloat16 operand reaches a dot."""
    x = _inputs(2)
    low = _built(ours(use_scale=True, implementation=implementation, matmul_dtype="bfloat16"), x)
    dots = _dots(_lowered(low, x))
    mixed = [line for line in dots if line.split("->")[0].count("xbf16>") == 2]
    assert len(mixed) >= 2, dots  # query-key and weights-value
    assert all(line.split("->")[-1].strip().endswith("xf32>") for line in mixed), mixed
    wide = ours(
        use_scale=True, implementation=implementation, matmul_dtype="float32",
        dtype="mixed_bfloat16",
    )  # fmt: skip
    dots = _dots(_lowered(_built(wide, x), x))
    assert dots and not any("bf16" in line.split("->")[0] for line in dots), dots
    # Same numbers as float32 operands, up to the bfloat16 rounding of the operands.
    full = _built(ours(use_scale=True, implementation=implementation), x)
    np.testing.assert_allclose(low(x), full(x), rtol=0.05, atol=0.05)
    assert not np.array_equal(np.asarray(low(x)), np.asarray(full(x)))


def test_precision_is_honoured(ours):
    x = _inputs(3)
    highest = _built(ours(implementation="xla", precision="highest"), x)
    default = _built(ours(implementation="xla"), x)
    assert all("precision = [HIGHEST, HIGHEST]" in line for line in _dots(_lowered(highest, x)))
    assert not any("HIGHEST" in line for line in _dots(_lowered(default, x)))
    np.testing.assert_allclose(highest(x), default(x), rtol=1e-5, atol=1e-6)


def test_options_match_the_flax_module(keras, ours):
    """The same options on the linen module give the same numbers (one call path)."""
    x = _inputs(4)
    _, vm = make_masks("value", 4, (B,), TQ, TV)
    options = dict(implementation="blocked", matmul_dtype=jnp.bfloat16, precision="highest")
    layer = _built(ours(use_scale=True, **options), x)
    module = la.Attention(use_scale=True, **options)
    want = module.apply({"params": {"scale": jnp.float32(SCALE)}}, x, mask=[None, vm])
    np.testing.assert_array_equal(layer(x, mask=[None, vm]), want)
