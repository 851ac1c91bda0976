"""Sequence-parallel attention: keys and values split over a mesh axis with ``shard_map``.

Every device on the axis holds all queries and one contiguous slice of the keys, values and
value mask. It computes the attention of all queries over its slice (a *partial result*: the
normalised output and the log of its softmax denominator), and the partial results are merged
exactly with their logsumexp, so the merged output equals :func:`attention` on one device.

Shapes follow the legend in :mod:`luong_attention._src.scores`; ``shard_length`` (Ts) is the
number of keys on one device.

Fully masked rows need care. Keras fills masked scores with ``score - 1e9``; a row whose keys
are *all* masked then gets the softmax of those filled scores (about the mean of the values).
In float32 a logsumexp near ``-1e9`` is rounded to a multiple of 64, which would lose the
weight of each slice. So every row of a partial result carries a *level*:

* 2: the slice has a key the row may attend to (the usual case);
* 1: the slice only has keys the row masks: the partial result is the softmax of the filled
  scores with the penalty added back (exact in float32, the same numbers the core softmax sees);
* 0: the slice only has padding keys (added to make ``kv_length`` divisible by the devices).

The merge keeps, per row, only the slices at the highest level over the axis: padding never
counts, and masked keys only count when the row has nothing else, exactly as in the core.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from luong_attention._src.attention import (
    ScoreMode,
    apply_query_mask,
    apply_scores,
    compute_scores,
    validate_attention_args,
)
from luong_attention._src.masks import MASK_PENALTY, as_bool_mask, mask_scores
from luong_attention._src.scores import stats_dtype

# Row levels of a partial result (see the module docstring).
PADDING_ONLY, MASKED_ONLY, VISIBLE = 0, 1, 2


def pad_length(x: jax.Array, axis: int, length: int, fill: bool | float = 0) -> jax.Array:
    """Pads ``x`` at the end of ``axis`` with ``fill`` up to ``length`` entries."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=fill)


def offset_causal_mask(q_length: int, kv_length: int, kv_offset: ArrayLike) -> jax.Array:
    """The top-left causal mask of queries ``0..Tq-1`` against keys ``kv_offset..+Ts-1``.

    Global query ``i`` may attend to global key ``j`` iff ``j <= i``, as in :func:`causal_mask`.

    Returns:
      bool ``[q_length, kv_length]``.
    """
    rows = jnp.arange(q_length)[:, None]
    cols = kv_offset + jnp.arange(kv_length)[None, :]
    return rows >= cols


def visible_keys(
    value_mask: jax.Array | None,
    *,
    use_causal_mask: bool,
    q_length: int,
    shard_length: int,
    kv_offset: ArrayLike,
    kv_length: int,
) -> tuple[jax.Array, jax.Array]:
    """Which keys of one slice each query may attend to, and which keys are real.

    Args:
      value_mask: the slice's ``[batch..., shard_length]`` value mask, or ``None``.
      use_causal_mask: whether to add the causal mask in global positions.
      q_length: Tq; shard_length: Ts.
      kv_offset: global position of the slice's first key (may be traced).
      kv_length: the global number of real keys; later positions are padding.

    Returns:
      ``(visible, real)``: bool ``visible`` broadcastable to ``[batch..., q_length,
      shard_length]`` (value mask AND causal AND real) and bool ``real [shard_length]``.
    """
    real = kv_offset + jnp.arange(shard_length) < kv_length
    visible = real[None, :]
    value_mask = as_bool_mask(value_mask)
    if value_mask is not None:
        visible = jnp.logical_and(visible, value_mask[..., None, :])
    if use_causal_mask:
        causal = offset_causal_mask(q_length, shard_length, kv_offset)
        visible = jnp.logical_and(visible, causal)
    return visible, real


def row_levels(visible: jax.Array, real: jax.Array) -> jax.Array:
    """Each row's level in one slice: ``VISIBLE``, ``MASKED_ONLY`` or ``PADDING_ONLY``.

    Args:
      visible: bool, broadcastable to ``[batch..., q_length, shard_length]``.
      real: bool ``[shard_length]``.

    Returns:
      int32 ``[batch..., q_length]`` (leading dims as broadcast in ``visible``).
    """
    level = jnp.where(jnp.any(real), MASKED_ONLY, PADDING_ONLY)
    return jnp.where(jnp.any(visible, axis=-1), VISIBLE, level).astype(jnp.int32)


