"""``luong_attention.keras.Attention`` against plain ``keras.layers.Attention`` (Keras 3, JAX).

The plain layer is the reference throughout: outputs, weights and gradients on the option
grid, the blocked path (checked to build no ``[Tq, Tv]`` intermediate, which the plain layer
does), dropout from Keras's ``SeedGenerator``, ``mixed_bfloat16``, config and weights,
``.keras`` round trips both ways, ``model.fit`` losses step by step, the fallback to Keras's
own code on another backend (NumPy, in a subprocess) and that nothing else imports Keras.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.reference import MASK_KINDS, grid, make_masks, random_inputs, reference_attention

# (batch, Tq, Tv, dim, dim_v), all distinct.
B, TQ, TV, DIM, DIM_V = 3, 5, 7, 4, 6
# Non-trivial weights set on both layers.
SCALE, CONCAT_WEIGHT = 0.63, 1.7
# Scores variants: (score_mode, use_scale).
SCORES = (("dot", False), ("dot", True), ("concat", True))


@pytest.fixture(scope="module")
def ours(keras):
    """The class under test (imported after the ``keras`` fixture set the JAX backend)."""
    from luong_attention.keras import Attention

    return Attention


def built_pair(keras, ours, shapes, options=None, **config):
    """``(our layer, plain keras layer)``, same config, built, with the same weights; our layer
    also gets the constructor ``options`` the plain one lacks."""
    layers = (ours(**config, **(options or {})), keras.layers.Attention(**config))
    weights = [SCALE] * config.get("use_scale", False)
    weights += [CONCAT_WEIGHT] * (config.get("score_mode") == "concat")
    for layer in layers:
        layer.build(shapes)
        layer.set_weights([np.float32(w) for w in weights])
    return layers


def call_and_grads(layer, inputs, mask, cotangent, **call_kwargs):
    """``(output, weights)`` of one stateless call and the gradients of ``sum(output *
    cotangent)`` with respect to the layer's trainable weights and every input."""

    def loss(trainable, inputs):
        (out, w), _ = layer.stateless_call(
            trainable,
            [v.value for v in layer.non_trainable_variables],
            inputs,
            mask=mask,
            return_attention_scores=True,
            **call_kwargs,
        )
        return jnp.sum(out * cotangent), (out, w)

    trainable = [v.value for v in layer.trainable_variables]
    grads, (out, w) = jax.grad(loss, argnums=(0, 1), has_aux=True)(trainable, inputs)
    return out, w, grads


def assert_trees_close(actual, expected, rtol, atol):
    leaves = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    for a, e in leaves:
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol, atol)


@pytest.mark.parametrize(
    ("scores", "mask_kind", "causal"),
    grid(scores=SCORES, mask_kind=MASK_KINDS, causal=(False, True)),
)
def test_outputs_and_gradients_match_keras(keras, ours, scores, mask_kind, causal):
    score_mode, use_scale = scores
    seed = zlib.crc32(repr((scores, mask_kind, causal)).encode())
    with_key = seed % 2 == 0
    query, value, key = random_inputs(seed, (B,), TQ, TV, DIM, DIM_V, with_key=with_key)
    query_mask, value_mask = make_masks(mask_kind, seed, (B,), TQ, TV)
    # A mask list of 3: Keras ignores the third entry (here all False), so must we.
    mask = None if mask_kind == "none" else [query_mask, value_mask, np.zeros((B, TV), bool)]
    inputs = [query, value] if key is None else [query, value, key]
    shapes = [x.shape for x in inputs]
    cotangent = np.random.default_rng(seed).standard_normal((B, TQ, value.shape[-1]))
    layers = built_pair(keras, ours, shapes, score_mode=score_mode, use_scale=use_scale)
    got, want = (
        call_and_grads(lay, inputs, mask, cotangent, use_causal_mask=causal) for lay in layers
    )
    assert_trees_close(got, want, rtol=1e-5, atol=2e-5)
    assert len(got[2][0]) == use_scale + (score_mode == "concat")
    # The Keras layer is pinned to the independent loop reference (so both are right).
    ref_out, ref_w = reference_attention(
        query, value, key, query_mask=query_mask, value_mask=value_mask, causal=causal,
        score_mode=score_mode, scale=SCALE if use_scale else None,
        concat_score_weight=CONCAT_WEIGHT if score_mode == "concat" else None,
    )  # fmt: skip
    assert_trees_close(got[:2], (ref_out, ref_w), rtol=1e-5, atol=2e-5)


