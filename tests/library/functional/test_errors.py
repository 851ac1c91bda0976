"""Bad input: a clear ValueError/TypeError naming the argument and the shapes, at trace time."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import luong_attention as la
from luong_attention import Attention

Q = np.ones((2, 3, 4), np.float32)  # [B, Tq, dim]
V = np.ones((2, 5, 6), np.float32)  # [B, Tv, dim_v]
K = np.ones((2, 5, 4), np.float32)  # [B, Tv, dim]


# -- the module's inputs and mask lists (Keras's test_attention_errors messages) ---------------


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (Q, "must be called on a list"),
        ({"query": Q, "value": V}, "must be called on a list"),
        ([Q], "length 2 or 3"),
        ([Q, V, K, K], "length 2 or 3"),
    ],
)
def test_module_inputs_must_be_a_list_of_2_or_3(inputs, match):
    with pytest.raises(ValueError, match=match):
        Attention().apply({}, inputs)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.ones((2, 3), bool), "mask must be a list"),
        ([np.ones((2, 3), bool)], "length 2 or 3"),
        ([None, None, None, None], "length 2 or 3"),
    ],
)
def test_module_mask_must_be_a_list_of_2_or_3(mask, match):
    with pytest.raises(ValueError, match=match):
        Attention().apply({}, [Q, V, K], mask=mask)


# -- construction ---------------------------------------------------------------------------------


def test_unknown_score_mode_at_construction():
    expected = re.escape("Invalid value for argument score_mode. Expected one of {'dot', 'concat'}")
    with pytest.raises(ValueError, match=expected + ".*'general'"):
        Attention(score_mode="general")
    with pytest.raises(ValueError, match="score_mode"):
        la.attention(Q, V, K, score_mode="additive")


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\)"):
        Attention(dropout=rate)
    with pytest.raises(ValueError, match=r"dropout_rate must be a float in \[0, 1\)"):
        la.attention(Q, V, K, dropout_rate=rate, dropout_rng=jax.random.key(0))


def test_dropout_not_a_number():
    with pytest.raises(TypeError, match="dropout must be a float"):
        Attention(dropout="0.1x")


def test_traced_dropout_rate_is_rejected():
    with pytest.raises(TypeError, match="dropout_rate must be a concrete float"):
        jax.jit(lambda r: la.attention(Q, V, K, dropout_rate=r, dropout_rng=jax.random.key(0)))(0.1)


def test_dropout_rate_needs_rng_in_functional_api():
    with pytest.raises(ValueError, match="dropout_rng"):
        la.attention(Q, V, K, dropout_rate=0.1)


def test_concat_score_weight_needs_concat_mode():
    with pytest.raises(ValueError, match=r"concat_score_weight.*score_mode='concat'.*'dot'"):
        la.attention(Q, V, K, concat_score_weight=2.0)


# -- shapes ----------------------------------------------------------------------------------------


def shapes_pattern(q, k, v):
    return re.escape(f"query.shape={q}, key.shape={k}, value.shape={v}")


def test_depth_mismatch():
    k = np.ones((2, 5, 7), np.float32)
    with pytest.raises(ValueError, match="same depth") as err:
        la.attention(Q, V, k)
    assert re.search(shapes_pattern((2, 3, 4), (2, 5, 7), (2, 5, 6)), str(err.value))
    # Without a key the value is the key: its depth must match the query's.
    with pytest.raises(ValueError, match=r"same depth.*key.shape=\(2, 5, 6\)"):
        Attention().apply({}, [Q, V])


def test_batch_mismatch():
    v, k = np.ones((3, 5, 6), np.float32), np.ones((3, 5, 4), np.float32)
    with pytest.raises(ValueError, match="batch dims") as err:
        la.attention(Q, v, k)
    assert re.search(shapes_pattern((2, 3, 4), (3, 5, 4), (3, 5, 6)), str(err.value))


def test_key_value_length_mismatch():
    k = np.ones((2, 7, 4), np.float32)
    with pytest.raises(ValueError, match="same length") as err:
        la.attention(Q, V, k)
    assert re.search(shapes_pattern((2, 3, 4), (2, 7, 4), (2, 5, 6)), str(err.value))


@pytest.mark.parametrize("name", ["query", "value", "key"])
def test_rank_below_two(name):
    args = {"query": Q, "value": V, "key": K}
    args[name] = np.ones((4,), np.float32)
    with pytest.raises(ValueError, match=rf"{name} must have rank >= 2.*{name}.shape=\(4,\)"):
        la.attention(**args)


def test_value_mask_with_query_length():
    """A11: a (B, Tq) mask where (B, Tv) is due (Tq != Tv) is an error, not a broadcast."""
    with pytest.raises(
        ValueError, match=re.escape("value_mask must have shape [batch..., Tv] = (2, 5)")
    ) as err:
        la.attention(Q, V, K, value_mask=np.ones((2, 3), bool))
    assert "value_mask.shape=(2, 3)" in str(err.value)
    with pytest.raises(ValueError, match="value_mask"):
        Attention().apply({}, [Q, V, K], mask=[None, np.ones((2, 3), bool)])


@pytest.mark.parametrize(
    "shape",
    [(2, 4), (3, 3), (2, 1, 3), (1, 2, 3)],
    ids=["wrong-length", "wrong-batch", "extra-dim", "extra-leading-dim"],
)
def test_query_mask_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"query_mask.shape={shape}")) as err:
        la.attention(Q, V, K, query_mask=np.ones(shape, bool))
    assert "[batch..., Tq] = (2, 3)" in str(err.value)


def test_scalar_mask_rejected():
    with pytest.raises(ValueError, match="value_mask"):
        la.attention(Q, V, K, value_mask=np.bool_(True))


# -- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["query", "value", "key"])
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_non_float_inputs(name, dtype):
    args = {"query": Q, "value": V, "key": K}
    args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match=f"{name} must have a floating-point dtype.*{name}.dtype="):
        la.attention(**args)


def test_non_array_input():
    with pytest.raises(TypeError, match=r"query must be a floating-point array.*object"):
        la.attention(object(), V, K)


def test_string_query_rejected():
    with pytest.raises(TypeError, match=r"query must be a floating-point array.*dtype=<U1"):
        la.attention(np.array([["a"] * 4] * 3), V, K)


def test_string_mask_rejected():
    with pytest.raises(
        TypeError, match=r"value_mask must be a bool, int or float array.*dtype=<U1"
    ):
        la.attention(Q, V, K, value_mask=np.array([["a"] * 5] * 2))


def test_errors_raise_at_trace_time_under_jit():
    """Shape errors come from tracing, before any XLA compilation."""
    f = jax.jit(lambda q, v, k: la.attention(q, v, k))
    with pytest.raises(ValueError, match="same length"):
        jax.eval_shape(f, Q, V, jnp.ones((2, 6, 4)))
