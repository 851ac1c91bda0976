"""Sequence-parallel attention: the sequence split over a mesh axis with ``shard_map``.

:func:`sequence_parallel_attention` runs one of two strategies: the ring
(:mod:`~luong_attention._src.functional.ring`, everything split) or *replicated queries*,
which this module implements and the rest of this docstring describes.

With replicated queries every device on the axis holds all queries and one contiguous slice of
the keys, values and value mask. It computes the attention of all queries over its slice with the blocked kernel
(a *partial result*: the normalised output and the log of its softmax denominator), and the
partial results are merged exactly with their logsumexp, so the merged output equals
:func:`attention` on one device.

Shapes follow the legend in :mod:`luong_attention._src.primitives.scores`; ``shard_length`` (Ts) is the
number of keys on one device.

Fully masked rows need care. Keras fills masked scores with ``score - 1e9``; a row whose keys
are *all* masked then gets the softmax of those filled scores (about the mean of the values).
In float32 a logsumexp near ``-1e9`` is rounded to a multiple of 64, which would lose the
weight of each slice. So every row of a partial result has a *level*:

* 2: the slice has a key the row may attend to (the usual case);
* 1: the slice only has keys the row masks;
* 0: the slice only has padding keys (added to make ``kv_length`` divisible by the devices).

The merge keeps, per row, only the slices at the highest level over the axis: padding never
counts, and masked keys only count when the row has nothing else, exactly as in the core.
Rows at level 1 everywhere (fully masked in the whole sequence) get their partial results
from :func:`fully_masked_partial`, which adds the penalty back so their logsumexp is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from luong_attention._src.functional.attention import (
    ScoreMode,
    apply_query_mask,
    apply_scores,
    blocked_attention_with_lse,
    compute_scores,
    validate_attention_args,
)
from luong_attention._src.functional.layout import (
    Layout,
    check_axes,
    check_zigzag_length,
    pad_length,
    shard_spec,
)
from luong_attention._src.functional.luong import length_mask
from luong_attention._src.functional.ring import RingPlan, ring_attention_shards
from luong_attention._src.primitives.masks import MASK_PENALTY, as_bool_mask, mask_scores
from luong_attention._src.primitives.scores import resolve_matmul_dtype, stats_dtype

# Row levels of a partial result (see the module docstring).
PADDING_ONLY, MASKED_ONLY, VISIBLE = 0, 1, 2
# Score entries (times depth for "concat") per chunk of the fully-masked-row path: 4 MiB.
CHUNK_ELEMENTS = 1 << 20


def row_levels(
    value_mask: jax.Array | None,
    *,
    use_causal_mask: bool,
    q_length: int,
    shard_length: int,
    kv_offset: ArrayLike,
    kv_length: int,
) -> jax.Array:
    """Each query's level in one slice: ``VISIBLE``, ``MASKED_ONLY`` or ``PADDING_ONLY``.

    Costs ``O(q_length + shard_length)`` per batch row: a query sees a key of the slice iff
    the slice's first unmasked real key exists (and, with the causal mask, is at a global
    position ``<=`` the query's).

    Args:
      value_mask: the slice's ``[batch..., shard_length]`` value mask, or ``None``.
      use_causal_mask: whether the causal mask (in global positions) applies.
      q_length: Tq; shard_length: Ts.
      kv_offset: global position of the slice's first key (may be traced).
      kv_length: the global number of real keys; later positions are padding.

    Returns:
      int32 ``[batch..., q_length]`` (the mask's batch dims; none without a mask).
    """
    positions = kv_offset + jnp.arange(shard_length)
    real = positions < kv_length
    value_mask = as_bool_mask(value_mask)
    open_keys = real if value_mask is None else jnp.logical_and(real, value_mask)
    never = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(open_keys, positions, never), axis=-1)[..., None]
    visible = first <= jnp.arange(q_length) if use_causal_mask else first < never
    visible = jnp.broadcast_to(visible, (*first.shape[:-1], q_length))
    fallback = jnp.where(jnp.any(real), MASKED_ONLY, PADDING_ONLY)
    return jnp.where(visible, VISIBLE, fallback).astype(jnp.int32)


def map_query_chunks(
    fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]], query: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Runs ``fn`` on ``chunk`` queries at a time (``lax.map``), recomputed in the backward pass.

    Args:
      fn: maps ``[batch..., chunk, depth]`` to ``(out [batch..., chunk, value_depth],
        lse [batch..., chunk])``.
      query: ``[batch..., q_length, depth]``; chunk: queries per step.

    Returns:
      ``(out [batch..., q_length, value_depth], lse [batch..., q_length])``.
    """
    q_length, depth = query.shape[-2:]
    chunks = -(-q_length // chunk)
    query = pad_length(query, -2, chunks * chunk)
    query = jnp.moveaxis(query.reshape(*query.shape[:-2], chunks, chunk, depth), -3, 0)
    out, lse = jax.lax.map(jax.checkpoint(fn), query)
    out = jnp.moveaxis(out, 0, -3)
    out = out.reshape(*out.shape[:-3], chunks * chunk, out.shape[-1])[..., :q_length, :]
    lse = jnp.moveaxis(lse, 0, -2)
    return out, lse.reshape(*lse.shape[:-2], chunks * chunk)[..., :q_length]


def fully_masked_partial(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    *,
    real: jax.Array,
    score_mode: ScoreMode,
    scale: ArrayLike | None,
    concat_score_weight: ArrayLike | None,
) -> tuple[jax.Array, jax.Array]:
    """The exact partial result of rows that see no key of the slice.

    Every real key of such a row is masked, so the core's softmax sees ``score - 1e9`` for
    all of them. Adding the penalty back is exact (the filled score is a multiple of the
    float32 spacing near ``1e9``), which keeps the logsumexp representable; padding keys get
    ``-1e9`` instead, so they never count. Other rows' results are meaningless. The scores
    are built for a chunk of queries at a time (at most :data:`CHUNK_ELEMENTS` entries).

    Args:
      query: ``[batch..., q_length, depth]``; key: ``[batch..., shard_length, depth]``.
      value: ``[batch..., shard_length, value_depth]`` in float32 (or wider).
      real: bool ``[shard_length]``, ``False`` at padding keys.
      score_mode, scale, concat_score_weight: as in :func:`attention`.

    Returns:
      ``(output [batch..., q_length, value_depth], lse [batch..., q_length])``.
    """

    def chunk_partial(query: jax.Array) -> tuple[jax.Array, jax.Array]:
        scores = compute_scores(
            query, key, score_mode=score_mode, scale=scale, concat_score_weight=concat_score_weight
        )
        penalty = jnp.asarray(MASK_PENALTY, scores.dtype)
        # The barrier stops XLA from folding ``(s - 1e9) + 1e9`` back into ``s``.
        filled = jax.lax.optimization_barrier(mask_scores(scores, jnp.zeros((), bool))) + penalty
        filled = jnp.where(real, filled, -penalty)
        output, _ = apply_scores(filled, value)
        return output, jax.nn.logsumexp(filled, axis=-1)

    per_query = key.shape[-2] * (key.shape[-1] if score_mode == "concat" else 1)
    chunk = max(1, min(query.shape[-2], CHUNK_ELEMENTS // per_query))
    return map_query_chunks(chunk_partial, query, chunk)


def shard_partial(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    *,
    value_mask: jax.Array | None,
    use_causal_mask: bool,
    kv_offset: ArrayLike,
    kv_length: int,
    fully_masked: jax.Array | None,
    score_mode: ScoreMode,
    scale: ArrayLike | None,
    concat_score_weight: ArrayLike | None,
) -> tuple[jax.Array, jax.Array]:
    """The partial result of all queries over one slice of keys (inside ``shard_map``).

    Runs the blocked kernel (:func:`blocked_attention_with_lse`, padding keys masked). Its
    logsumexp is only float32-exact for rows with a visible key, so if some query is
    ``fully_masked`` (sees no key in the whole sequence), those rows are recomputed by
    :func:`fully_masked_partial`, under a ``lax.cond`` that skips it otherwise.

    Args:
      query: ``[batch..., q_length, depth]``; key: ``[batch..., shard_length, depth]``.
      value: ``[batch..., shard_length, value_depth]`` in float32 (or wider).
      value_mask: ``[batch..., shard_length]``, ``False`` at padding keys (``None`` only
        when there is neither a mask nor padding).
      use_causal_mask: causal mask in global positions (queries start at 0).
      kv_offset: global position of the slice's first key; kv_length: real keys overall.
      fully_masked: bool ``[batch..., q_length]``, the queries that see no key at all;
        ``None`` when there can be none (no value mask), which skips the check.
      score_mode, scale, concat_score_weight: as in :func:`attention`.

    Returns:
      ``(output [batch..., q_length, value_depth], lse [batch..., q_length])`` in float32.
    """
    real = kv_offset + jnp.arange(key.shape[-2]) < kv_length
    params = {"score_mode": score_mode, "scale": scale, "concat_score_weight": concat_score_weight}
    output, lse = blocked_attention_with_lse(
        query,
        value,
        key,
        value_mask=value_mask,
        use_causal_mask=use_causal_mask,
        kv_offset=kv_offset,
        **params,
    )

    def exact_fully_masked_rows() -> tuple[jax.Array, jax.Array]:
        exact_output, exact_lse = fully_masked_partial(query, value, key, real=real, **params)
        return (
            jnp.where(fully_masked[..., None], exact_output, output),
            jnp.where(fully_masked, exact_lse, lse),
        )

    if fully_masked is None:
        return output, lse
    return jax.lax.cond(jnp.any(fully_masked), exact_fully_masked_rows, lambda: (output, lse))


def merge_partials(output: jax.Array, lse: jax.Array, use: jax.Array, axis_name: str) -> jax.Array:
    """Merges the partial results of all slices on ``axis_name`` (inside ``shard_map``).

    Each row is the average of the used slices' outputs weighted by their softmax
    denominators, ``exp(lse - max lse)``.

    Args:
      output: ``[batch..., q_length, value_depth]``; lse: ``[batch..., q_length]``.
      use: bool ``[batch..., q_length]``, whether this slice counts for the row (some slice
        must count for every row).
      axis_name: the mesh axis the keys are split over.

    Returns:
      The merged output ``[batch..., q_length, value_depth]``, the same on every device.
    """
    # The shift only keeps exp() in range; it cancels exactly, so no gradient flows into it.
    shift = jax.lax.pmax(jax.lax.stop_gradient(jnp.where(use, lse, -jnp.inf)), axis_name)
    # Double where: unused slices get weight 0 and a zero (not NaN) gradient.
    weight = jnp.where(use, jnp.exp(jnp.where(use, lse - shift, 0.0)), 0.0)
    total = jax.lax.psum(weight, axis_name)
    return jax.lax.psum(weight[..., None] * output, axis_name) / total[..., None]


class Split(NamedTuple):
    """How :func:`sequence_parallel_attention` splits one call (shared by both strategies).

    ``params``: ``{"scale": ..., "concat_score_weight": ...}``, replicated on every device.
    """

    mesh: Mesh
    axis_name: str
    batch_axis: str | None
    batch_shape: tuple[int, ...]
    use_causal_mask: bool
    score_mode: ScoreMode
    params: dict
    layout: Layout


Strategy = Literal["ring", "replicated"]
STRATEGIES = ("ring", "replicated")
LAYOUTS = ("contiguous", "zigzag")


def check_sequence_fields(mesh: Mesh | None, sequence_axis: str | None) -> None:
    """Raises ``ValueError`` unless a module got both ``mesh`` and ``sequence_axis`` or neither."""
    if (mesh is None) != (sequence_axis is None):
        raise ValueError(
            "Sequence parallelism needs both mesh and sequence_axis (the mesh axis to split "
            f"the sequence over), or neither. Received: mesh={mesh!r}, "
            f"sequence_axis={sequence_axis!r}"
        )
    if mesh is not None and sequence_axis not in mesh.axis_names:
        raise ValueError(
            f"sequence_axis must be one of the mesh's axes {mesh.axis_names}. "
            f"Received: sequence_axis={sequence_axis!r}"
        )


def select_strategy(q_length: int, kv_length: int, devices: int) -> Strategy:
    """The strategy :func:`sequence_parallel_attention` uses when given ``strategy=None``.

    ``"ring"`` when the queries are long, ``q_length * devices >= kv_length`` (at least as many
    queries as one device's share of keys: replicating them would cost more than a key shard);
    ``"replicated"`` for short queries against long keys (decoding, a few queries over a very
    long memory), where a copy of the queries on every device is cheap and the keys never move.
    """
    return "ring" if q_length * devices >= kv_length else "replicated"


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
    batch_axis: str | None = None,
    strategy: Strategy | None = None,
    layout: Layout = "contiguous",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """:func:`attention` with the sequence split over a mesh axis, by one of two strategies.

    * ``"ring"`` (ring attention): queries, keys, values, value mask, output and every
      gradient are split along ``axis_name``; key/value blocks travel around the devices
      with ``lax.ppermute`` and each step is merged with the online softmax
      (:mod:`~luong_attention._src.functional.ring`). Memory per device falls as ``1/n``.
    * ``"replicated"``: every device holds all queries and one slice of the keys, values and
      value mask; the partial results are merged with their logsumexp (:func:`merge_partials`)
      and the output is replicated. Right for few queries over many keys (decoding).
    * ``None`` picks with :func:`select_strategy`: ring when ``q_length * n >= kv_length``.

    ``layout`` says how the inputs' sequence axis is ordered (ring only): ``"contiguous"``
    (natural order; lengths need not divide by the devices, the last slice is padded and
    padding never counts) or ``"zigzag"`` (the inputs, masks and output are in the order of
    :func:`~luong_attention._src.functional.layout.to_zigzag`; ``q_length`` and ``kv_length``
    must be multiples of ``2n``), which balances the causal work over the devices. Both
    strategies equal :func:`attention` up to float rounding, fully masked rows included, and
    are differentiable in ``query``, ``key``, ``value``, ``scale`` and
    ``concat_score_weight``. With ``batch_axis`` the first batch dim is split over that mesh
    axis too (data parallel); other mesh axes replicate the computation. Works eagerly and
    under ``jax.jit``, on one host or many (after ``jax.distributed.initialize``).

    Args:
      query: ``[batch..., q_length, depth]``.
      value: ``[batch..., kv_length, value_depth]``.
      key: ``[batch..., kv_length, depth]``; ``None`` uses ``value``.
      mesh: the device mesh; axis_name: the axis to split the sequence over.
      batch_axis: an optional second mesh axis to split the first batch dim over.
      strategy: ``"ring"``, ``"replicated"`` or ``None`` (see above).
      layout: ``"contiguous"`` or ``"zigzag"`` (see above).
      query_mask, value_mask, use_causal_mask, score_mode, scale, concat_score_weight: as in
        :func:`attention` (causal in global positions: query ``i`` sees keys ``j <= i``).
      dropout_rate, dropout_rng: only ``0.0`` is supported (``ValueError`` otherwise).

    Returns:
      ``[batch..., q_length, value_depth]`` in the inputs' dtype; split along ``axis_name``
      (ring) or replicated over it (replicated), split over ``batch_axis`` if given.

    Raises:
      ValueError, TypeError: for bad arguments, axes the mesh does not have, a first batch
        dim that does not divide by the ``batch_axis`` devices, a strategy or layout that
        does not exist or does not fit the lengths, or dropout.
    """
    if dropout_rate != 0.0 or dropout_rng is not None:
        raise ValueError(
            "sequence_parallel_attention has no dropout (its weights never exist as one "
            f"array to drop from). Received: dropout_rate={dropout_rate!r}. Use attention() "
            "for dropout, or apply dropout outside the attention."
        )
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
    batch_shape = tuple(jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    check_axes(mesh, axis_name, batch_axis, batch_shape)
    devices = mesh.shape[axis_name]
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None. Received: {strategy!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}. Received: layout={layout!r}")
    if strategy is None:
        strategy = "ring" if layout == "zigzag" else select_strategy(q_length, kv_length, devices)
    if layout == "zigzag":
        if strategy != "ring":
            raise ValueError(
                "layout='zigzag' is a layout of the ring strategy (the replicated strategy "
                "takes the sequence in natural order). Received: strategy='replicated', "
                f"query {query.shape}, key {key.shape}"
            )
        check_zigzag_length("q_length (query.shape[-2])", q_length, devices)
        check_zigzag_length("kv_length (key.shape[-2])", kv_length, devices)
    split = Split(
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        batch_shape=batch_shape,
        use_causal_mask=use_causal_mask,
        score_mode=score_mode,
        params={"scale": scale, "concat_score_weight": concat_score_weight},
        layout=layout,
    )
    run = _ring_strategy if strategy == "ring" else _replicated_strategy
    output = run(query, value, key, value_mask, split)
    dtype = jnp.result_type(query, key, value)
    return apply_query_mask(output, query_mask).astype(dtype)


def _replicated_strategy(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    split: Split,
) -> jax.Array:
    """Replicated queries, keys split: ``[batch..., q_length, value_depth]`` in float32."""
    mesh, axis_name, batch_axis, batch_shape, use_causal_mask, score_mode, _, _ = split
    dtype = jnp.result_type(query, key, value)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    devices = mesh.shape[axis_name]
    shard_length = -(-kv_length // devices)
    padded = shard_length * devices
    key = pad_length(key, -2, padded)
    value = pad_length(value.astype(stats_dtype(dtype)), -2, padded)
    # Without a value mask every query sees key 0, so no row can be fully masked.
    user_mask = value_mask
    if value_mask is not None:
        value_mask = pad_length(as_bool_mask(value_mask), -1, padded, False)
    elif padded > kv_length:
        value_mask = jnp.arange(padded) < kv_length  # padding keys are masked keys to the kernel

    def local(query, key, value, value_mask, params):
        kv_offset = jax.lax.axis_index(axis_name) * shard_length
        level = row_levels(
            value_mask,
            use_causal_mask=use_causal_mask,
            q_length=q_length,
            shard_length=shard_length,
            kv_offset=kv_offset,
            kv_length=kv_length,
        )
        # Per row, only the slices at the highest level count (see the module docstring).
        top = jax.lax.pmax(level, axis_name)
        output, lse = shard_partial(
            query,
            value,
            key,
            value_mask=value_mask,
            use_causal_mask=use_causal_mask,
            kv_offset=kv_offset,
            kv_length=kv_length,
            fully_masked=None if user_mask is None else top == MASKED_ONLY,
            score_mode=score_mode,
            **params,
        )
        return merge_partials(output, lse, level == top, axis_name)

    def spec(x: jax.Array | None, core_dims: int, split: int | None) -> P:
        return shard_spec(x, core_dims, split, axis_name, batch_axis, batch_shape)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            spec(query, 2, None),
            spec(key, 2, -2),
            spec(value, 2, -2),
            spec(value_mask, 1, -1),
            P(),
        ),
        out_specs=P() if batch_axis is None else P(batch_axis),
        check_vma=False,  # the blocked kernel's loop carries are not typed per axis
    )(query, key, value, value_mask, split.params)


def _ring_strategy(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    split: Split,
) -> jax.Array:
    """Ring attention, everything split: ``[batch..., q_length, value_depth]`` in float32.

    Query, key and value travel and enter the kernel's matmuls in the operand dtype of
    :func:`resolve_matmul_dtype` (as the blocked kernel's own inputs); statistics and gradient
    accumulators are float32 (``stats_dtype``).
    """
    mesh, axis_name, batch_axis, batch_shape, use_causal_mask, score_mode, _, layout = split
    input_dtype = jnp.result_type(query, key, value)
    dtype, operand = stats_dtype(input_dtype), resolve_matmul_dtype(input_dtype)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    devices = mesh.shape[axis_name]
    parts = 2 if layout == "zigzag" else 1
    q_chunk, kv_chunk = (-(-length // (devices * parts)) for length in (q_length, kv_length))
    query = pad_length(query.astype(operand), -2, devices * parts * q_chunk)
    key = pad_length(key.astype(operand), -2, devices * parts * kv_chunk)
    value = pad_length(value.astype(operand), -2, devices * parts * kv_chunk)
    if value_mask is not None:
        value_mask = pad_length(as_bool_mask(value_mask), -1, devices * parts * kv_chunk, False)
    plan = RingPlan(
        axis_name=axis_name,
        devices=devices,
        parts=parts,
        q_chunk=q_chunk,
        kv_chunk=kv_chunk,
        kv_length=kv_length,
        score_mode=score_mode,
        causal=bool(use_causal_mask),
        masked=value_mask is not None,
    )
    mask_batch = () if value_mask is None else value_mask.shape[:-1]
    out_batch = len(jnp.broadcast_shapes(batch_shape, mask_batch))

    def local(query, key, value, value_mask, params):
        query, key, weight = fold_score_params(query, key, score_mode, dtype, **params)
        shapes = [x.shape[:-2] for x in (query, key, value)]
        if value_mask is not None:
            shapes.append(value_mask.shape[:-1])
        local_batch = jnp.broadcast_shapes(*shapes)

        def flat(x: jax.Array, core: int) -> jax.Array:
            tail = x.shape[x.ndim - core :]
            return jnp.broadcast_to(x, (*local_batch, *tail)).reshape(-1, *tail)

        mask = None if value_mask is None else flat(value_mask, 1)
        out = ring_attention_shards(
            plan, flat(query, 2), flat(key, 2), flat(value, 2), weight, mask
        )
        return out.reshape(*local_batch, *out.shape[-2:])

    def spec(x: jax.Array | None, core_dims: int, split: int | None) -> P:
        return shard_spec(x, core_dims, split, axis_name, batch_axis, batch_shape)

    batch_spec = [batch_axis] + [None] * (out_batch - 1) if out_batch else []
    output = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            spec(query, 2, -2),
            spec(key, 2, -2),
            spec(value, 2, -2),
            spec(value_mask, 1, -1),
            P(),
        ),
        out_specs=P(*batch_spec, axis_name, None),
        check_vma=False,  # the blocked kernel's loop carries are not typed per axis
    )(query, key, value, value_mask, split.params)
    return output[..., :q_length, :]


def fold_score_params(
    query: jax.Array,
    key: jax.Array,
    score_mode: ScoreMode,
    dtype: jnp.dtype,
    *,
    scale: ArrayLike | None,
    concat_score_weight: ArrayLike | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds ``scale`` into the query (and the key for ``"concat"``), as the blocked kernel.

    The product is taken in ``dtype`` (float32+) and rounded back to the operands' dtype.

    Returns ``(query, key, weight)`` with ``weight`` the ``concat_score_weight`` (1 when
    ``None``; 0 and unused for ``"dot"``) in ``dtype``.
    """
    if scale is not None:
        scale = jnp.asarray(scale).astype(dtype)
        query = (query.astype(dtype) * scale).astype(query.dtype)
        if score_mode == "concat":
            key = (key.astype(dtype) * scale).astype(key.dtype)
    if score_mode != "concat":
        return query, key, jnp.zeros((), dtype)
    weight = 1.0 if concat_score_weight is None else concat_score_weight
    return query, key, jnp.asarray(weight).astype(dtype)


def luong_sequence_parallel(
    query: ArrayLike,
    memory: ArrayLike,
    memory_mask: ArrayLike | None = None,
    *,
    score: str,
    w_a: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    source_lengths: ArrayLike | None = None,
    mesh: Mesh,
    axis_name: str,
    batch_axis: str | None = None,
    strategy: Strategy | None = None,
    layout: Layout = "contiguous",
) -> jax.Array:
    """Luong global attention of a sequence of queries with ``"dot"`` or ``"general"`` scores,
    sequence parallel (:func:`sequence_parallel_attention`, memory as keys and values).

    ``"general"`` scores ``h_t^T W_a h_s`` are dot scores of the projected query ``h_t W_a^T``
    against the memory, so both run on the same kernel; ``source_lengths`` becomes part of the
    value mask.

    Args:
      query: ``[batch..., q_length, query_depth]``; memory: ``[batch..., kv_length,
        memory_depth]``; memory_mask: ``[batch..., kv_length]`` or ``None``.
      score: ``"dot"`` or ``"general"``; w_a: ``[memory_depth, query_depth]`` for
        ``"general"``; scale: optional scalar on the scores.
      source_lengths: int ``[batch...]`` or ``None``.
      mesh, axis_name, batch_axis, strategy, layout: as in :func:`sequence_parallel_attention`.

    Returns:
      The context ``[batch..., q_length, memory_depth]`` (no alignment: it is never built).

    Raises:
      ValueError: for another score or a single-step query.
    """
    if score not in ("dot", "general"):
        raise ValueError(
            "Sequence-parallel Luong attention supports score='dot' and score='general' "
            f"(dot products the kernel computes blockwise). Received: score={score!r}"
        )
    query, memory = jnp.asarray(query), jnp.asarray(memory)
    if query.ndim != memory.ndim:
        raise ValueError(
            "Sequence-parallel Luong attention needs a sequence of queries [batch..., Tq, "
            f"depth_q] with the rank of memory. Received: query.shape={query.shape}, "
            f"memory.shape={memory.shape}"
        )
    if score == "general":
        query = jnp.einsum("...qd,md->...qm", query, jnp.asarray(w_a).astype(query.dtype))
    if source_lengths is not None:
        keep = length_mask(source_lengths, memory.shape[-2])
        memory_mask = keep if memory_mask is None else jnp.logical_and(memory_mask, keep)
    return sequence_parallel_attention(
        query,
        memory,
        memory,
        mesh=mesh,
        axis_name=axis_name,
        batch_axis=batch_axis,
        strategy=strategy,
        layout=layout,
        value_mask=memory_mask,
        scale=scale,
    )