def _largest_intermediate(fn, *args) -> int:
    """The element count of the largest array any step of ``fn``'s jaxpr produces
    (sub-jaxprs of loops, conditionals and custom derivatives included)."""

    def walk(jaxpr) -> int:
        largest = 0
        for eqn in jaxpr.eqns:
            largest = max([largest, *(int(np.prod(v.aval.shape)) for v in eqn.outvars)])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        largest = max(largest, walk(inner))
        return largest

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_long_sequences_take_the_blocked_path(keras, ours):
    # Tq * Tv >= 2**20: our layer dispatches to the blocked kernel.
    batch, tq, tv, dim, dim_v = 2, 1024, 1040, 8, 12
    query, value, key = random_inputs(11, (batch,), tq, tv, dim, dim_v)
    value_mask = np.random.default_rng(12).random((batch, tv)) < 0.8
    inputs, mask = [query, value, key], [None, value_mask]
    cotangent = np.random.default_rng(13).standard_normal((batch, tq, dim_v))
    layers = built_pair(keras, ours, [x.shape for x in inputs], use_scale=True)

    def loss(layer):
        def f(trainable, inputs):
            out, _ = layer.stateless_call(trainable, [], inputs, mask=mask)
            return jnp.sum(out * cotangent)

        return f

    args = [[v.value for v in layers[0].trainable_variables], inputs]
    fns = [jax.value_and_grad(loss(lay), argnums=(0, 1)) for lay in layers]
    got, want = (jax.jit(fn)(*args) for fn in fns)
    assert_trees_close(got, want, rtol=2e-4, atol=2e-5)
    # Neither the forward nor the gradient builds a [batch, Tq, Tv] array; Keras's does.
    assert _largest_intermediate(fns[0], *args) < tq * tv
    assert _largest_intermediate(fns[1], *args) >= batch * tq * tv


def test_dropout_draws_from_the_keras_seed_generator(keras, ours):
    query, value, key = random_inputs(21, (B,), TQ, TV, DIM, DIM_V)
    inputs = [query, value, key]
    config = dict(dropout=0.4, seed=1337)
    layers = built_pair(keras, ours, [x.shape for x in inputs], **config)
    # The dense path (weights requested) drops exactly what Keras drops, call after call,
    # as the generator's state advances.
    calls = [
        [lay(inputs, training=True, return_attention_scores=True) for _ in range(2)]
        for lay in layers
    ]
    assert_trees_close(calls[0], calls[1], rtol=1e-6, atol=1e-7)
    first, second = (np.asarray(w) for _, w in calls[0])
    assert (first == 0).any() and not np.array_equal(first, second)
    # Inference ignores dropout.
    plain = keras.layers.Attention()(inputs)
    np.testing.assert_allclose(layers[0](inputs, training=False), plain, rtol=1e-6)


def test_dropout_on_the_blocked_path(ours):
    # value == 1: each output row is the sum of its dropped weights, 1 on average.
    tq, tv = 1024, 1030
    query = np.random.default_rng(31).standard_normal((1, tq, 4)).astype(np.float32) / 4
    key = np.random.default_rng(32).standard_normal((1, tv, 4)).astype(np.float32) / 4
    value = np.ones((1, tv, 1), np.float32)
    layers = [ours(dropout=0.5, seed=seed) for seed in (5, 5, 6)]
    for layer in layers:
        layer.build([query.shape, value.shape, key.shape])

    @jax.jit
    def row_sums(seed_state):
        # One compiled call; the seed generator's state is the layer's only variable.
        out, new_state = layers[0].stateless_call(
            [], seed_state, [query, value, key], training=True
        )
        return out[0, :, 0], new_state

    states = [[v.value for v in lay.non_trainable_variables] for lay in layers]
    results = [row_sums(state) for state in states]
    runs = [np.asarray(sums) for sums, _ in results]
    # The draw advanced the generator's state (so the next step drops other weights).
    assert not np.array_equal(np.asarray(results[0][1][0]), np.asarray(states[0][0]))
    np.testing.assert_array_equal(runs[0], runs[1])  # the seed fixes the masks
    assert not np.array_equal(runs[0], runs[2])
    for row_sums in runs:
        assert abs(row_sums.mean() - 1.0) < 0.02 and row_sums.std() > 0.005


