"""The Flax ``Attention`` module: parameters, Keras interop, dropout, masks list, tracing."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import make_masks, random_inputs, reference_attention

import luong_attention as la
from luong_attention import Attention, keras_compat

KEY = jax.random.key(0)


def inputs(seed: int = 0, batch=(3,), tq=4, tv=5, dim=2, dim_v=6):
    query, value, key = random_inputs(seed, batch, tq, tv, dim, dim_v)
    return [query, value, key]


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_scale", "score_mode", "names"),
    [
        (False, "dot", ()),
        (True, "dot", ("scale",)),
        (False, "concat", ("concat_score_weight",)),
        (True, "concat", ("scale", "concat_score_weight")),
    ],
)
def test_param_tree_is_exactly_keras(use_scale, score_mode, names):
    layer = Attention(use_scale=use_scale, score_mode=score_mode)
    variables = layer.init(KEY, inputs())
    params = variables.get("params", {})
    assert set(variables) <= {"params"}
    assert tuple(params) == names == keras_compat.keras_weight_names(layer)
    for name in names:
        assert params[name].shape == () and params[name].dtype == jnp.float32
        assert params[name] == 1.0


def test_scale_param_scales_dot_scores():
    """B5 through the module: a loaded scale of 0.5 halves the scores."""
    layer = Attention(use_scale=True)
    q, v, k = inputs(1)
    _, w = layer.apply({"params": {"scale": 0.5}}, [q, v, k], return_attention_scores=True)
    _, r_w = reference_attention(q, v, k, scale=0.5)
    np.testing.assert_allclose(w, r_w, atol=1e-6)


def test_param_dtype_and_dtype():
    layer = Attention(use_scale=True, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    variables = layer.init(KEY, inputs())
    assert variables["params"]["scale"].dtype == jnp.float16
    out, w = layer.apply(variables, inputs(), return_attention_scores=True)
    assert out.dtype == w.dtype == jnp.bfloat16


# -- Keras interop --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_scale", "score_mode"), [(True, "dot"), (False, "concat"), (True, "concat")]
)
def test_keras_weights_load_into_keras(keras, use_scale, score_mode):
    """Ours -> Keras: keras_weights() fed to layer.set_weights gives Keras our numbers."""
    layer = Attention(use_scale=use_scale, score_mode=score_mode)
    values = {"scale": 0.4, "concat_score_weight": 2.5}
    variables = {
        "params": {n: jnp.float32(values[n]) for n in keras_compat.keras_weight_names(layer)}
    }
    k_layer = keras.layers.Attention.from_config(keras_compat.keras_config(layer))
    x = inputs(2)
    k_layer(x)  # build
    k_layer.set_weights(keras_compat.keras_weights(layer, variables))
    assert [w.name for w in k_layer.weights] == list(keras_compat.keras_weight_names(layer))
    qm, vm = make_masks("both", 2, (3,), 4, 5)
    expected = k_layer(x, mask=[qm, vm], use_causal_mask=True, return_attention_scores=True)
    got = layer.apply(
        variables, x, mask=[qm, vm], use_causal_mask=True, return_attention_scores=True
    )
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=0)


def test_from_keras_layer_and_weight_dict(keras):
    """Keras -> ours: from_keras_layer and variables_from_keras(dict) agree."""
    k_layer = keras.layers.Attention(use_scale=True, score_mode="concat", dropout=0.25, seed=7)
    k_layer(inputs(3))
    k_layer.set_weights([np.float32(0.3), np.float32(1.9)])
    module, variables = keras_compat.from_keras_layer(k_layer)
    assert (module.use_scale, module.score_mode, module.dropout, module.seed) == (
        True,
        "concat",
        0.25,
        7,
    )
    np.testing.assert_array_equal(variables["params"]["scale"], np.float32(0.3))
    np.testing.assert_array_equal(variables["params"]["concat_score_weight"], np.float32(1.9))
    by_name = keras_compat.variables_from_keras(
        module, {"scale": 0.3, "concat_score_weight": np.float32(1.9)}
    )
    chex.assert_trees_all_equal(by_name, variables)
    with pytest.raises(ValueError, match="Expected 2 Keras weights"):
        keras_compat.variables_from_keras(module, [0.3])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_scale": True, "score_mode": "concat", "dropout": 0.5, "seed": 1337},
        {"score_mode": "dot", "dropout": 0.0},
        {"use_scale": True, "dtype": jnp.bfloat16},
        {"use_scale": True, "dtype": jnp.float16, "param_dtype": jnp.float16},
        {"dtype": jnp.float32},
    ],
)
def test_config_round_trips_through_keras(keras, kwargs):
    ours = Attention(**kwargs)
    k_layer = keras.layers.Attention.from_config(keras_compat.keras_config(ours))
    assert k_layer.use_scale == ours.use_scale and k_layer.score_mode == ours.score_mode
    assert k_layer.dropout == ours.dropout and k_layer.seed == ours.seed
    back = keras_compat.from_keras_config(k_layer.get_config())
    # Keras has no "infer from inputs" policy: a layer without dtype comes back as float32.
    assert back == (ours.clone(dtype=jnp.float32) if ours.dtype is None else ours)


def test_seed_preserved_in_config(keras):
    """Keras's test_attention_seed_preserved_in_config, both ways."""
    config = keras_compat.keras_config(Attention(dropout=0.5, seed=1337))
    assert config["seed"] == 1337
    assert keras.layers.Attention.from_config(config).seed == 1337
    assert (
        keras_compat.from_keras_config(
            keras.layers.Attention(dropout=0.5, seed=1337).get_config()
        ).seed
        == 1337
    )