def shard_partial(
    scores: jax.Array,
    value: jax.Array,
    visible: jax.Array,
    real: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The partial result of one slice of keys, with the core's mask fill.

    Rows with a visible key get the core's masked softmax over the slice. Rows whose real
    keys are all masked get the penalty added back (exact: the filled score is a multiple of
    the float32 spacing near ``1e9``), so their logsumexp stays representable. Padding keys
    get twice the penalty on top, so they never weigh against a real key.

    Args:
      scores: ``[batch..., q_length, shard_length]`` in float32 or wider.
      value: ``[batch..., shard_length, value_depth]`` in the scores' dtype.
      visible: bool, broadcastable to ``scores``; real: bool ``[shard_length]``.

    Returns:
      ``(output, lse, level)``: the normalised ``output [batch..., q_length, value_depth]``,
      ``lse [batch..., q_length]`` (the log of its softmax denominator) and the int32 row
      ``level [batch..., q_length]``.
    """
    level = jnp.broadcast_to(row_levels(visible, real), scores.shape[:-1])
    penalty = jnp.asarray(MASK_PENALTY, scores.dtype)
    filled = mask_scores(scores, visible)
    filled = filled + jnp.where(level == MASKED_ONLY, penalty, 0.0)[..., None]
    filled = jnp.where(real, filled, filled - 2 * penalty)
    output, _ = apply_scores(filled, value)
    return output, jax.nn.logsumexp(filled, axis=-1), level


def merge_partials(
    output: jax.Array, lse: jax.Array, level: jax.Array, axis_name: str
) -> jax.Array:
    """Merges the partial results of all slices on ``axis_name`` (inside ``shard_map``).

    Per row, only slices at the highest level over the axis count; each is weighted by its
    softmax denominator, ``exp(lse - max lse)``.

    Args:
      output: ``[batch..., q_length, value_depth]``; lse, level: ``[batch..., q_length]``.
      axis_name: the mesh axis the keys are split over.

    Returns:
      The merged output ``[batch..., q_length, value_depth]``, the same on every device.
    """
    use = level == jax.lax.pmax(level, axis_name)
    # The shift only keeps exp() in range; it cancels exactly, so no gradient flows into it.
    shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.where(use, lse, -jnp.inf)), axis_name)
    # Double where: unused slices get weight 0 and a zero (not NaN) gradient.
    weight = jnp.where(use, jnp.exp(jnp.where(use, lse - shift, 0.0)), 0.0)
    total = jax.lax.psum(weight, axis_name)
    return jax.lax.psum(weight[..., None] * output, axis_name) / total[..., None]


def _split_spec(ndim: int, axis: int, axis_name: str) -> P:
    """A PartitionSpec splitting dimension ``axis`` (negative) of an ``ndim`` array."""
    spec = [None] * ndim
    spec[axis] = axis_name
    return P(*spec)


def sequence_parallel_attention(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None = None,
    *,
    mesh: Mesh,
    axis_name: str,
    query_mask: ArrayLike | None = None,
    value_mask: ArrayLike | None = None,
    use_causal_mask: bool = False,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
) -> jax.Array:
    """:func:`attention` with the keys, values and value mask split over a mesh axis.

    Each device on ``mesh.axis_names[axis_name]`` holds ``ceil(kv_length / n)`` keys (the last
    ones padded; padding never changes the result) and all queries; the partial results are
    merged with their logsumexp (:func:`merge_partials`). The result equals :func:`attention`
    up to float rounding, fully masked rows included, and is differentiable with respect to
    ``query``, ``key``, ``value``, ``scale`` and ``concat_score_weight``. Other mesh axes
    replicate the computation. Works eagerly and under ``jax.jit``, on one host or many
    (after ``jax.distributed.initialize``).

    Args:
      query: ``[batch..., q_length, depth]`` (replicated on every device).
      value: ``[batch..., kv_length, value_depth]``.
      key: ``[batch..., kv_length, depth]``; ``None`` uses ``value``.
      mesh: the device mesh; axis_name: the axis to split the keys over.
      query_mask, value_mask, use_causal_mask, score_mode, scale, concat_score_weight: as in
        :func:`attention` (causal in global positions: query ``i`` sees keys ``j <= i``).

    Returns:
      ``[batch..., q_length, value_depth]`` in the inputs' dtype, replicated over the mesh.

    Raises:
      ValueError, TypeError: for bad arguments, or an ``axis_name`` the mesh does not have.
    """
    query, value, key, query_mask, value_mask = validate_attention_args(
        query,
        value,
        key,
        query_mask,
        value_mask,
        score_mode=score_mode,
        concat_score_weight=concat_score_weight,
        dropout_rate=0.0,
        dropout_rng=None,
    )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name must be one of the mesh's axes {mesh.axis_names}. "
            f"Received: axis_name={axis_name!r}"
        )
    dtype = jnp.result_type(query, key, value)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    devices = mesh.shape[axis_name]
    shard_length = -(-kv_length // devices)
    padded = shard_length * devices
    key = pad_length(key, -2, padded)
    value = pad_length(value.astype(stats_dtype(dtype)), -2, padded)
    if value_mask is not None:
        value_mask = pad_length(as_bool_mask(value_mask), -1, padded, False)
    params = {"scale": scale, "concat_score_weight": concat_score_weight}

    def local(query, key, value, value_mask, params):
        kv_offset = jax.lax.axis_index(axis_name) * shard_length
        visible, real = visible_keys(
            value_mask,
            use_causal_mask=use_causal_mask,
            q_length=q_length,
            shard_length=shard_length,
            kv_offset=kv_offset,
            kv_length=kv_length,
        )
        scores = compute_scores(query, key, score_mode=score_mode, **params)
        return merge_partials(*shard_partial(scores, value, visible, real), axis_name)

    mask_spec = P() if value_mask is None else _split_spec(value_mask.ndim, -1, axis_name)
    output = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            P(),
            _split_spec(key.ndim, -2, axis_name),
            _split_spec(value.ndim, -2, axis_name),
            mask_spec,
            P(),
        ),
        out_specs=P(),
    )(query, key, value, value_mask, params)
    return apply_query_mask(output, query_mask).astype(dtype)