# bfloat16's unit roundoff: rounding to bfloat16 moves a value by at most 2**-8 of it.
BF16_ROUNDOFF = 2.0**-8


def bf16_error_bounds(query, value, key, weights, output, scale, *, operands, scale_folded):
    """Bounds on ``|ours - exact|`` for the output and the weights of a ``mixed_bfloat16`` call
    on bfloat16-exact inputs, per element; ``exact`` is the float64 ``(output, weights)``.

    Float32 operands (and float32 scores and softmax): one rounding, of the result to
    bfloat16, ``u |exact|`` with ``u = 2**-8`` (float32 arithmetic adds ~1e-7, within the
    ``1e-6`` slack). Bfloat16 operands add roundings, propagated to first order:

    * ``scale_folded`` (the blocked path): ``round(scale * query)`` moves each score by at most
      ``d_ij = u |scale| sum_d |q_id| |k_jd|``; the softmax then moves each weight by a factor
      within ``exp(+-2 D_i)``, ``D_i = max_j d_ij`` (first order ``2 D_i p_ij``), so
      ``|dp_ij| <= (exp(2 D_i) - 1) p_ij``;
    * the weights are rounded to bfloat16 for the value product: ``u p'_ij``;
    * together, the output before its own rounding moves by at most
      ``E_i = ((exp(2 D_i) - 1) + u exp(2 D_i)) sum_j p_ij |v_j|``, and that rounding adds
      ``u (|o_i| + E_i)``. The returned weights (dense path, ``D = 0``) are rounded once.
    """
    slack = 1e-6
    u, p = BF16_ROUNDOFF, weights
    if operands == "float32":
        return u * np.abs(output) + slack, u * np.abs(weights) + slack
    if scale_folded:
        moves = u * abs(scale) * np.einsum("bqd,bkd->bqk", np.abs(query), np.abs(key))
        growth = np.exp(2.0 * moves.max(-1, keepdims=True))
    else:
        growth = np.ones((*p.shape[:-1], 1))
    spread = np.einsum("bqk,bkv->bqv", p, np.abs(value))
    moved = ((growth - 1.0) + u * growth) * spread
    return u * np.abs(output) + (1.0 + u) * moved + slack, (growth - 1.0 + u * growth) * p + slack


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_mixed_bfloat16(keras, ours, matmul_dtype):
    """``mixed_bfloat16`` on each forced operand path (the default depends on the CPU: see
    ``resolve_matmul_dtype``), on the dense path (weights requested) and the blocked one."""
    query, value, key = random_inputs(41, (B,), TQ, TV, DIM, DIM_V)
    value_mask = np.random.default_rng(42).random((B, TV)) < 0.7
    arrays = [query, value, key, value_mask]
    shapes = [x.shape for x in arrays[:3]]
    options = {"matmul_dtype": matmul_dtype}
    layers = built_pair(keras, ours, shapes, options, use_scale=True, dtype="mixed_bfloat16")
    assert layers[0].scale.dtype == "float32"
    cotangent = np.ones((B, TQ, DIM_V))
    got, want = [], []
    for layer, results in zip(layers, (got, want), strict=True):
        # Through a model, as in fit: Layer.__call__ casts the float32 inputs to bfloat16.
        inputs = [keras.Input(x.shape[1:], dtype=x.dtype) for x in arrays]
        outputs = layer(inputs[:3], mask=[None, inputs[3]], return_attention_scores=True)
        model = keras.Model(inputs, outputs)

        def loss(trainable, model=model):
            (out, w), _ = model.stateless_call(trainable, [], arrays)
            return jnp.sum(out.astype(jnp.float32) * cotangent), (out, w)

        trainable = [v.value for v in model.trainable_variables]
        grads, outs = jax.grad(loss, has_aux=True)(trainable)
        results.extend([*outs, grads])
    assert got[0].dtype == got[1].dtype == want[0].dtype == jnp.bfloat16
    # Keras's layer runs its scores and softmax in bfloat16: close to ours, not equal.
    assert_trees_close(got, want, rtol=5e-2, atol=5e-2)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(got[2]))
    # Ours runs them in float32: against the exact result on the bfloat16 inputs and scale
    # that autocasting hands the layer, within the bounds derived in bf16_error_bounds.
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in arrays[:3]]
    scale = float(jnp.asarray(SCALE, jnp.bfloat16))
    exact = reference_attention(*rounded, value_mask=value_mask, scale=scale)
    blocked = ours(use_scale=True, dtype="mixed_bfloat16", implementation="blocked", **options)
    blocked.build(shapes)
    blocked.set_weights([np.float32(SCALE)])
    dense, folded = (
        bf16_error_bounds(*rounded, exact[1], exact[0], scale, operands=matmul_dtype,
                          scale_folded=scale_folded)
        for scale_folded in (False, True)
    )  # fmt: skip
    for name, actual, ref, bound in [
        ("dense output", got[0], exact[0], dense[0]),
        ("dense weights", got[1], exact[1], dense[1]),
        ("blocked output", blocked(arrays[:3], mask=[None, value_mask]), exact[0], folded[0]),
    ]:
        error = np.abs(np.asarray(actual, np.float64) - ref)
        assert (error <= bound).all(), (name, float((error / bound).max()))


