"""Replicated queries: every device holds all queries and one contiguous slice of the keys.

Each device attends all queries to its slice through the kernel interface
(:func:`~luong_attention._src.parallel.blocks.pair_state`, fully masked rows included), and
the states are merged over the axis (:func:`all_merge`: a ``pmax`` of the row max, then
``psum`` of the rescaled denominators and accumulators), so every device ends with the whole
output. The backward (``jax.custom_vjp``) runs each slice's kernel backward with the merged
statistics: dK and dV stay on their slice, dQ is the sum of the slices' contributions. Right
for few queries over many keys (decoding), where a copy of the queries is cheap and the keys
never move.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from luong_attention._src.kernels.api import Operands, SoftmaxState, rescale
from luong_attention._src.parallel.blocks import (
    Pair,
    Plan,
    blind_rows,
    kernel_config,
    key_masks,
    pair_grads,
    pair_state,
    part_offsets,
    part_positions,
    row_stats,
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
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
      q: ``[B, q_length, depth]``, the same on every device (``scale`` folded in).
      k: ``[B, kv_chunk, depth]``; v: ``[B, kv_chunk, dim_v]``: this device's slice.
      weight: ``concat_score_weight`` (0 for ``"dot"``) in the statistics dtype.
      mask: bool ``[B, kv_chunk]`` value mask of the slice, or ``None``.

    Returns:
      ``[B, q_length, dim_v]``, the whole output, on every device.
    """
    return _replicated_fwd(plan, q, k, v, weight, mask)[0]


def _replicated_fwd(plan, q, k, v, weight, mask):
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1])
    pair = _local_pair(plan, q, k, v, weight, mask)
    stats = row_stats(all_merge(pair_state(kernel, cfg, pair), plan.axis_name))
    return stats.out, (pair, stats)


def _replicated_bwd(plan, residuals, d_out):
    pair, stats = residuals
    # The output is replicated, so shard_map's transpose hands each device a share of its
    # cotangent; their sum is the whole.
    d_out = jax.lax.psum(d_out, plan.axis_name)
    kernel, cfg = kernel_config(plan, pair.ops.q.shape[0], pair.ops.q.shape[-1])
    dq, dk, dv, dweight = pair_grads(kernel, cfg, pair, stats, d_out)
    # dq and dweight are this slice's share; shard_map's transpose sums the cotangents of
    # the replicated inputs over the axis.
    return dq, dk, dv, dweight, None


replicated_attention_shards.defvjp(_replicated_fwd, _replicated_bwd)