def test_mixed_precision_keras_policy(keras):
    k_layer = keras.layers.Attention(use_scale=True, dtype="mixed_bfloat16")
    module = keras_compat.from_keras_config(k_layer.get_config())
    assert module.dtype == jnp.bfloat16 and module.param_dtype == jnp.float32
    assert keras_compat.keras_config(module)["dtype"] == "mixed_bfloat16"
    k_back = keras.layers.Attention.from_config(keras_compat.keras_config(module))
    assert k_back.compute_dtype == "bfloat16" and k_back.variable_dtype == "float32"


def test_config_with_causal_raises():
    """D5: the removed ``causal`` argument is an error, never silently accepted."""
    with pytest.raises(ValueError, match=r"causal.*use_causal_mask"):
        keras_compat.from_keras_config({"use_scale": False, "causal": True})
    with pytest.raises(ValueError, match="bogus"):
        keras_compat.from_keras_config({"bogus": 1})


# -- call arguments --------------------------------------------------------------------------------


def test_third_mask_entry_is_ignored():
    """A8: [qm, vm, km] equals [qm, vm], whatever km holds."""
    layer = Attention()
    x = inputs(4)
    qm, vm = make_masks("both", 4, (3,), 4, 5)
    expected = layer.apply({}, x, mask=[qm, vm], return_attention_scores=True)
    got = layer.apply({}, x, mask=[qm, vm, np.zeros((3, 5), bool)], return_attention_scores=True)
    chex.assert_trees_all_equal(got, expected)
    got = layer.apply({}, x, mask=(qm, vm, None), return_attention_scores=True)
    chex.assert_trees_all_equal(got, expected)


def test_mask_entries_may_be_none_and_inputs_a_tuple():
    layer = Attention(score_mode="concat")
    variables = layer.init(KEY, inputs())
    q, v, k = inputs(5)
    _, vm = make_masks("value", 5, (3,), 4, 5)
    got = layer.apply(variables, (q, v, k), mask=[None, vm])
    expected = la.attention(q, v, k, value_mask=vm, score_mode="concat", concat_score_weight=1.0)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        layer.apply(variables, [q, v, k], mask=[None, None]), layer.apply(variables, [q, v, k])
    )


def test_two_inputs_use_value_as_key():
    layer = Attention()
    q, v, _ = random_inputs(6, (3,), 4, 5, 2, 6, with_key=False)
    np.testing.assert_array_equal(layer.apply({}, [q, v]), layer.apply({}, [q, v, v]))


def test_eval_shape_of_module():
    """D3: abstract evaluation returns a 2-tuple only when asked for it."""
    layer = Attention(use_scale=True)
    x = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(3, 4, 2), (3, 5, 6), (3, 5, 2)]]
    variables = jax.eval_shape(layer.init, KEY, x)
    both = jax.eval_shape(
        functools.partial(layer.apply, return_attention_scores=True), variables, x
    )
    assert isinstance(both, tuple) and [s.shape for s in both] == [(3, 4, 6), (3, 4, 5)]
    single = jax.eval_shape(layer.apply, variables, x)
    assert isinstance(single, jax.ShapeDtypeStruct) and single.shape == (3, 4, 6)


def test_jitted_apply_traces_once():
    """The jitted apply is traced once for a given shape, whatever the values."""
    layer = Attention(use_scale=True, score_mode="concat", dropout=0.3)
    variables = layer.init(KEY, inputs())
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(variables, query, value, key, value_mask, rng):
        return layer.apply(
            variables,
            [query, value, key],
            mask=[None, value_mask],
            training=True,
            rngs={"dropout": rng},
        )

    for seed in range(3):
        q, v, k = inputs(seed)
        _, vm = make_masks("value", seed, (3,), 4, 5)
        apply(variables, q, v, k, vm, jax.random.key(seed))


def test_no_compute_mask_keras_mask_propagation_is_explicit():
    """Keras's compute_mask returns mask[0]; in Flax there is no implicit mask propagation, so
    the output of a masked query row is simply zero and callers pass the query mask on."""
    layer = Attention()
    q, v, k = inputs(7)
    qm = np.array([[True, False, True, True]] * 3)
    out = layer.apply({}, [q, v, k], mask=[qm, None])
    assert (np.asarray(out)[~qm] == 0).all() and (np.asarray(out)[qm] != 0).all()
    assert not hasattr(layer, "compute_mask")


