"""The functional core: masked softmax, dropout, weighted sum, and ``attention``.

Shapes follow the legend in :mod:`luong_attention._src.scores`.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from luong_attention._src import checks
from luong_attention._src.masks import as_bool_mask, mask_scores, score_mask
from luong_attention._src.scores import PrecisionLike, concat_scores, dot_scores, stats_dtype

ScoreMode = Literal["dot", "concat"]


def compute_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Dispatches to :func:`dot_scores` or :func:`concat_scores`.

    Args:
      query: ``[batch..., q_length, depth]``; key: ``[batch..., kv_length, depth]``.

    Returns:
      ``[batch..., q_length, kv_length]`` in float32 (or wider).
    """
    if score_mode == "dot":
        return dot_scores(query, key, scale=scale, precision=precision)
    return concat_scores(query, key, scale=scale, concat_score_weight=concat_score_weight)


def dropout_weights(weights: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout on attention weights, as Keras: keep with ``1 - rate``, rescale.

    Every weight is dropped independently (no sharing across batch rows).

    Args:
      weights: ``[batch..., q_length, kv_length]``.
      rate: fraction to drop, in ``[0, 1)``.
      rng: a PRNG key.

    Returns:
      The dropped weights, same shape and dtype; kept entries are ``w / (1 - rate)``.
    """
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / jnp.asarray(1.0 - rate, weights.dtype), 0.0)


def apply_scores(
    scores: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax, optional dropout, and the weighted sum of the values.

    The softmax runs in ``scores``' dtype (float32 or wider, see :func:`dot_scores`).

    Args:
      scores: ``[batch..., q_length, kv_length]``.
      value: ``[batch..., kv_length, value_depth]``.
      mask: bool, broadcastable to ``scores`` (see :func:`score_mask`), or ``None``.
      dropout_rate: fraction of weights to drop; 0 disables dropout.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      precision: matmul precision of the weighted sum.

    Returns:
      ``(output, weights)``: ``output [batch..., q_length, value_depth]`` and the (dropped)
      ``weights [batch..., q_length, kv_length]``, both in ``scores``' dtype.
    """
    weights = jax.nn.softmax(mask_scores(scores, mask), axis=-1)
    if dropout_rate > 0.0:
        weights = dropout_weights(weights, dropout_rate, dropout_rng)
    output = jnp.einsum(
        "...qk,...kv->...qv",
        weights,
        value,
        precision=precision,
        preferred_element_type=weights.dtype,
    )
    return output, weights


def apply_query_mask(output: jax.Array, query_mask: ArrayLike | None) -> jax.Array:
    """Zeroes the output rows of masked queries (the weights are left alone, as in Keras).

    Args:
      output: ``[batch..., q_length, value_depth]``.
      query_mask: ``[batch..., q_length]`` or ``None``.

    Returns:
      ``output`` with masked rows set to exactly 0 (even if they held NaN).
    """
    query_mask = as_bool_mask(query_mask)
    if query_mask is None:
        return output
    return jnp.where(query_mask[..., None], output, jnp.zeros((), output.dtype))


def validate_attention_args(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None,
    query_mask: ArrayLike | None,
    value_mask: ArrayLike | None,
    *,
    score_mode: str,
    concat_score_weight: ArrayLike | None,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Checks every argument of :func:`attention` and returns the arrays it will use.

    Returns:
      ``(query, value, key, query_mask, value_mask)`` as arrays; ``key`` is ``value`` when
      none was given.

    Raises:
      ValueError, TypeError: naming the argument, the shapes seen and what was expected.
    """
    checks.check_score_mode(score_mode)
    checks.check_rate("dropout_rate", dropout_rate)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate} needs a PRNG key: pass dropout_rng=jax.random.key(...)."
        )
    if score_mode != "concat" and concat_score_weight is not None:
        raise ValueError(
            "concat_score_weight is only used with score_mode='concat'. "
            f"Received: score_mode={score_mode!r}"
        )
    query = checks.as_float_array("query", query)
    value = checks.as_float_array("value", value)
    key = value if key is None else checks.as_float_array("key", key)
    batch_shape = checks.check_attention_shapes(query, value, key)
    query_mask = checks.check_mask("query_mask", query_mask, batch_shape, query.shape[-2], "Tq")
    value_mask = checks.check_mask("value_mask", value_mask, batch_shape, value.shape[-2], "Tv")
    return query, value, key, query_mask, value_mask


def attention(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None = None,
    *,
    query_mask: ArrayLike | None = None,
    value_mask: ArrayLike | None = None,
    use_causal_mask: bool = False,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_attention_scores: bool = False,
    precision: PrecisionLike = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Luong-style attention with the exact semantics of ``keras.layers.Attention``.

    ``weights = softmax(mask(score(query, key)))`` and ``output = weights @ value``, with the
    scores, masking, dropout and query masking of Keras 3.

    Args:
      query: ``[batch..., q_length, depth]``.
      value: ``[batch..., kv_length, value_depth]``.
      key: ``[batch..., kv_length, depth]``; ``None`` uses ``value`` as the key.
      query_mask: ``[batch..., q_length]``, bool/int/float (non-zero = keep). Masked queries
        get an all-zero output row; their returned weights stay a normal softmax row.
      value_mask: ``[batch..., kv_length]`` (non-zero = attend). Masked keys get weight 0.
      use_causal_mask: add a top-left aligned causal mask (query ``i`` sees keys ``j <= i``),
        combined with ``value_mask`` by AND. See :func:`causal_mask` for ``q_length == 1``.
      score_mode: ``"dot"`` or ``"concat"`` (see :func:`dot_scores`, :func:`concat_scores`).
      scale: ``None`` for no scaling (Keras ``use_scale=False``) or a scalar (float or 0-d
        array, differentiable) applied as Keras applies its ``scale`` weight in each mode.
      concat_score_weight: scalar for ``"concat"``; ``None`` means 1.0.
      dropout_rate: fraction of the attention weights to drop (inverted dropout).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      return_attention_scores: also return the weights (after masking, softmax, dropout).
      precision: matmul precision.

    Returns:
      ``output [batch..., q_length, value_depth]``, or ``(output, weights)`` with
      ``weights [batch..., q_length, kv_length]``; both in the inputs' dtype.

    .. note::
      A fully masked row gets the mean of the values (Keras's ``-1e9`` fill), finite in the
      output and in every gradient. Scores and softmax run in float32 even for float16 and
      bfloat16 inputs, so half-precision inputs never overflow in the mask.

    Raises:
      ValueError, TypeError: for bad shapes, dtypes, ``score_mode`` or dropout arguments.
    """
    query, value, key, query_mask, value_mask = validate_attention_args(
        query,
        value,
        key,
        query_mask,
        value_mask,
        score_mode=score_mode,
        concat_score_weight=concat_score_weight,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    dtype = jnp.result_type(query, key, value)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    scores = compute_scores(
        query,
        key,
        score_mode=score_mode,
        scale=scale,
        concat_score_weight=concat_score_weight,
        precision=precision,
    )
    mask = score_mask(
        value_mask, use_causal_mask=use_causal_mask, q_length=q_length, kv_length=kv_length
    )
    output, weights = apply_scores(
        scores,
        value.astype(stats_dtype(dtype)),
        mask,
        dropout_rate=float(dropout_rate),
        dropout_rng=dropout_rng,
        precision=precision,
    )
    output = apply_query_mask(output, query_mask).astype(dtype)
    batch_shape = output.shape[:-2]
    chex.assert_shape(output, (*batch_shape, q_length, value.shape[-1]))
    chex.assert_shape(weights, (*batch_shape, q_length, kv_length))
    if return_attention_scores:
        return output, weights.astype(dtype)
    return output