CONFIGS = [
    dict(name="plain"),
    dict(use_scale=True, name="scaled"),
    dict(use_scale=True, score_mode="concat", dropout=0.25, seed=1337, name="concat"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_and_weights_as_keras(keras, ours, config):
    layer, plain = ours(**config), keras.layers.Attention(**config)
    for lay in (layer, plain):
        lay.build([(B, TQ, DIM), (B, TV, DIM)])
    assert layer.get_config() == plain.get_config()
    clone = ours.from_config(plain.get_config())
    assert type(clone) is ours and clone.get_config() == plain.get_config()
    assert [(w.path, w.shape, w.trainable) for w in layer.weights] == [
        (w.path, w.shape, w.trainable) for w in plain.weights
    ]
    assert len(layer.trainable_weights) == config.get("use_scale", False) + (
        config.get("score_mode") == "concat"
    )


def test_errors_as_keras(keras, ours):
    with pytest.raises(ValueError, match=r"Expected one of \{'dot', 'concat'\}"):
        ours(score_mode="general")
    query = np.ones((B, TQ, DIM), np.float32)
    with pytest.raises(ValueError, match="must be called on a list"):
        ours()(query)
    with pytest.raises(ValueError, match="mask list of length 2 or 3"):
        ours()([query, query], mask=[None])
    # Shapes that do not fit: our message names the arrays and their shapes.
    with pytest.raises(ValueError, match=r"query and key must have the same depth.*key.shape"):
        ours()([query, np.ones((B, TV, DIM_V), np.float32), np.ones((B, TV, DIM + 1), np.float32)])


def classifier_pair(keras, vocab, dim, classes, **config):
    """Two example classifiers, ours and plain, with the same (random) weights."""
    from luong_attention.keras import Attention, example_classifier

    keras.utils.set_random_seed(0)
    models = [
        example_classifier(vocab, dim, classes, attention_layer=lambda c=cls: c(**config))
        for cls in (Attention, keras.layers.Attention)
    ]
    models[1].set_weights(models[0].get_weights())
    return models


def padded_tokens(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """Token ids in ``[1, vocab)``, each row padded with 0 after a random length."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (batch, length))
    lengths = rng.integers(length // 3, length, batch)
    return np.where(np.arange(length) < lengths[:, None], tokens, 0).astype(np.int32)


@pytest.mark.parametrize(("batch", "length"), [(6, 37), (2, 1030)], ids=["dense", "blocked"])
def test_fit_losses_match_keras_step_by_step(keras, batch, length):
    vocab, dim, classes = 23, 8, 3
    tokens = padded_tokens(51, batch, length, vocab)
    labels = np.arange(batch) % classes
    histories = []
    for model in classifier_pair(keras, vocab, dim, classes, use_scale=True):
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
        # One batch per epoch: the history holds each step's loss.
        histories.append(
            model.fit(tokens, labels, batch_size=batch, epochs=3, shuffle=False, verbose=0)
        )
    losses = [np.asarray(h.history["loss"]) for h in histories]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]  # it trained


def test_the_padding_mask_propagates_as_in_keras(keras, ours):
    layer = ours()
    query_mask = np.array([[True, False, True]])
    value_mask = np.array([[True, True, False, False]])
    x, v = np.ones((1, 3, 2), np.float32), np.ones((1, 4, 2), np.float32)
    np.testing.assert_array_equal(layer.compute_mask([x, v], [query_mask, value_mask]), query_mask)
    assert layer.compute_mask([x, v], None) is None
    # In a model: the pooling after the attention sees the padding mask (else the padded
    # rows, zeroed by the query mask, would pull the mean down and the outputs differ).
    models = classifier_pair(keras, 17, 6, 4)
    tokens = padded_tokens(61, 5, 19, 17)
    np.testing.assert_allclose(
        models[0].predict(tokens, verbose=0), models[1].predict(tokens, verbose=0), rtol=1e-5
    )


def test_keras_files_round_trip_and_swap_attention(keras, ours, tmp_path):
    tokens = padded_tokens(71, 4, 29, 13)
    models = classifier_pair(keras, 13, 5, 3, use_scale=True)
    for model in models:
        model.get_layer(index=2).scale.assign(0.55)
    expected = models[1].predict(tokens, verbose=0)
    paths = [tmp_path / "ours.keras", tmp_path / "plain.keras"]
    for model, path in zip(models, paths, strict=True):
        model.save(path)
    # Ours loads back as ours; the plain file loads as plain, then takes ours in its place.
    from luong_attention.keras import swap_attention

    loaded = [keras.models.load_model(path) for path in paths]
    loaded.append(swap_attention(loaded[1]))
    kinds = [type(m.get_layer(index=2)) for m in loaded]
    assert kinds == [ours, keras.layers.Attention, ours]
    for model in loaded:
        assert float(model.get_layer(index=2).scale.numpy()) == pytest.approx(0.55)
        np.testing.assert_allclose(model.predict(tokens, verbose=0), expected, rtol=1e-5, atol=1e-7)


FALLBACK = """
import sys
import numpy as np
import luong_attention, luong_attention.luong, luong_attention.decoding, luong_attention.nnx
import luong_attention.keras_compat
assert "keras" not in sys.modules, "keras imported by the rest of the library"
import keras
from luong_attention.keras import Attention
assert keras.backend.backend() == "numpy"
rng = np.random.default_rng(0)
q, v = rng.standard_normal((3, 5, 4)).astype("float32"), rng.standard_normal((3, 7, 4)).astype("float32")
mask = [rng.random((3, 5)) < 0.7, rng.random((3, 7)) < 0.7]
outs = []
for cls in (Attention, keras.layers.Attention):
    layer = cls(use_scale=True)
    outs.append(layer([q, v], mask=mask, return_attention_scores=True, use_causal_mask=True))
assert all(type(x) is np.ndarray for x in outs[0])
assert all(np.array_equal(a, b) for a, b in zip(*outs))
print("ok")
"""


def test_keras_is_optional_and_other_backends_run_keras_own_code():
    # Nothing but luong_attention.keras imports Keras. On the NumPy backend our layer gives
    # Keras's numbers bit for bit, as NumPy arrays: Keras's code ran (ours returns jax arrays).
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FALLBACK)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
