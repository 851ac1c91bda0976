"""``luong_attention.nnx.Attention`` equals the linen ``Attention``: outputs, weights, gradients,
dropout masks, dtypes and Keras config; and Keras's own layer where that is cheap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.reference import make_masks, random_inputs, reference_attention

import luong_attention as la
from luong_attention import keras_compat
from luong_attention import nnx as lnnx

B, TQ, TV, DIM, DIM_V = 3, 5, 7, 4, 6  # all distinct
PARAMS = {"scale": 0.63, "concat_score_weight": 1.7}
# (use_scale, score_mode): every parameter set.
VARIANTS = [(False, "dot"), (True, "dot"), (False, "concat"), (True, "concat")]


def _inputs(seed: int) -> list[np.ndarray]:
    return list(random_inputs(seed, (B,), TQ, TV, DIM, DIM_V))


def _pair(**kwargs) -> tuple[lnnx.Attention, la.Attention, dict]:
    """``(nnx module, linen module, linen variables)`` with the same non-trivial parameters."""
    module, linen = lnnx.Attention(**kwargs), la.Attention(**kwargs)
    names = keras_compat.keras_weight_names(linen)
    for name in names:
        getattr(module, name).set_value(jnp.asarray(PARAMS[name], module.param_dtype))
    params = {name: jnp.asarray(PARAMS[name], linen.param_dtype) for name in names}
    return module, linen, {"params": params}


@pytest.mark.parametrize(("use_scale", "score_mode"), VARIANTS)
def test_parameters_exist_only_when_used(use_scale, score_mode):
    module = lnnx.Attention(use_scale=use_scale, score_mode=score_mode)
    linen = la.Attention(use_scale=use_scale, score_mode=score_mode)
    state = nnx.state(module, nnx.Param)
    variables = linen.init(jax.random.key(0), _inputs(0))
    assert set(state) == set(variables.get("params", {}))
    for name in state:
        assert state[name].shape == () and state[name].dtype == jnp.float32
        assert state[name][...] == 1.0
    assert (module.scale is None) == (not use_scale)
    assert (module.concat_score_weight is None) == (score_mode != "concat")


@pytest.mark.parametrize(("use_scale", "score_mode"), VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_outputs_and_weights_equal_linen_and_reference(use_scale, score_mode, causal):
    module, linen, variables = _pair(use_scale=use_scale, score_mode=score_mode)
    x = _inputs(1)
    qm, vm = make_masks("both", 1, (B,), TQ, TV)
    kwargs = dict(mask=[qm, vm], use_causal_mask=causal, return_attention_scores=True)
    got = module(x, **kwargs)
    want = linen.apply(variables, x, **kwargs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    ref = reference_attention(
        *x,
        query_mask=qm,
        value_mask=vm,
        causal=causal,
        score_mode=score_mode,
        scale=PARAMS["scale"] if use_scale else None,
        concat_score_weight=PARAMS["concat_score_weight"] if score_mode == "concat" else None,
    )
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_gradients_equal_linen(score_mode):
    """Gradients w.r.t. ``scale``, ``concat_score_weight`` and every input, under jit."""
    module, linen, variables = _pair(use_scale=True, score_mode=score_mode)
    x = _inputs(2)
    _, vm = make_masks("value", 2, (B,), TQ, TV)
    cotangent = np.random.default_rng(3).standard_normal((B, TQ, DIM_V)).astype(np.float32)

    def nnx_loss(module, x):
        return jnp.sum(module(x, mask=[None, vm], use_causal_mask=True) * cotangent)

    def linen_loss(variables, x):
        out = linen.apply(variables, x, mask=[None, vm], use_causal_mask=True)
        return jnp.sum(out * cotangent)

    nnx_grads, nnx_x = nnx.jit(nnx.grad(nnx_loss, argnums=(0, 1)))(module, x)
    linen_grads, linen_x = jax.jit(jax.grad(linen_loss, argnums=(0, 1)))(variables, x)
    for name, grad in linen_grads["params"].items():
        assert float(jnp.abs(grad)) > 0, name
        np.testing.assert_allclose(nnx_grads[name][...], grad, rtol=1e-6, atol=1e-7)
    for g, w in zip(nnx_x, linen_x, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def _linen_stream_key(linen: la.Attention, key: jax.Array) -> jax.Array:
    """The key the linen module draws from ``rngs={"dropout": key}``."""
    return linen.apply({}, rngs={"dropout": key}, method=lambda m: m.make_rng("dropout"))


@pytest.mark.parametrize("seed", [None, 11])
def test_dropout_with_the_same_key_drops_what_linen_drops(seed):
    module, linen, variables = _pair(dropout=0.4, seed=seed)
    x = _inputs(4)
    qm, vm = make_masks("both", 4, (B,), TQ, TV)
    kwargs = dict(mask=[qm, vm], training=True, return_attention_scores=True)
    want = linen.apply(variables, x, rngs={"dropout": jax.random.key(5)}, **kwargs)
    got = module(x, rngs=_linen_stream_key(linen, jax.random.key(5)), **kwargs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert (np.asarray(got[1]) == 0).any()  # some weights were dropped
    plain = module(x, mask=[qm, vm], return_attention_scores=True)
    assert not np.array_equal(got[1], plain[1])


def test_dropout_keys_from_the_constructor_stream_and_the_call():
    x = _inputs(6)
    module = lnnx.Attention(dropout=0.5, seed=3, rngs=nnx.Rngs(dropout=0))
    first, second = (module(x, training=True, return_attention_scores=True)[1] for _ in "ab")
    assert not np.array_equal(first, second)  # the stream advances
    again = lnnx.Attention(dropout=0.5, seed=3, rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(again(x, training=True, return_attention_scores=True)[1], first)
    other_seed = lnnx.Attention(dropout=0.5, seed=4, rngs=nnx.Rngs(dropout=0))
    assert not np.array_equal(other_seed(x, training=True, return_attention_scores=True)[1], first)
    # A key at the call wins; with seed folded in as linen folds it.
    key = jax.random.key(9)
    by_key = module(x, training=True, rngs=key, return_attention_scores=True)[1]
    _, expected = la.attention(
        x[0],
        x[1],
        x[2],
        dropout_rate=0.5,
        dropout_rng=jax.random.fold_in(key, 3),
        return_attention_scores=True,
    )
    np.testing.assert_array_equal(by_key, expected)
    # Off without training, and then no key is needed.
    bare = lnnx.Attention(dropout=0.5)
    np.testing.assert_array_equal(bare(x), lnnx.Attention()(x))
    with pytest.raises(ValueError, match=r"needs a dropout key: pass rngs="):
        bare(x, training=True)
    with pytest.raises(TypeError, match="rngs must be"):
        bare(x, training=True, rngs=3)


def test_jitted_train_step_draws_fresh_masks():
    module = lnnx.Attention(dropout=0.5, rngs=nnx.Rngs(dropout=1))
    x = _inputs(7)
    step = nnx.jit(lambda m, x: m(x, training=True, return_attention_scores=True)[1])
    assert not np.array_equal(step(module, x), step(module, x))


def test_bfloat16_dtype_and_matmul_operands_equal_linen():
    """``dtype=bfloat16`` with float32 parameters, on both forced operand paths."""
    x = _inputs(8)
    _, vm = make_masks("value", 8, (B,), TQ, TV)
    for matmul_dtype in (jnp.float32, jnp.bfloat16):
        module, linen, variables = _pair(
            use_scale=True, dtype=jnp.bfloat16, matmul_dtype=matmul_dtype
        )
        assert module.scale.dtype == jnp.float32
        got = module(x, mask=[None, vm], return_attention_scores=True)
        want = linen.apply(variables, x, mask=[None, vm], return_attention_scores=True)
        assert got[0].dtype == got[1].dtype == jnp.bfloat16
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    text = jax.jit(lambda x: module(x)).lower(x).as_text()
    assert any(
        "dot_general" in line and line.split("->")[0].count("xbf16>") == 2
        for line in text.splitlines()
    )


def test_blocked_implementation_equals_xla():
    x = _inputs(9)
    qm, vm = make_masks("both", 9, (B,), TQ, TV)
    outs = [
        lnnx.Attention(use_scale=True, implementation=impl)(x, mask=[qm, vm], use_causal_mask=True)
        for impl in ("xla", "blocked")
    ]
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-6, rtol=1e-6)


CONFIGS = [
    {"use_scale": True, "score_mode": "concat", "dropout": 0.5, "seed": 1337},
    {"score_mode": "dot"},
    {"use_scale": True, "dtype": jnp.bfloat16},
    {"dtype": jnp.float16, "param_dtype": jnp.float16},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_keras_config_round_trips_as_linen(kwargs):
    module = lnnx.Attention(**kwargs, implementation="blocked", matmul_dtype=jnp.float32)
    config = keras_compat.keras_config(module)
    assert config == keras_compat.keras_config(la.Attention(**kwargs))
    back = keras_compat.from_keras_config(config, lnnx.Attention)
    assert type(back) is lnnx.Attention and keras_compat.keras_config(back) == config
    assert (back.implementation, back.matmul_dtype) == (None, None)  # not in the config


def test_keras_layer_config_and_weights_give_keras_numbers(keras):
    k_layer = keras.layers.Attention(use_scale=True, score_mode="concat")
    x = _inputs(10)
    k_layer(x)  # build
    k_layer.set_weights([np.float32(PARAMS["scale"]), np.float32(PARAMS["concat_score_weight"])])
    module = keras_compat.from_keras_config(k_layer.get_config(), lnnx.Attention)
    for name, weight in zip(
        keras_compat.keras_weight_names(module), k_layer.get_weights(), strict=True
    ):
        getattr(module, name).set_value(jnp.asarray(weight))
    qm, vm = make_masks("both", 10, (B,), TQ, TV)
    kwargs = dict(mask=[qm, vm], use_causal_mask=True, return_attention_scores=True)
    for g, w in zip(module(x, **kwargs), k_layer(x, **kwargs), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"score_mode": "general"}, ValueError, r"Expected one of \{'dot', 'concat'\}"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\)"),
        ({"implementation": "flash"}, ValueError, "implementation='flash'"),
        ({"matmul_dtype": jnp.int8}, TypeError, "matmul_dtype must be a floating dtype"),
        ({"sequence_axis": "sp"}, ValueError, "needs both mesh and sequence_axis"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        lnnx.Attention(**kwargs)
    with pytest.raises(error, match=match):
        la.Attention(**kwargs)


def test_inside_an_nnx_model_and_under_vmap():
    """Unbatched inputs under ``jax.vmap`` equal the batched call; the module composes."""

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = nnx.Linear(DIM, DIM, rngs=rngs)
            self.attend = lnnx.Attention(use_scale=True)

        def __call__(self, query, value, key):
            return self.attend([self.proj(query), value, key])

    model = Model(nnx.Rngs(0))
    q, v, k = _inputs(11)
    batched = model(q, v, k)
    mapped = jax.vmap(lambda q, v, k: model(q, v, k))(q, v, k)
    np.testing.assert_allclose(mapped, batched, atol=1e-6)
    assert batched.shape == (B, TQ, DIM_V)
