"""Luong attention of a sequence of queries, sequence parallel (``"dot"`` and ``"general"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike

from luong_attention._src.functional.luong import length_mask
from luong_attention._src.parallel.layout import Layout
from luong_attention._src.parallel.sequence import Strategy, sequence_parallel_attention


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
