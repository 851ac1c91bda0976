"""The functional API and its building blocks against golden values, closed forms and the
NumPy-loop reference; the masking pitfalls (A1-A10, B5, D2-D4 in docs/pitfalls.md)."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from helpers.reference import make_masks, random_inputs, reference_attention

import luong_attention as la

# Golden values from Keras's own test suite, keras-team/keras
# keras/src/layers/attention/attention_test.py (as shipped with Keras 3.15.1):
# test_attention_correctness (also docs/pitfalls.md B6) and test_attention_with_mask (A7).
GOLDEN_QUERY = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
GOLDEN_KEY = np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32)
GOLDEN_VALUE = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
GOLDEN = {
    "dot": ([[[2.462, 3.462], [1.538, 2.538]]], [[[0.269, 0.731], [0.731, 0.269]]]),
    "concat": ([[[1.727, 2.727], [2.272, 3.272]]], [[[0.636, 0.363], [0.363, 0.636]]]),
}


def call(query, value, key=None, **kwargs):
    """``attention`` returning ``(output, weights)`` as NumPy arrays."""
    out, w = la.attention(query, value, key, return_attention_scores=True, **kwargs)
    return np.asarray(out), np.asarray(w)


# -- golden values and closed forms --------------------------------------------------------


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_keras_golden_values(score_mode):
    out, w = call(GOLDEN_QUERY, GOLDEN_VALUE, GOLDEN_KEY, score_mode=score_mode)
    expected_out, expected_w = GOLDEN[score_mode]
    np.testing.assert_allclose(out, expected_out, atol=1e-3)
    np.testing.assert_allclose(w, expected_w, atol=1e-3)


def test_keras_golden_masks():
    """A7: the query mask zeroes output rows but leaves the returned weights alone."""
    value = np.ones((1, 2, 2), np.float32)
    out, w = call(
        GOLDEN_QUERY, value, query_mask=np.array([[True, False]]), value_mask=[[True, False]]
    )
    np.testing.assert_array_equal(out, [[[1.0, 1.0], [0.0, 0.0]]])
    np.testing.assert_array_equal(w, [[[1.0, 0.0], [1.0, 0.0]]])


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_loaded_weights_closed_form(score_mode):
    """D6: scale=0.5 and concat_score_weight=2.0 on the golden inputs, in closed form."""
    if score_mode == "dot":
        # scores = 0.5 * [[0, 1], [1, 0]]
        rows = [_softmax([0.0, 0.5]), _softmax([0.5, 0.0])]
        kwargs = {}
    else:
        # q_i + k_j is [1, 1] on the diagonal and [0, 2] / [2, 0] off it.
        diag, off = 2 * 2 * math.tanh(0.5), 2 * math.tanh(1.0)
        rows = [_softmax([diag, off]), _softmax([off, diag])]
        kwargs = {"concat_score_weight": 2.0}
    expected_w = np.array([rows])
    expected_out = expected_w @ GOLDEN_VALUE.astype(np.float64)
    out, w = call(
        GOLDEN_QUERY, GOLDEN_VALUE, GOLDEN_KEY, score_mode=score_mode, scale=0.5, **kwargs
    )
    np.testing.assert_allclose(w, expected_w, atol=1e-6)
    np.testing.assert_allclose(out, expected_out, atol=1e-6)


def test_dot_scores_have_no_implicit_scaling():
    """B5: no 1/sqrt(depth); scale=1.0 is the identity and scale=0.5 halves the scores."""
    query, _, key = random_inputs(0, (2,), 3, 4, 5, 6)
    expected = query @ np.swapaxes(key, -1, -2)
    plain = np.asarray(la.dot_scores(query, key))
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(la.dot_scores(query, key, scale=1.0), plain)
    np.testing.assert_allclose(la.dot_scores(query, key, scale=0.5), plain / 2, rtol=1e-6)


def test_concat_scores_closed_form():
    query, _, key = random_inputs(1, (3,), 2, 5, 4, 6)
    expected = 1.7 * np.tanh(0.3 * (query[:, :, None, :] + key[:, None, :, :])).sum(-1)
    got = la.concat_scores(query, key, scale=0.3, concat_score_weight=1.7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_causal_mask_is_top_left_tril():
    for tq, tv in [(3, 5), (5, 3), (1, 4), (4, 4)]:
        np.testing.assert_array_equal(la.causal_mask(tq, tv), np.tril(np.ones((tq, tv), bool)))


def test_score_mask_combines_by_and_and_is_none_without_masks():
    assert la.score_mask(None, use_causal_mask=False, q_length=3, kv_length=4) is None
    value_mask = np.array([[True, False, True, True], [False, True, True, False]])
    got = la.score_mask(value_mask, use_causal_mask=True, q_length=3, kv_length=4)
    expected = value_mask[:, None, :] & np.tril(np.ones((3, 4), bool))
    np.testing.assert_array_equal(np.broadcast_to(got, (2, 3, 4)), expected)
    alone = la.score_mask([1, 0, 2, 0], use_causal_mask=False, q_length=3, kv_length=4)
    np.testing.assert_array_equal(np.broadcast_to(alone, (3, 4)), [[True, False, True, False]] * 3)


# -- masking pitfalls ------------------------------------------------------------------------


def test_value_mask_axis_with_batch_equal_to_tq():
    """A1: B == Tq, so a value mask broadcast along the query axis would go unnoticed."""
    query, value, key = random_inputs(2, (3,), 3, 4, 5, 6)
    value_mask = np.array([[True, False, True, True], [False, True, True, False], [1, 1, 0, 1]])
    value_mask = value_mask.astype(bool)
    out, w = call(query, value, key, value_mask=value_mask)
    for b in range(3):
        assert (w[b][:, ~value_mask[b]] == 0).all()
        assert (w[b][:, value_mask[b]] > 0).all()
    r_out, r_w = reference_attention(query, value, key, value_mask=value_mask)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(w, r_w, atol=1e-5)


def test_causal_without_value_mask():
    """A2: causal alone works; equal scores give tril rows normalised."""
    value = np.random.default_rng(3).standard_normal((2, 4, 3)).astype(np.float32)
    query = np.zeros((2, 4, 3), np.float32)
    _, w = call(query, value, use_causal_mask=True)
    tril = np.tril(np.ones((4, 4)))
    np.testing.assert_allclose(w, np.broadcast_to(tril / tril.sum(-1, keepdims=True), w.shape))


def test_causal_alignment_when_lengths_differ():
    """A3: top-left alignment for Tq < Tv and Tq > Tv."""
    query, value, key = random_inputs(4, (1,), 2, 4, 3, 5)
    _, w = call(query, value, key, use_causal_mask=True)
    assert (w[0, 0, 1:] == 0).all() and (w[0, 1, 2:] == 0).all()
    assert (w[0, 1, :2] > 0).all()
    query, value, key = random_inputs(5, (1,), 3, 2, 4, 5)
    _, w = call(query, value, key, use_causal_mask=True)
    np.testing.assert_array_equal(w[0, 0], [1.0, 0.0])
    assert (w[0, 1:] > 0).all()


def test_causal_single_query_sees_only_first_key():
    """A4: Tq=1 with the causal mask attends to key 0 only (Keras's geometry)."""
    query, value, key = random_inputs(6, (1,), 1, 5, 3, 4)
    out, w = call(query, value, key, use_causal_mask=True)
    np.testing.assert_array_equal(w, [[[1.0, 0.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(out[:, 0], value[:, 0], rtol=1e-6)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_fully_masked_row_is_mean_of_values(score_mode):
    """A5: small scores and every key masked -> the mean of the values, finite."""
    query = np.array([[[0.1, -0.2], [0.3, 0.05]]], np.float32)
    value = np.array([[[1.0, 2.0, 0.5], [3.0, -4.0, 1.5], [0.0, 1.0, 2.0]]], np.float32)
    key = np.array([[[0.2, 0.1], [-0.3, 0.2], [0.1, 0.1]]], np.float32)
    out, w = call(query, value, key, value_mask=[[False] * 3], score_mode=score_mode)
    np.testing.assert_allclose(
        out, np.broadcast_to(value.mean(1, keepdims=True), out.shape), atol=1e-6
    )
    np.testing.assert_allclose(w, np.full(w.shape, 1 / 3), atol=1e-6)
    out, w = call(100 * query, value, 100 * key, value_mask=[[False] * 3], score_mode=score_mode)
    assert np.isfinite(out).all() and np.isfinite(w).all()


def test_query_mask_zeroes_output_even_over_nan():
    """A7: a NaN in a masked query row still gives an exactly zero output row."""
    query, value, key = random_inputs(7, (2,), 4, 3, 5, 6)
    query_mask = np.array([[True, False, True, True], [True, True, True, False]])
    clean_out, clean_w = call(query, value, key, query_mask=query_mask)
    query[0, 1] = np.nan
    query[1, 3] = np.nan
    out, w = call(query, value, key, query_mask=query_mask)
    assert (out[0, 1] == 0).all() and (out[1, 3] == 0).all()
    np.testing.assert_array_equal(out, clean_out)
    np.testing.assert_array_equal(w[query_mask], clean_w[query_mask])
    np.testing.assert_allclose(clean_w.sum(-1), 1.0, rtol=1e-6)  # weights of masked rows kept


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_masked_key_value_content_does_not_leak(score_mode):
    """A9: huge numbers in masked key/value rows leave the output unchanged."""
    query, value, key = random_inputs(8, (2,), 3, 5, 4, 6)
    value_mask = np.array([[True, False, True, True, False], [False, True, True, True, True]])
    out = call(query, value, key, value_mask=value_mask, score_mode=score_mode)[0]
    value[~value_mask] = 1e4
    key[~value_mask] = 1e4
    out_big = call(query, value, key, value_mask=value_mask, score_mode=score_mode)[0]
    np.testing.assert_allclose(out_big, out, rtol=1e-5, atol=1e-6)


def test_int_and_float_masks_equal_bool():
    """A10: non-zero means attend, for int and float masks alike."""
    query, value, key = random_inputs(9, (2,), 3, 4, 5, 6)
    value_mask = np.array([[1, 0, 1, 1], [0, 0, 2, 1]])
    query_mask = np.array([[1, 0, 1], [1, 1, 0]])
    expected = call(query, value, key, query_mask=query_mask != 0, value_mask=value_mask != 0)
    for dtype in (np.int32, np.float32, np.uint8):
        got = call(
            query,
            value,
            key,
            query_mask=query_mask.astype(dtype),
            value_mask=value_mask.astype(dtype),
        )
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("precision", [jax.lax.Precision.HIGHEST, "highest", None])
def test_precision_is_passed_through(precision):
    query, value, key = random_inputs(15, (2,), 3, 4, 5, 6)
    out, w = call(query, value, key, value_mask=[True, False, True, True], precision=precision)
    r_out, r_w = reference_attention(query, value, key, value_mask=[True, False, True, True])
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(w, r_w, atol=1e-5)


def test_value_depth_sets_output_depth():
    """D2: the output takes value's depth; eval_shape agrees."""
    query, value, key = (jnp.ones((2, 8, 5)), jnp.ones((2, 8, 7)), jnp.ones((2, 8, 5)))
    assert la.attention(query, value, key).shape == (2, 8, 7)
    shape = jax.eval_shape(la.attention, query, value, key)
    assert shape.shape == (2, 8, 7) and shape.dtype == jnp.float32


def test_eval_shape_with_and_without_scores():
    """D3: abstract evaluation returns a 2-tuple, then a single array, never a stale flag."""
    query, value = (
        jax.ShapeDtypeStruct((3, 4, 5), jnp.float32),
        jax.ShapeDtypeStruct((3, 6, 2), jnp.float32),
    )
    key = jax.ShapeDtypeStruct((3, 6, 5), jnp.float32)
    both = jax.eval_shape(
        functools.partial(la.attention, return_attention_scores=True), query, value, key
    )
    assert isinstance(both, tuple) and len(both) == 2
    assert both[0].shape == (3, 4, 2) and both[1].shape == (3, 4, 6)
    single = jax.eval_shape(la.attention, query, value, key)
    assert isinstance(single, jax.ShapeDtypeStruct) and single.shape == (3, 4, 2)


# -- batch dims -------------------------------------------------------------------------------


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
@pytest.mark.parametrize("causal", [False, True])
def test_extra_batch_dims_match_loop_reference(score_mode, causal):
    batch, tq, tv, dim, dim_v = (2, 3), 4, 5, 6, 7
    query, value, key = random_inputs(10, batch, tq, tv, dim, dim_v)
    query_mask, value_mask = make_masks("both", 10, batch, tq, tv)
    kwargs = {"query_mask": query_mask, "value_mask": value_mask, "score_mode": score_mode}
    scalars = {"scale": 0.8, "concat_score_weight": 1.3 if score_mode == "concat" else None}
    out, w = call(query, value, key, use_causal_mask=causal, **kwargs, **scalars)
    r_out, r_w = reference_attention(query, value, key, causal=causal, **kwargs, **scalars)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(w, r_w, atol=1e-5)


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_no_batch_dims_match_loop_reference(score_mode):
    query, value, key = random_inputs(11, (), 3, 5, 4, 2)
    value_mask = np.array([True, False, True, True, False])
    query_mask = np.array([True, True, False])
    kwargs = {"query_mask": query_mask, "value_mask": value_mask, "score_mode": score_mode}
    out, w = call(query, value, key, use_causal_mask=True, **kwargs)
    assert out.shape == (3, 2) and w.shape == (3, 5)
    r_out, r_w = reference_attention(query, value, key, causal=True, **kwargs)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(w, r_w, atol=1e-5)


def test_batch_dims_broadcast_and_short_masks():
    """Batch dims broadcast between query/key/value; masks may leave out leading dims."""
    rng = np.random.default_rng(12)
    query = rng.standard_normal((2, 1, 4, 3)).astype(np.float32)
    key = rng.standard_normal((1, 5, 6, 3)).astype(np.float32)
    value = rng.standard_normal((5, 6, 7)).astype(np.float32)
    value_mask = np.array([True, False, True, True, False, True])  # [Tv] only
    query_mask = rng.random((5, 4)) < 0.7  # [batch[-1], Tq]
    kwargs = {"query_mask": query_mask, "value_mask": value_mask}
    out, w = call(query, value, key, **kwargs)
    assert out.shape == (2, 5, 4, 7) and w.shape == (2, 5, 4, 6)
    r_out, r_w = reference_attention(query, value, key, **kwargs)
    np.testing.assert_allclose(out, r_out, atol=1e-5)
    np.testing.assert_allclose(w, r_w, atol=1e-5)


def test_nd_inputs_equal_vmap_of_3d_call():
    """D4: q=v=(2,8,6,4) equals vmap over axis 1 of the 3-D call."""
    x = np.random.default_rng(13).standard_normal((2, 8, 6, 4)).astype(np.float32)
    y = np.random.default_rng(14).standard_normal((2, 8, 6, 4)).astype(np.float32)
    out, w = call(x, y)
    assert out.shape == (2, 8, 6, 4) and w.shape == (2, 8, 6, 6)
    f = functools.partial(la.attention, return_attention_scores=True)
    v_out, v_w = jax.vmap(f, in_axes=1, out_axes=1)(x, y)
    np.testing.assert_allclose(out, v_out, atol=1e-6)
    np.testing.assert_allclose(w, v_w, atol=1e-6)


# -- jit / no-jit, vmap, gradients -------------------------------------------------------------


def _loss_inputs(seed: int = 20):
    """Batch of 3 where example 0 has every query and every key masked."""
    query, value, key = random_inputs(seed, (3,), 4, 5, 2, 6)
    query_mask = np.ones((3, 4), bool)
    query_mask[0] = False
    query_mask[2, 1] = False
    value_mask = np.ones((3, 5), bool)
    value_mask[0] = False
    value_mask[1, 3] = False
    weights = np.random.default_rng(seed + 1).standard_normal((3, 4, 6)).astype(np.float32)
    return query, value, key, query_mask, value_mask, weights


class TransformsTest(chex.TestCase):
    """The same function with and without ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(score_mode=("dot", "concat"), causal=(False, True))
    def test_matches_reference(self, score_mode, causal):
        query, value, key = random_inputs(21, (3,), 5, 4, 2, 6)
        query_mask, value_mask = make_masks("both", 21, (3,), 5, 4)

        @self.variant
        def f(query, value, key, query_mask, value_mask, scale, concat_score_weight):
            return la.attention(
                query,
                value,
                key,
                query_mask=query_mask,
                value_mask=value_mask,
                use_causal_mask=causal,
                score_mode=score_mode,
                scale=scale,
                concat_score_weight=concat_score_weight,
                return_attention_scores=True,
            )

        csw = 1.4 if score_mode == "concat" else None
        out, w = f(query, value, key, query_mask, value_mask, 0.7, csw)
        r_out, r_w = reference_attention(
            query,
            value,
            key,
            query_mask=query_mask,
            value_mask=value_mask,
            causal=causal,
            score_mode=score_mode,
            scale=0.7,
            concat_score_weight=csw,
        )
        np.testing.assert_allclose(out, r_out, atol=1e-5)
        np.testing.assert_allclose(w, r_w, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_vmap_over_extra_axis_equals_loop(self):
        query, value, key = random_inputs(22, (4, 3), 2, 5, 6, 7)
        _, value_mask = make_masks("value", 22, (4, 3), 2, 5)

        @self.variant
        def f(query, value, key, value_mask):
            g = functools.partial(la.attention, use_causal_mask=True, score_mode="concat")
            return jax.vmap(lambda q, v, k, m: g(q, v, k, value_mask=m))(
                query, value, key, value_mask
            )

        out = f(query, value, key, value_mask)
        for i in range(4):
            expected = la.attention(
                query[i],
                value[i],
                key[i],
                value_mask=value_mask[i],
                use_causal_mask=True,
                score_mode="concat",
            )
            np.testing.assert_allclose(out[i], expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("dot", "concat")
    def test_grads_finite_and_masked_example_is_inert(self, score_mode):
        """A6: a fully masked example gives zero, finite grads and leaves the others alone."""
        query, value, key, query_mask, value_mask, weights = _loss_inputs()

        def loss(query, key, value, scale, csw, query_mask, value_mask, weights):
            out = la.attention(
                query,
                value,
                key,
                query_mask=query_mask,
                value_mask=value_mask,
                score_mode=score_mode,
                scale=scale,
                concat_score_weight=csw if score_mode == "concat" else None,
            )
            return jnp.sum(out * weights)

        grad = self.variant(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        scalars = (jnp.float32(0.9), jnp.float32(1.3))
        grads = grad(query, key, value, *scalars, query_mask, value_mask, weights)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        for g in grads[:3]:
            np.testing.assert_array_equal(g[0], 0.0)
        assert np.abs(grads[3]) > 0
        if score_mode == "concat":
            assert np.abs(grads[4]) > 0
        # The reference call is jitted in both variants: eager grads of new shapes are slow.
        dropped = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
            query[1:], key[1:], value[1:], *scalars, query_mask[1:], value_mask[1:], weights[1:]
        )
        for g, d in zip(grads, dropped, strict=True):
            np.testing.assert_allclose(g if g.ndim == 0 else g[1:], d, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_grads_finite_with_fully_masked_rows_not_query_masked(self):
        """A fully masked (uniform) row that still reaches the loss has finite grads too."""
        query, value, key, _, value_mask, weights = _loss_inputs(23)

        def loss(query, key, value, scale, csw):
            out = la.attention(
                query,
                value,
                key,
                value_mask=value_mask,
                use_causal_mask=True,
                score_mode="concat",
                scale=scale,
                concat_score_weight=csw,
            )
            return jnp.sum(out * weights)

        grads = self.variant(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(
            query, key, value, jnp.float32(0.5), jnp.float32(2.0)
        )
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
        # Example 0's values still get gradient: its rows are (near) uniform averages.
        assert np.abs(grads[2][0]).sum() > 0
