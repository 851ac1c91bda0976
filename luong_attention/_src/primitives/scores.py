"""Score functions: how strongly each query matches each key.

Shape legend used throughout the package:

* ``batch...``: any number of leading batch dimensions, including none.
* ``q_length`` (Tq): number of queries; ``kv_length`` (Tv): number of keys/values.
* ``depth`` (dim): query/key feature size; ``value_depth`` (dim_v): value feature size.

Scores are always returned in ``stats_dtype(dtype)`` (at least float32), because the
softmax that follows must not run in half precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

PrecisionLike = jax.lax.Precision | str | None


def stats_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Returns the dtype for scores and softmax statistics: ``dtype`` promoted to float32.

    float16/bfloat16 become float32; float32 stays; float64 (with x64 on) stays float64.
    """
    return jnp.promote_types(dtype, jnp.float32)


def _scalar(x: ArrayLike | None, dtype: jnp.dtype) -> jax.Array | None:
    """Casts an optional scalar parameter to ``dtype`` (keeps it differentiable)."""
    return None if x is None else jnp.asarray(x).astype(dtype)


def dot_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    scale: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Luong "dot" scores, as Keras's ``score_mode="dot"``: ``scale * query @ key^T``.

    Args:
      query: ``[batch..., q_length, depth]``.
      key: ``[batch..., kv_length, depth]``; batch dims broadcast against ``query``'s.
      scale: optional scalar multiplying the scores; ``None`` means no scaling (it is *not*
        ``1/sqrt(depth)``: Keras's learned scale starts at 1.0).
      precision: matmul precision passed to ``jnp.einsum``.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    out_dtype = stats_dtype(jnp.result_type(query, key))
    scores = jnp.einsum(
        "...qd,...kd->...qk", query, key, precision=precision, preferred_element_type=out_dtype
    )
    scale = _scalar(scale, out_dtype)
    return scores if scale is None else scores * scale


def concat_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
) -> jax.Array:
    """Keras's ``score_mode="concat"``: ``w * sum(tanh(scale * (query + key)), axis=-1)``.

    Despite the name this is no concatenation: Keras adds every query to every key,
    applies ``tanh`` and sums over the features, with a learned scalar ``w``
    (``concat_score_weight``) and an optional scalar ``scale`` inside the ``tanh``.
    It builds a ``[batch..., q_length, kv_length, depth]`` intermediate.

    Args:
      query: ``[batch..., q_length, depth]``.
      key: ``[batch..., kv_length, depth]``; batch dims broadcast against ``query``'s.
      scale: optional scalar inside the ``tanh``; ``None`` means 1.
      concat_score_weight: optional scalar outside the sum; ``None`` means 1.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    out_dtype = stats_dtype(jnp.result_type(query, key))
    # [batch..., q, 1, d] + [batch..., 1, k, d] -> [batch..., q, k, d], in float32.
    pre = query.astype(out_dtype)[..., :, None, :] + key.astype(out_dtype)[..., None, :, :]
    scale = _scalar(scale, out_dtype)
    if scale is not None:
        pre = scale * pre
    scores = jnp.sum(jnp.tanh(pre), axis=-1)
    weight = _scalar(concat_score_weight, out_dtype)
    return scores if weight is None else weight * scores
