"""Ring attention: queries, keys, values, outputs and every gradient split over a mesh axis.

Device ``d`` of ``n`` keeps its own queries and starts with its own key/value block. In each of
``n`` steps it attends its queries to the block it holds through the kernel interface
(:func:`~luong_attention._src.parallel.blocks.pair_state`, global offsets for the causal
mask), merges the resulting online-softmax state into its running one
(:func:`~luong_attention._src.kernels.api.merge`), and passes the block to device ``d + 1``
with ``lax.ppermute``; the transfer of the next block is issued before the step's compute, so
XLA can overlap them. The backward pass (``jax.custom_vjp``) runs the ring again: dQ stays
home, while K, V and their dK/dV accumulators travel and arrive back on their owner after
``n`` steps. Only the local shards, the per-row statistics and two blocks in flight live on a
device, so memory per device falls as ``1/n``.

A sequence is laid out ``"contiguous"`` (one part per device) or ``"zigzag"`` (two parts, see
:mod:`~luong_attention._src.parallel.layout`); every step attends each local query part to
each held key part, and with the causal mask a pair entirely above the diagonal is skipped.
Fully masked rows follow the one path of :mod:`~luong_attention._src.parallel.blocks`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from luong_attention._src.kernels.api import Operands, SoftmaxState, empty_state, merge
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
    sees_block,
)


def pass_on(plan: Plan, arrays: tuple) -> tuple:
    """Sends ``arrays`` (a pytree) to the next device on the ring and receives the previous one's."""
    if plan.devices == 1:
        return arrays
    perm = [(i, (i + 1) % plan.devices) for i in range(plan.devices)]
    return jax.lax.ppermute(arrays, plan.axis_name, perm)


def _part(x: jax.Array, index: jax.Array, chunk: int) -> jax.Array:
    """Part ``index`` (``chunk`` entries of axis 1) of ``x``."""
    return jax.lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis=1)


def _set_part(x: jax.Array, index: jax.Array, chunk: int, part: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, part, index * chunk, axis=1)


class _Step(NamedTuple):
    """What one ring step attends: this device's queries and the key block it holds."""

    q: jax.Array
    held: tuple[jax.Array, jax.Array, jax.Array | None]  # k, v, mask of the block's owner
    weight: jax.Array
    fully: jax.Array | None
    q_offsets: jax.Array
    owner: jax.Array


def _pair(plan: Plan, step: _Step, t: jax.Array) -> tuple[jax.Array, jax.Array, Pair]:
    """Query part ``a`` against key part ``b`` of a step (``t = a * parts + b``)."""
    a, b = t // plan.parts, t % plan.parts
    qc, kc = plan.q_chunk, plan.kv_chunk
    k, v, mask = step.held
    kernel_mask, real = key_masks(plan, mask, step.owner)
    kv_offsets = part_offsets(plan, step.owner, kc)
    ops = Operands(
        _part(step.q, a, qc),
        _part(k, b, kc),
        _part(v, b, kc),
        step.weight,
        None if kernel_mask is None else _part(kernel_mask, b, kc),
        (step.q_offsets[a], kv_offsets[b]),
        None,
    )
    fully = None if step.fully is None else _part(step.fully, a, qc)
    return a, b, Pair(ops, jax.lax.dynamic_slice_in_dim(real, b * kc, kc), fully)


