"""Replicated queries: every device holds all queries and one contiguous slice of the keys.

Each device attends all queries to its slice through the kernel interface
(:func:`~luong_attention._src.parallel.blocks.pair_state`, fully masked rows included), and
the states are merged over the axis (:func:`all_merge`: a ``pmax`` of the row max, then
``psum`` of the rescaled denominators and accumulators), so every device ends with the whole
output. Derivatives (a ``jax.custom_jvp``,
:func:`~luong_attention._src.parallel.blocks.rows_jvp`) run each slice's kernel again with the
merged statistics: in forward mode the output's tangent is the ``psum`` of the slices'
shares; in reverse mode, its transpose, dK and dV stay on their slice and dQ is the sum of the
slices' contributions. Right for few queries over many keys (decoding), where a copy of the
queries is cheap and the keys never move.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from luong_attention._src.kernels.api import Operands, RowStats, SoftmaxState, rescale
from luong_attention._src.parallel.blocks import (
    Grads,
    Pair,
    Plan,
    Residuals,
    blind_rows,
    kernel_config,
    key_masks,
    pair_grads,
    pair_state,
    pair_tangent,
    part_offsets,
    part_positions,
    row_stats,
    rows_jvp,
)


def all_merge(state: SoftmaxState, axis_name: str) -> SoftmaxState:
    """The state over the keys of every device on ``axis_name`` (the same on each)."""
    m = jax.lax.pmax(state.m, axis_name)
    local = rescale(state, m)
    return SoftmaxState(m, *jax.lax.psum((local.denom, local.acc), axis_name))


def _local_pair(
    plan: Plan, q: jax.Array, k: jax.Array, v: jax.Array, weight: jax.Array, mask: jax.Array | None
) -> Pair:
    """All queries (positions from 0) against this device's slice of keys."""
    device = jax.lax.axis_index(plan.axis_name)
    kernel_mask, real = key_masks(plan, mask, device)
    fully = blind_rows(
        mask,
        part_positions(plan, device, plan.kv_chunk),
        jnp.arange(plan.q_chunk),
        kv_length=plan.kv_length,
        causal=plan.causal,
        axis_name=plan.axis_name,
        batch=q.shape[0],
    )
    offsets = (jnp.int32(0), part_offsets(plan, device, plan.kv_chunk)[0])
    return Pair(Operands(q, k, v, weight, kernel_mask, offsets, None), real, fully)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _replicated_rows(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> RowStats:
    """The output and final statistics of all rows, the same on every device
    (differentiable in every mode and to any order:
    :func:`~luong_attention._src.parallel.blocks.rows_jvp`)."""
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1])
    pair = _local_pair(plan, q, k, v, weight, mask)
    return row_stats(all_merge(pair_state(kernel, cfg, pair), plan.axis_name))


def _replicated_tangent(
    plan: Plan, exact: bool, res: Residuals, d_ops: Grads
) -> tuple[jax.Array, jax.Array]:
    """Tangents ``(d_out, d_lse)`` of all rows for tangents ``d_ops = (dq, dk, dv, dweight)``
    of this device's inputs: the sum over the axis of the slices' shares."""
    kernel, cfg = kernel_config(plan, res.q.shape[0], res.q.shape[-1], exact=exact)
    pair = _local_pair(plan, *res[:5])
    # The output is replicated, so its tangent must be whole on every device.
    return jax.lax.psum(pair_tangent(kernel, cfg, pair, res.stats, d_ops), plan.axis_name)


def _replicated_backward(plan: Plan, exact: bool, res: Residuals, cts: tuple) -> Grads:
    """``(dq, dk, dv, dweight)`` of this device's inputs for cotangents ``cts = (d_out,
    d_lse)`` of the rows' output and logsumexp; the transpose of :func:`_replicated_tangent`
    (dq and dweight are this slice's share)."""
    kernel, cfg = kernel_config(plan, res.q.shape[0], res.q.shape[-1], exact=exact)
    pair = _local_pair(plan, *res[:5])
    # The output is replicated, so shard_map's transpose hands each device a share of its
    # cotangent; their sum is the whole (the transpose of the tangent's psum). Of dq and
    # dweight, shard_map's transpose sums the shares over the axis (replicated inputs).
    return pair_grads(kernel, cfg, pair, res.stats, *jax.lax.psum(cts, plan.axis_name))


_replicated_rows.defjvp(rows_jvp(_replicated_rows, _replicated_tangent, _replicated_backward))


def replicated_attention_shards(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
    """Replicated-query attention on one device (inside ``shard_map`` over
    ``plan.axis_name``; ``plan.parts == 1`` and ``plan.q_chunk`` is the number of queries).

    Args:
      plan: the static settings of the call.
      q: ``[B, q_length, depth]``, the same on every device (``scale`` folded in).
      k: ``[B, kv_chunk, depth]``: this device's slice of the keys.
      v: ``[B, kv_chunk, dim_v]``: this device's slice of the values.
      weight: ``concat_score_weight`` (0 for ``"dot"``) in the statistics dtype.
      mask: bool ``[B, kv_chunk]`` value mask of the slice, or ``None``.

    Returns:
      ``[B, q_length, dim_v]``, the whole output, on every device.
    """
    return _replicated_rows(plan, q, k, v, weight, mask).out
