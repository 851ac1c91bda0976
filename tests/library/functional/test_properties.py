"""Hypothesis properties of the weights and the output, over random shapes, masks and modes."""

from __future__ import annotations

import numpy as np
from helpers.reference import random_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

import luong_attention as la

SETTINGS = settings(max_examples=25, deadline=None)


# (batch dims, Tq, Tv, dim, dim_v), including no batch dims, Tq = 1 and Tv = 1. A fixed set
# keeps JAX's per-shape compilation cache warm across examples.
SHAPES = [
    ((), 3, 5, 2, 4),
    ((2,), 1, 4, 3, 5),
    ((3,), 5, 2, 4, 1),
    ((2, 2), 4, 3, 1, 2),
    ((4,), 2, 1, 3, 5),
]


@st.composite
def cases(draw, causal=None):
    """Small random problems: sizes, a value mask (possibly with fully masked rows), modes."""
    batch, tq, tv, dim, dim_v = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    query, value, key = random_inputs(seed, batch, tq, tv, dim, dim_v)
    value_mask = np.random.default_rng(seed + 1).random((*batch, tv)) < draw(st.floats(0.0, 1.0))
    kwargs = {
        "value_mask": value_mask,
        "use_causal_mask": draw(st.booleans() if causal is None else causal),
        "score_mode": draw(st.sampled_from(["dot", "concat"])),
        "scale": draw(st.none() | st.floats(0.1, 2.0)),
    }
    return query, value, key, kwargs


def effective_mask(value_mask, causal, tq, tv):
    """The ``[batch..., Tq, Tv]`` mask a row really sees (value mask AND causal)."""
    mask = np.broadcast_to(value_mask[..., None, :], (*value_mask.shape[:-1], tq, tv))
    return mask & np.tril(np.ones((tq, tv), bool)) if causal else mask


@SETTINGS
@given(cases())
def test_weights_are_a_distribution_with_exact_zeros(case):
    query, value, key, kwargs = case
    _, w = la.attention(query, value, key, return_attention_scores=True, **kwargs)
    w = np.asarray(w)
    mask = effective_mask(kwargs["value_mask"], kwargs["use_causal_mask"], *w.shape[-2:])
    assert np.isfinite(w).all() and (w >= 0).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)  # fully masked rows included
    live = mask.any(-1, keepdims=True)
    assert (w[~mask & live] == 0).all()
    # A fully masked row is uniform when |score| < 32: float32 ``score - 1e9`` then rounds to
    # -1e9 (spacing 64 there). Concat scores are bounded by dim <= 4.
    dot = np.abs(query @ np.swapaxes(key, -1, -2)).max() * (kwargs["scale"] or 1.0)
    if kwargs["score_mode"] == "concat" or dot < 32:
        dead = np.broadcast_to(~live, w.shape)
        np.testing.assert_allclose(w[dead], 1.0 / w.shape[-1], atol=1e-6)


@SETTINGS
@given(cases(causal=st.just(False)), st.randoms(use_true_random=False))
def test_permuting_keys_and_values_together_leaves_output_unchanged(case, random):
    query, value, key, kwargs = case
    tv = value.shape[-2]
    perm = np.asarray(random.sample(range(tv), tv))
    out, w = la.attention(query, value, key, return_attention_scores=True, **kwargs)
    permuted = dict(kwargs, value_mask=kwargs["value_mask"][..., perm])
    p_out, p_w = la.attention(
        query, value[..., perm, :], key[..., perm, :], return_attention_scores=True, **permuted
    )
    np.testing.assert_allclose(p_out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_w, np.asarray(w)[..., perm], rtol=1e-5, atol=1e-7)


@SETTINGS
@given(cases(), st.data())
def test_query_mask_only_zeroes_rows(case, data):
    query, value, key, kwargs = case
    seed = data.draw(st.integers(0, 2**31 - 1))
    query_mask = np.random.default_rng(seed).random(query.shape[:-1]) < 0.5
    out, w = la.attention(query, value, key, return_attention_scores=True, **kwargs)
    m_out, m_w = la.attention(
        query, value, key, query_mask=query_mask, return_attention_scores=True, **kwargs
    )
    np.testing.assert_array_equal(m_w, w)
    np.testing.assert_array_equal(np.asarray(m_out)[query_mask], np.asarray(out)[query_mask])
    assert (np.asarray(m_out)[~query_mask] == 0).all()
