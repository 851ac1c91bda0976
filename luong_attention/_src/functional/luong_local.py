"""Luong et al. (2015) local attention: source lengths, aligned positions and windows.

``"local-m"`` aligns decoder step ``t`` at ``p_t = t`` (:func:`monotonic_positions`),
``"local-p"`` predicts ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))``
(:func:`predictive_positions`); the window ``[p_t - D, p_t + D]`` masks the scores
(:func:`window_mask`) and ``"local-p"`` weighs the alignment by a Gaussian around ``p_t``
(:func:`gaussian_weights`). Shapes follow :mod:`luong_attention._src.functional.luong`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from luong_attention._src.primitives.checks import check_param
from luong_attention._src.primitives.scores import PrecisionLike, stats_dtype


def source_lengths_of(
    memory_mask: jax.Array | None, source_lengths: ArrayLike | None, kv_length: int
) -> jax.Array:
    """Source length ``S`` per example: ``source_lengths``, else the mask's count, else Tv.

    Args:
      memory_mask: bool ``[batch..., kv_length]`` or ``None``.
      source_lengths: int ``[batch...]`` or ``None``.
      kv_length: Tv.

    Returns:
      int32 ``[batch...]`` (``[]`` when neither is given).
    """
    if source_lengths is not None:
        return jnp.asarray(source_lengths, jnp.int32)
    if memory_mask is not None:
        return jnp.sum(memory_mask, axis=-1, dtype=jnp.int32)
    return jnp.asarray(kv_length, jnp.int32)


def length_mask(source_lengths: ArrayLike, kv_length: int) -> jax.Array:
    """bool ``[batch..., kv_length]``: position ``s`` is kept iff ``s < source_lengths``."""
    return jnp.arange(kv_length) < jnp.asarray(source_lengths)[..., None]


def monotonic_positions(steps: ArrayLike, source_lengths: ArrayLike) -> jax.Array:
    """local-m centres ``p_t = t``, clipped to the last source position ``S - 1``.

    Clipping keeps the window non-empty when the target runs longer than the source.

    Args:
      steps: int decoder steps ``[batch..., q_length]``.
      source_lengths: int ``[batch...]``.

    Returns:
      float32 ``[batch..., q_length]``.
    """
    last = jnp.maximum(jnp.asarray(source_lengths) - 1, 0)[..., None]
    return jnp.minimum(jnp.asarray(steps), last).astype(jnp.float32)


def predictive_positions(
    query: jax.Array,
    w_p: ArrayLike,
    v_p: ArrayLike,
    source_lengths: ArrayLike,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
    """local-p centres ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))``, in ``[0, S]``.

    Args:
      query: ``[batch..., q_length, query_depth]``.
      w_p: ``[query_depth, units]``.
      v_p: ``[units]``.
      source_lengths: ``S``, int ``[batch...]``.
      precision: matmul precision.

    Returns:
      ``[batch..., q_length]`` in ``stats_dtype`` of the query (differentiable).
    """
    units = check_param("w_p", w_p, (query.shape[-1], None), "mode='local-p'")
    check_param("v_p", v_p, (units,), "mode='local-p'")
    out = stats_dtype(jnp.result_type(query, w_p, v_p))
    hidden = jnp.tanh(
        jnp.einsum("...qd,du->...qu", query, w_p, precision=precision, preferred_element_type=out)
    )
    logits = jnp.einsum("...qu,u->...q", hidden, jnp.asarray(v_p, out), precision=precision)
    lengths = jnp.asarray(source_lengths, out)[..., None]
    return lengths * jax.nn.sigmoid(logits)


def window_mask(positions: jax.Array, kv_length: int, window: int) -> jax.Array:
    """bool ``[batch..., q_length, kv_length]``: source ``s`` is in ``[p_t - D, p_t + D]``.

    Args:
      positions: window centres ``p_t``, ``[batch..., q_length]`` (int or float).
      kv_length: Tv.
      window: the half-width ``D >= 0``.
    """
    offsets = jnp.arange(kv_length) - positions[..., None]
    return jnp.abs(offsets) <= window


def gaussian_weights(positions: jax.Array, kv_length: int, window: int) -> jax.Array:
    """local-p's factor ``exp(-(s - p_t)^2 / (2 sigma^2))`` with ``sigma = D / 2``.

    Args:
      positions: ``[batch..., q_length]``, float.
      kv_length: Tv.
      window: ``D >= 1``.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``positions``' dtype.
    """
    sigma = window / 2.0
    offsets = jnp.arange(kv_length, dtype=positions.dtype) - positions[..., None]
    return jnp.exp(-jnp.square(offsets) / (2.0 * sigma * sigma))


# -- the attention ---------------------------------------------------------------------------
