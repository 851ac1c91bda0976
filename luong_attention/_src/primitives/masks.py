"""Mask helpers: causal masks, combining masks, and applying them to scores.

Masks are boolean with ``True`` meaning "attend", as in Keras, Flax and JAX. Integer or
float masks are accepted wherever a mask is: any non-zero entry counts as ``True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# Keras fills masked scores by *subtracting* 1e9 (not by replacing them), so a fully masked
# row keeps a (near) uniform softmax and stays finite. We keep the same constant for exact
# parity, but always apply it in float32 or wider: Keras's float16 variant (subtract 65504)
# overflows to -inf for scores below about -17 and then gives NaN.
MASK_PENALTY = 1.0e9


def as_bool_mask(mask: ArrayLike | None) -> jax.Array | None:
    """Converts a bool/int/float mask to bool (non-zero means attend); ``None`` passes through."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def causal_mask(q_length: int, kv_length: int) -> jax.Array:
    """A top-left aligned causal mask, as Keras builds it.

    Query ``i`` may attend to key ``j`` iff ``j <= i``, counting both from the start, also
    when ``q_length != kv_length``.

    Note:
      This is *not* the bottom-right alignment a KV cache needs: with ``q_length == 1`` the
      single query sees only key 0, whatever ``kv_length`` is. For incremental decoding pass
      an explicit ``value_mask`` instead of ``use_causal_mask``.

    Args:
      q_length: number of queries, Tq.
      kv_length: number of keys, Tv.

    Returns:
      bool ``[q_length, kv_length]``.
    """
    rows = jnp.arange(q_length)[:, None]
    cols = jnp.arange(kv_length)[None, :]
    return rows >= cols


def score_mask(
    value_mask: ArrayLike | None,
    *,
    use_causal_mask: bool,
    q_length: int,
    kv_length: int,
) -> jax.Array | None:
    """Combines the value mask and the causal mask by logical AND.

    Args:
      value_mask: ``[batch..., kv_length]`` or ``None``.
      use_causal_mask: whether to add :func:`causal_mask`.
      q_length: Tq.
      kv_length: Tv.

    Returns:
      ``None`` when there is no mask at all; otherwise a bool mask broadcastable to the
      scores ``[batch..., q_length, kv_length]``: ``[batch..., 1, kv_length]`` for a value mask
      alone, ``[q_length, kv_length]`` for causal alone, ``[batch..., q_length, kv_length]``
      for both.
    """
    value_mask = as_bool_mask(value_mask)
    if value_mask is not None:
        value_mask = value_mask[..., None, :]
    if not use_causal_mask:
        return value_mask
    causal = causal_mask(q_length, kv_length)
    return causal if value_mask is None else jnp.logical_and(value_mask, causal)


def mask_scores(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Pushes masked scores down by :data:`MASK_PENALTY`, as Keras does.

    Masked entries get exactly zero weight after the softmax of any row that has an
    unmasked entry; a fully masked row gets (close to) uniform weights, never NaN.

    Args:
      scores: ``[batch..., q_length, kv_length]``, float32 or wider.
      mask: bool, broadcastable to ``scores``, or ``None``.

    Returns:
      The masked scores, same shape and dtype as ``scores``.
    """
    if mask is None:
        return scores
    return jnp.where(mask, scores, scores - jnp.asarray(MASK_PENALTY, scores.dtype))
