"""Parity with ``keras.layers.Attention`` (Keras 3, JAX backend) over the whole option grid.

Every case compares our module (built from the Keras layer with ``from_keras_layer``) and our
functional API against the Keras layer, outputs and weights within 2e-5, and checks Keras
against the NumPy-loop reference too, so that the reference used elsewhere is pinned to Keras.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from helpers.reference import MASK_KINDS, grid, make_masks, random_inputs, reference_attention

import luong_attention as la
from luong_attention import keras_compat

TOL = 2e-5
# Non-trivial weights loaded into Keras (layer.set_weights) and, through it, into ours.
SCALE, CONCAT_WEIGHT = 0.63, 1.7

# (batch dims, Tq, Tv, dim, dim_v): all sizes distinct within a shape.
SHAPES = {
    "tq<tv": ((3,), 5, 7, 4, 6),
    "tq>tv": ((2,), 9, 4, 5, 3),
    "tq=1": ((4,), 1, 6, 3, 5),
    "4d": ((2, 3), 4, 5, 6, 7),
}

_LAYERS: dict[tuple[str, bool], object] = {}


def keras_layer(keras, score_mode: str, use_scale: bool):
    """One built Keras layer per (score_mode, use_scale), with non-trivial weights."""
    if (score_mode, use_scale) not in _LAYERS:
        layer = keras.layers.Attention(use_scale=use_scale, score_mode=score_mode)
        layer.build([(2, 3, 4), (2, 5, 4)])
        weights = [SCALE] * use_scale + [CONCAT_WEIGHT] * (score_mode == "concat")
        layer.set_weights([np.asarray(w, np.float32) for w in weights])
        _LAYERS[score_mode, use_scale] = layer
    return _LAYERS[score_mode, use_scale]


def keras_mask(mask, causal: bool):
    """Keras 3.15 only expands a rank-2 value mask to ``[batch, 1, Tv]`` on its non-causal
    path, so N-D value masks fail to broadcast there; we accept ``[batch..., Tv]`` for any
    batch rank. Hand Keras the ``[batch..., 1, Tv]`` mask it can broadcast in that case."""
    if mask is None or causal or mask[1] is None or mask[1].ndim <= 2:
        return mask
    return [mask[0], mask[1][..., None, :]]


@pytest.mark.parametrize(
    ("score_mode", "use_scale", "with_key", "mask_kind", "causal", "shape"),
    grid(
        score_mode=("dot", "concat"),
        use_scale=(False, True),
        with_key=(True, False),
        mask_kind=MASK_KINDS,
        causal=(False, True),
        shape=tuple(SHAPES),
    ),
)
def test_matches_keras(keras, score_mode, use_scale, with_key, mask_kind, causal, shape):
    batch, tq, tv, dim, dim_v = SHAPES[shape]
    seed = zlib.crc32(repr((score_mode, use_scale, with_key, mask_kind, causal, shape)).encode())
    query, value, key = random_inputs(seed, batch, tq, tv, dim, dim_v, with_key=with_key)
    query_mask, value_mask = make_masks(mask_kind, seed, batch, tq, tv)
    inputs = [query, value] if key is None else [query, value, key]
    mask = None if mask_kind == "none" else [query_mask, value_mask]

    layer = keras_layer(keras, score_mode, use_scale)
    k_out, k_w = layer(
        inputs, mask=keras_mask(mask, causal), return_attention_scores=True, use_causal_mask=causal
    )
    k_out, k_w = np.asarray(k_out), np.asarray(k_w)

    module, variables = keras_compat.from_keras_layer(layer)
    out, w = module.apply(
        variables, inputs, mask=mask, return_attention_scores=True, use_causal_mask=causal
    )
    np.testing.assert_allclose(out, k_out, atol=TOL, rtol=0)
    np.testing.assert_allclose(w, k_w, atol=TOL, rtol=0)
    assert out.shape == (*batch, tq, value.shape[-1]) and w.shape == (*batch, tq, tv)

    f_out, f_w = la.attention(
        query,
        value,
        key,
        query_mask=query_mask,
        value_mask=value_mask,
        use_causal_mask=causal,
        score_mode=score_mode,
        scale=SCALE if use_scale else None,
        concat_score_weight=CONCAT_WEIGHT if score_mode == "concat" else None,
        return_attention_scores=True,
    )
    np.testing.assert_allclose(f_out, k_out, atol=TOL, rtol=0)
    np.testing.assert_allclose(f_w, k_w, atol=TOL, rtol=0)

    r_out, r_w = reference_attention(
        query,
        value,
        key,
        query_mask=query_mask,
        value_mask=value_mask,
        causal=causal,
        score_mode=score_mode,
        scale=SCALE if use_scale else None,
        concat_score_weight=CONCAT_WEIGHT if score_mode == "concat" else None,
    )
    np.testing.assert_allclose(k_out, r_out, atol=TOL, rtol=0)
    np.testing.assert_allclose(k_w, r_w, atol=TOL, rtol=0)


def test_grid_has_fully_masked_rows_and_distinct_sizes():
    """The grid really exercises fully masked rows and all-distinct sizes (guards the guards)."""
    for batch, tq, tv, dim, dim_v in SHAPES.values():
        assert len({*batch, tq, tv, dim, dim_v}) == len(batch) + 4
        query_mask, value_mask = make_masks("both", 0, batch, tq, tv)
        assert not value_mask.reshape(-1, tv)[0].any()
        assert not query_mask.reshape(-1, tq)[0].any()
        assert value_mask.reshape(-1, tv)[1:].any(axis=-1).all()


@pytest.mark.parametrize("score_mode", ["dot", "concat"])
def test_training_without_dropout_matches_keras(keras, score_mode):
    """training=True with dropout=0 is a no-op in both libraries."""
    query, value, key = random_inputs(3, (2,), 3, 5, 4, 6)
    layer = keras_layer(keras, score_mode, True)
    expected = np.asarray(layer([query, value, key], training=True))
    module, variables = keras_compat.from_keras_layer(layer)
    out = module.apply(variables, [query, value, key], training=True)
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