# -- dropout ---------------------------------------------------------------------------------------


def dropout_call(layer, x, rng=None, training=True, **kwargs):
    rngs = None if rng is None else {"dropout": rng}
    variables = layer.init(KEY, x)
    out, w = layer.apply(
        variables, x, training=training, rngs=rngs, return_attention_scores=True, **kwargs
    )
    return np.asarray(out), np.asarray(w)


def test_dropout_off_without_training():
    """Keras: dropout applies only with training=True; no rng is needed otherwise (D8)."""
    x = inputs(8)
    plain = dropout_call(Attention(), x, training=False)
    for rng in (jax.random.key(1), None):
        got = dropout_call(Attention(dropout=0.5), x, rng, training=False)
        np.testing.assert_array_equal(got[0], plain[0])
        np.testing.assert_array_equal(got[1], plain[1])
    np.testing.assert_array_equal(dropout_call(Attention(), x, training=True)[1], plain[1])


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_dropout_kept_weights_are_rescaled_exactly(rate):
    x = inputs(9)
    qm, vm = make_masks("both", 9, (3,), 4, 5)
    _, w = dropout_call(Attention(dropout=rate), x, training=False, mask=[qm, vm])
    out, dropped = dropout_call(Attention(dropout=rate), x, jax.random.key(2), mask=[qm, vm])
    assert not np.array_equal(dropped, w)
    kept = dropped != 0
    # Bit-exact against the same float32 division done by XLA (whose CPU division can be one
    # ulp off NumPy's), and within an ulp of NumPy's.
    rescaled = np.asarray(jnp.asarray(w) / jnp.float32(1.0 - rate))
    np.testing.assert_array_equal(dropped[kept], rescaled[kept])
    np.testing.assert_allclose(dropped[kept], (w / np.float32(1.0 - rate))[kept], rtol=2.5e-7)
    # The output is the dropped weights applied to the values, query mask still applied.
    expected = np.einsum("bqk,bkv->bqv", dropped.astype(np.float64), x[1].astype(np.float64))
    expected[~qm] = 0.0
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_dropout_fraction_and_independence():
    """About ``rate`` of a large weights tensor is dropped, with a fresh mask per batch row."""
    rate, batch = 0.3, 16
    q, v, k = random_inputs(10, (1,), 64, 48, 5, 3)
    x = [np.repeat(a, batch, axis=0) for a in (q, v, k)]
    _, dropped = dropout_call(Attention(dropout=rate), x, jax.random.key(3))
    frac = float(np.mean(dropped == 0))
    n = dropped.size  # 49152 draws: the standard error is about 0.002
    assert abs(frac - rate) < 5 * np.sqrt(rate * (1 - rate) / n), frac
    zeros = dropped == 0
    for b in range(1, batch):
        assert not np.array_equal(zeros[0], zeros[b])


def test_dropout_determinism_and_seed():
    x = inputs(11)
    layer = Attention(dropout=0.4)
    a = dropout_call(layer, x, jax.random.key(5))
    b = dropout_call(layer, x, jax.random.key(5))
    c = dropout_call(layer, x, jax.random.key(6))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    s1 = dropout_call(Attention(dropout=0.4, seed=1), x, jax.random.key(5))
    s1_again = dropout_call(Attention(dropout=0.4, seed=1), x, jax.random.key(5))
    s2 = dropout_call(Attention(dropout=0.4, seed=2), x, jax.random.key(5))
    np.testing.assert_array_equal(s1[1], s1_again[1])
    assert not np.array_equal(s1[1], s2[1])
    assert not np.array_equal(s1[1], a[1])


def test_jitted_train_step_draws_fresh_masks():
    """D8: split keys under jit give different masks; the same key gives bit-identical ones."""
    layer = Attention(dropout=0.5)
    x = inputs(12)

    @jax.jit
    def step(x, rng):
        return layer.apply(
            {}, x, training=True, rngs={"dropout": rng}, return_attention_scores=True
        )[1]

    k1, k2 = jax.random.split(jax.random.key(7))
    assert not np.array_equal(step(x, k1), step(x, k2))
    np.testing.assert_array_equal(step(x, k1), step(x, k1))


def test_dropout_without_rng_names_the_stream():
    layer = Attention(dropout=0.1)
    with pytest.raises(ValueError, match="'dropout' rng"):
        layer.apply({}, inputs(), training=True)


def test_functional_dropout_matches_module_with_same_key():
    """The module's dropout is the functional dropout fed the stream's key."""
    x = inputs(13)
    layer = Attention(dropout=0.3)
    _, w_mod = dropout_call(layer, x, jax.random.key(8))
    rng = jax.random.key(8)
    stream_key = layer.apply(
        {}, x, rngs={"dropout": rng}, method=lambda m, _: m.make_rng("dropout")
    )
    _, w_fun = la.attention(
        *x[:2], x[2], dropout_rate=0.3, dropout_rng=stream_key, return_attention_scores=True
    )
    np.testing.assert_array_equal(w_mod, w_fun)
