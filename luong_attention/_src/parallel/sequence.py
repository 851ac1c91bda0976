"""Sequence-parallel attention: the sequence split over a mesh axis with ``shard_map``.

:func:`sequence_parallel_attention` checks the arguments, picks a strategy (ring, or
replicated queries), pads the sequence to whole shards, folds the score parameters into the
operands (:meth:`ScoreParams.fold`) and runs the strategy's per-device function
(:func:`~luong_attention._src.parallel.ring.ring_attention_shards`,
:func:`~luong_attention._src.parallel.replicated.replicated_attention_shards`) under
``shard_map``. Both run the kernel interface and the one fully-masked-row path of
:mod:`~luong_attention._src.parallel.blocks`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from luong_attention._src.functional.attention import ScoreMode, apply_query_mask
from luong_attention._src.functional.kernel_call import flatten_batch
from luong_attention._src.parallel.blocks import Plan
from luong_attention._src.parallel.layout import (
    Layout,
    check_axes,
    check_zigzag_length,
    shard_spec,
)
from luong_attention._src.parallel.replicated import replicated_attention_shards
from luong_attention._src.parallel.ring import ring_attention_shards
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.masks import as_bool_mask
from luong_attention._src.primitives.rows import pad_length
from luong_attention._src.primitives.scores import (
    ScoreParams,
    resolve_matmul_dtype,
    stats_dtype,
)

Strategy = Literal["ring", "replicated"]
STRATEGIES = ("ring", "replicated")
LAYOUTS = ("contiguous", "zigzag")


class Split(NamedTuple):
    """How :func:`sequence_parallel_attention` splits one call (shared by both strategies).

    ``scores`` (its scale and weight) is replicated on every device.
    """

    mesh: Mesh
    axis_name: str
    batch_axis: str | None
    batch_shape: tuple[int, ...]
    use_causal_mask: bool
    scores: ScoreParams
    layout: Layout
    strategy: Strategy


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
      with ``lax.ppermute`` and each step is merged with the online softmax.
      Memory per device falls as ``1/n``.
    * ``"replicated"``: every device holds all queries and one slice of the keys, values and
      value mask; the partial results are merged (their online-softmax states) and the
      output is replicated. Right for few queries over many keys (decoding).
    * ``None`` picks with :func:`select_strategy`: ring when ``q_length * n >= kv_length``.

    ``layout`` says how the inputs' sequence axis is ordered (ring only): ``"contiguous"``
    (natural order; lengths need not divide by the devices, the last slice is padded and
    padding never counts) or ``"zigzag"`` (the inputs, masks and output are in the order of
    :func:`to_zigzag`; ``q_length`` and ``kv_length``
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
      mesh: the device mesh.
      axis_name: the axis of ``mesh`` to split the sequence over.
      batch_axis: an optional second mesh axis to split the first batch dim over.
      strategy: ``"ring"``, ``"replicated"`` or ``None`` (see above).
      layout: ``"contiguous"`` or ``"zigzag"`` (see above).
      query_mask: as in :func:`attention`.
      value_mask: as in :func:`attention`.
      use_causal_mask: as in :func:`attention`, in global positions: query ``i`` sees keys
        ``j <= i``.
      score_mode: as in :func:`attention`.
      scale: as in :func:`attention`.
      concat_score_weight: as in :func:`attention`.
      dropout_rate: only ``0.0`` is supported (``ValueError`` otherwise).
      dropout_rng: only ``None`` is supported (``ValueError`` otherwise).

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
    query, value, key, query_mask, value_mask = checks.validate_attention_args(
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
        scores=ScoreParams(score_mode, scale, concat_score_weight),
        layout=layout,
        strategy=strategy,
    )
    output = _run(query, value, key, value_mask, split)
    dtype = jnp.result_type(query, key, value)
    return apply_query_mask(output, query_mask).astype(dtype)


def step_kernel(score_mode: str) -> str:
    """The kernel each device runs per block: the backend's Pallas kernel for ``"dot"`` on a
    GPU or a TPU (as :func:`attention` with ``implementation=None``), else the blocked one."""
    backend = jax.default_backend()
    if score_mode == "dot" and backend in ("gpu", "tpu"):
        return f"pallas_{backend}"
    return "blocked"


def _run(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    split: Split,
) -> jax.Array:
    """Runs the split's strategy: ``[batch..., q_length, value_depth]`` in float32.

    Query, key and value travel and enter the kernel's matmuls in the operand dtype of
    :func:`resolve_matmul_dtype` (as the kernel's own inputs); statistics and gradient
    accumulators are float32 (``stats_dtype``).
    """
    axis_name, ring = split.axis_name, split.strategy == "ring"
    input_dtype = jnp.result_type(query, key, value)
    dtype, operand = stats_dtype(input_dtype), resolve_matmul_dtype(input_dtype)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    devices = split.mesh.shape[axis_name]
    parts = 2 if split.layout == "zigzag" else 1
    q_chunk = -(-q_length // (devices * parts)) if ring else q_length
    kv_chunk = -(-kv_length // (devices * parts))
    kv_padded = devices * parts * kv_chunk
    query = pad_length(query.astype(operand), -2, devices * parts * q_chunk if ring else q_length)
    key = pad_length(key.astype(operand), -2, kv_padded)
    value = pad_length(value.astype(operand), -2, kv_padded)
    if value_mask is not None:
        value_mask = pad_length(as_bool_mask(value_mask), -1, kv_padded, False)
    plan = Plan(
        axis_name=axis_name,
        devices=devices,
        parts=parts,
        q_chunk=q_chunk,
        kv_chunk=kv_chunk,
        kv_length=kv_length,
        score_mode=split.scores.mode,
        causal=bool(split.use_causal_mask),
        kernel=step_kernel(split.scores.mode),
    )
    shards = ring_attention_shards if ring else replicated_attention_shards
    mask_batch = () if value_mask is None else value_mask.shape[:-1]
    out_batch = len(jnp.broadcast_shapes(split.batch_shape, mask_batch))

    def local(query, key, value, value_mask, scores):
        query, key, weight = scores.fold(query, key, dtype)
        shapes = [x.shape[:-2] for x in (query, key, value)]
        if value_mask is not None:
            shapes.append(value_mask.shape[:-1])
        local_batch = jnp.broadcast_shapes(*shapes)

        def flat(x: jax.Array, core: int = 2) -> jax.Array:
            return flatten_batch(x, local_batch, x.dtype, core)

        mask = None if value_mask is None else flat(value_mask, 1)
        out = shards(plan, flat(query), flat(key), flat(value), weight, mask)
        return out.reshape(*local_batch, *out.shape[-2:])

    def spec(x: jax.Array | None, core_dims: int, split_dim: int | None) -> P:
        return shard_spec(x, core_dims, split_dim, axis_name, split.batch_axis, split.batch_shape)

    batch_spec = [split.batch_axis] + [None] * (out_batch - 1) if out_batch else []
    output = jax.shard_map(
        local,
        mesh=split.mesh,
        in_specs=(
            spec(query, 2, -2 if ring else None),
            spec(key, 2, -2),
            spec(value, 2, -2),
            spec(value_mask, 1, -1),
            P(),
        ),
        out_specs=P(*batch_spec, axis_name if ring else None, None),
        check_vma=False,  # the kernel's loop carries are not typed per axis
    )(query, key, value, value_mask, split.scores)
    return output[..., :q_length, :]