def _ring_forward(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> tuple[SoftmaxState, jax.Array | None]:
    """The ring forward on one device's ``[B, parts * chunk, ...]`` shards.

    Returns the rows' merged state over the whole sequence and which rows are fully masked
    (``[B, rows]`` or ``None``).
    """
    device = jax.lax.axis_index(plan.axis_name)
    batch = q.shape[0]
    kernel, cfg = kernel_config(plan, batch, q.shape[-1])
    fully = blind_rows(
        mask,
        part_positions(plan, device, plan.kv_chunk),
        part_positions(plan, device, plan.q_chunk),
        kv_length=plan.kv_length,
        causal=plan.causal,
        axis_name=plan.axis_name,
        batch=batch,
    )
    q_offsets = part_offsets(plan, device, plan.q_chunk)

    def attend(held, index, state: SoftmaxState) -> SoftmaxState:
        owner = (device - index) % plan.devices
        step = _Step(q, held, weight, fully, q_offsets, owner)

        def pair(t, state: SoftmaxState) -> SoftmaxState:
            a, _, this = _pair(plan, step, t)
            new = pair_state(kernel, cfg, this)
            merged = merge(SoftmaxState(*(_part(x, a, plan.q_chunk) for x in state)), new)
            return SoftmaxState(
                *(_set_part(x, a, plan.q_chunk, y) for x, y in zip(state, merged, strict=True))
            )

        return jax.lax.fori_loop(0, plan.parts * plan.parts, pair, state)

    def step(carry, index):
        held, state = carry
        # Issued before the compute that does not depend on it: XLA may overlap the two.
        upcoming = pass_on(plan, held)
        return (upcoming, attend(held, index, state)), None

    carry = ((k, v, mask), empty_state(batch, q.shape[1], v.shape[-1], weight.dtype))
    held, state = jax.lax.scan(step, carry, jnp.arange(plan.devices - 1))[0]
    return attend(held, plan.devices - 1, state), fully


def _ring_backward(
    plan: Plan, residuals: tuple, d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The ring backward: ``(dq, dk, dv, dweight)`` on one device (dweight unreduced)."""
    q, k, v, weight, mask, stats, fully = residuals
    device = jax.lax.axis_index(plan.axis_name)
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1])
    q_offsets = part_offsets(plan, device, plan.q_chunk)

    def attend(held, grads_b, index, dq, dweight):
        owner = (device - index) % plan.devices
        step = _Step(q, held, weight, fully, q_offsets, owner)

        def pair(t, carry):
            dq, dk_b, dv_b, dweight = carry
            qc, kc = plan.q_chunk, plan.kv_chunk
            a, b, this = _pair(plan, step, t)
            rows = type(stats)(*(_part(x, a, qc) for x in stats))
            g_q, g_k, g_v, g_w = pair_grads(kernel, cfg, this, rows, _part(d_out, a, qc))
            return (
                _set_part(dq, a, qc, _part(dq, a, qc) + g_q),
                _set_part(dk_b, b, kc, _part(dk_b, b, kc) + g_k),
                _set_part(dv_b, b, kc, _part(dv_b, b, kc) + g_v),
                dweight + g_w,
            )

        dq, dk_b, dv_b, dweight = jax.lax.fori_loop(
            0, plan.parts * plan.parts, pair, (dq, *grads_b, dweight)
        )
        return dq, dweight, (dk_b, dv_b)

    def step(carry, index):
        held, grads_b, dq, dweight = carry
        upcoming = pass_on(plan, held)  # before the compute
        dq, dweight, grads_b = attend(held, grads_b, index, dq, dweight)
        grads_b = pass_on(plan, grads_b)
        return (upcoming, grads_b, dq, dweight), None

    acc = weight.dtype  # gradient accumulators, also those that travel
    zeros = tuple(jnp.zeros(x.shape, acc) for x in (k, v, q))
    carry = ((k, v, mask), zeros[:2], zeros[2], 0 * weight)
    held, grads_b, dq, dweight = jax.lax.scan(step, carry, jnp.arange(plan.devices - 1))[0]
    dq, dweight, grads_b = attend(held, grads_b, plan.devices - 1, dq, dweight)
    # After n steps the accumulators sit one device short of their owner: one last hop.
    dk, dv = pass_on(plan, grads_b)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dweight


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention_shards(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> jax.Array:
    """Ring attention on one device's shards (inside ``shard_map`` over ``plan.axis_name``).

    Args:
      q: ``[B, parts * q_chunk, depth]`` (``scale`` folded in); k: ``[B, parts * kv_chunk,
        depth]`` (times ``scale`` for ``"concat"``); v: ``[B, parts * kv_chunk, dim_v]``;
        all in the matmul operand dtype. weight: ``concat_score_weight`` (0 for ``"dot"``)
        in the statistics dtype (float32 or wider), which every statistic and gradient
        accumulator uses.
      mask: bool ``[B, parts * kv_chunk]`` value mask, or ``None``.

    Returns:
      ``[B, parts * q_chunk, dim_v]``: this device's rows of the attention output.
    """
    return row_stats(_ring_forward(plan, q, k, v, weight, mask)[0]).out


def _ring_fwd(plan, q, k, v, weight, mask):
    state, fully = _ring_forward(plan, q, k, v, weight, mask)
    stats = row_stats(state)
    return stats.out, (q, k, v, weight, mask, stats, fully)


def _ring_bwd(plan, residuals, d_out):
    dq, dk, dv, dweight = _ring_backward(plan, residuals, d_out)
    return dq, dk, dv, dweight, None


ring_attention_shards.defvjp(_ring_fwd, _ring_bwd)


def ring_score_work(
    q_length: int,
    kv_length: int,
    devices: int,
    *,
    layout: str = "zigzag",
    use_causal_mask: bool = True,
    score_mode: str = "dot",
    depth: int = 64,
    batch: int = 1,
) -> np.ndarray:
    """Score entries the ring's forward computes, per device and step (a load-balance check).

    Walks the same decisions as the ring (which pairs are skipped, :func:`sees_block`) and the
    kernel's own tile schedule (``Kernel.schedule``: key tiles visited per query tile), without a value mask, and counts ``block_q * block_kv`` entries per visited tile.

    Returns:
      int64 ``[devices, devices]``: entry ``[d, s]`` is device ``d``'s work in step ``s``.
    """
    parts = 2 if layout == "zigzag" else 1
    q_chunk, kv_chunk = (-(-length // (devices * parts)) for length in (q_length, kv_length))
    plan = Plan("ring", devices, parts, q_chunk, kv_chunk, kv_length, score_mode, use_causal_mask)
    kernel, cfg = kernel_config(plan, batch, depth)
    work = np.zeros((devices, devices), np.int64)
    for device in range(devices):
        q_offsets = np.asarray(part_offsets(plan, device, q_chunk))
        for step in range(devices):
            kv_offsets = np.asarray(part_offsets(plan, (device - step) % devices, kv_chunk))
            for a in range(parts):
                for b in range(parts):
                    offsets = (jnp.int32(q_offsets[a]), jnp.int32(kv_offsets[b]))
                    if not bool(sees_block(cfg, offsets)):
                        continue
                    kv_stop = kernel.schedule(cfg, None, offsets).kv_stop
                    work[device, step] += int(kv_stop.sum()) * cfg.block_q * cfg.block_kv
    return work
