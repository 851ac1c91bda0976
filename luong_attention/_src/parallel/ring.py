"""Ring attention: queries, keys, values, outputs and every gradient split over a mesh axis.

Device ``d`` of ``n`` keeps its own queries and starts with its own key/value block. In each of
``n`` steps it attends its queries to the block it holds through the kernel interface
(:func:`~luong_attention._src.parallel.blocks.pair_state`, global offsets for the causal
mask), merges the resulting online-softmax state into its running one
(:func:`~luong_attention._src.kernels.api.merge`), and passes the block to device ``d + 1``
with ``lax.ppermute``; the transfer of the next block is issued before the step's compute, so
XLA can overlap them. Derivatives (a ``jax.custom_jvp``,
:func:`~luong_attention._src.parallel.blocks.rows_jvp`) run the ring again from the rows'
merged statistics. Forward mode: dK and dV travel with K and V, and each pair adds its share
of the rows' output tangent. Reverse mode, the transpose of that pass: dQ stays home, while K,
V and their dK/dV accumulators travel and arrive back on their owner after ``n`` steps. Only
the local shards, the per-row statistics and two blocks in flight live on a device, so memory
per device falls as ``1/n`` in reverse and forward mode and forward over reverse
(reverse over reverse or over forward differentiates every-tile loops that save each tile).

A sequence is laid out ``"contiguous"`` (one part per device) or ``"zigzag"`` (two parts, see
:mod:`~luong_attention._src.parallel.layout`); every step attends each local query part to
each held key part, and with the causal mask a pair entirely above the diagonal is skipped.
Fully masked rows follow the one path of :mod:`~luong_attention._src.parallel.blocks`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from luong_attention._src.kernels.api import (
    Operands,
    RowStats,
    SoftmaxState,
    empty_state,
    merge,
)
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


def _add_part(x: jax.Array, index: jax.Array, chunk: int, part: jax.Array) -> jax.Array:
    return _set_part(x, index, chunk, _part(x, index, chunk) + part)


class _Step(NamedTuple):
    """What one ring step attends: this device's queries and the key block it holds."""

    q: jax.Array
    held: tuple[jax.Array, jax.Array, jax.Array | None]  # k, v, mask of the block's owner
    weight: jax.Array
    fully: jax.Array | None
    q_offsets: jax.Array
    owner: jax.Array


def _steps(
    plan: Plan, q: jax.Array, weight: jax.Array, mask: jax.Array | None
) -> Callable[[tuple, jax.Array], _Step]:
    """``(held, index) -> _Step``: step ``index`` of a ring pass on this device, which holds
    the block ``(k, v, mask)`` of device ``device - index``."""
    device = jax.lax.axis_index(plan.axis_name)
    fully = blind_rows(
        mask,
        part_positions(plan, device, plan.kv_chunk),
        part_positions(plan, device, plan.q_chunk),
        kv_length=plan.kv_length,
        causal=plan.causal,
        axis_name=plan.axis_name,
        batch=q.shape[0],
    )
    q_offsets = part_offsets(plan, device, plan.q_chunk)

    def step(held: tuple, index: jax.Array) -> _Step:
        return _Step(q, held, weight, fully, q_offsets, (device - index) % plan.devices)

    return step


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


def _pairs(plan: Plan, step: _Step, visit: Callable, carry):
    """Runs ``visit(a, b, pair, carry) -> carry`` over the step's (query part ``a``, key
    part ``b``) pairs."""

    def body(t, carry):
        return visit(*_pair(plan, step, t), carry)

    return jax.lax.fori_loop(0, plan.parts * plan.parts, body, carry)


def _circulate(plan: Plan, held: tuple, carry, attend: Callable):
    """The ``n`` steps of a ring pass: ``attend(held, index, carry) -> carry`` on the block
    ``held`` in each, which travels on to the next device meanwhile (the transfer is issued
    before the step's compute: XLA may overlap the two). Returns the last carry."""

    def step(state, index):
        held, carry = state
        upcoming = pass_on(plan, held)
        return (upcoming, attend(held, index, carry)), None

    held, carry = jax.lax.scan(step, (held, carry), jnp.arange(plan.devices - 1))[0]
    return attend(held, plan.devices - 1, carry)


def _rows_of(stats: RowStats, a: jax.Array, chunk: int) -> RowStats:
    """The statistics of query part ``a``."""
    return RowStats(*(_part(x, a, chunk) for x in stats))


def _ring_forward(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> SoftmaxState:
    """The ring forward on one device's ``[B, parts * chunk, ...]`` shards: the rows' merged
    state over the whole sequence."""
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1])
    steps, qc = _steps(plan, q, weight, mask), plan.q_chunk

    def visit(a, _, pair: Pair, state: SoftmaxState) -> SoftmaxState:
        merged = merge(
            SoftmaxState(*(_part(x, a, qc) for x in state)), pair_state(kernel, cfg, pair)
        )
        return SoftmaxState(*(_set_part(x, a, qc, y) for x, y in zip(state, merged, strict=True)))

    def attend(held, index, state: SoftmaxState) -> SoftmaxState:
        return _pairs(plan, steps(held, index), visit, state)

    init = empty_state(q.shape[0], q.shape[1], v.shape[-1], weight.dtype)
    return _circulate(plan, (k, v, mask), init, attend)


def _ring_tangent(
    plan: Plan, exact: bool, res: Residuals, d_ops: Grads
) -> tuple[jax.Array, jax.Array]:
    """The ring's forward mode: tangents ``(d_out, d_lse)`` of this device's rows' output and
    logsumexp for tangents ``d_ops = (dq, dk, dv, dweight)`` of its shards.

    A second ring pass after the forward's: dK and dV travel with K and V, and each pair
    adds its share (:func:`pair_tangent`, from the rows' merged statistics) to the rows'.
    """
    q, k, v, weight, mask, stats = res
    dq, dk, dv, dweight = d_ops
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1], exact=exact)
    steps, qc, kc = _steps(plan, q, weight, mask), plan.q_chunk, plan.kv_chunk

    def attend(held, index, tangents):
        k, v, mask, dk, dv = held

        def visit(a, b, pair: Pair, tangents):
            d_pair = (_part(dq, a, qc), _part(dk, b, kc), _part(dv, b, kc), dweight)
            share = pair_tangent(kernel, cfg, pair, _rows_of(stats, a, qc), d_pair)
            return tuple(_add_part(x, a, qc, y) for x, y in zip(tangents, share, strict=True))

        return _pairs(plan, steps((k, v, mask), index), visit, tangents)

    init = (jnp.zeros_like(stats.out), jnp.zeros_like(stats.m))
    return _circulate(plan, (k, v, mask, dk, dv), init, attend)


def _ring_backward(plan: Plan, exact: bool, res: Residuals, cts: tuple) -> Grads:
    """The ring backward: ``(dq, dk, dv, dweight)`` on one device (dweight unreduced) for
    cotangents ``cts = (d_out, d_lse)`` of its rows' output and logsumexp; the transpose of
    :func:`_ring_tangent`. dQ stays home, the dK/dV accumulators travel with K and V."""
    q, k, v, weight, mask, stats = res
    d_out, d_lse = cts
    kernel, cfg = kernel_config(plan, q.shape[0], q.shape[-1], exact=exact)
    steps, qc, kc = _steps(plan, q, weight, mask), plan.q_chunk, plan.kv_chunk

    def visit(a, b, pair: Pair, grads):
        dq, dk_b, dv_b, dweight = grads
        rows = _rows_of(stats, a, qc)
        g_q, g_k, g_v, g_w = pair_grads(
            kernel, cfg, pair, rows, _part(d_out, a, qc), _part(d_lse, a, qc)
        )
        return (
            _add_part(dq, a, qc, g_q),
            _add_part(dk_b, b, kc, g_k),
            _add_part(dv_b, b, kc, g_v),
            dweight + g_w,
        )

    def attend(held, index, carry):
        grads_b, dq, dweight = carry
        dq, dk_b, dv_b, dweight = _pairs(plan, steps(held, index), visit, (dq, *grads_b, dweight))
        # The accumulators move on after the step: after the last one they are home.
        return pass_on(plan, (dk_b, dv_b)), dq, dweight

    acc = weight.dtype  # gradient accumulators, also those that travel
    zeros = tuple(jnp.zeros(x.shape, acc) for x in (k, v, q))
    (dk, dv), dq, dweight = _circulate(
        plan, (k, v, mask), (zeros[:2], zeros[2], 0 * weight), attend
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dweight


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring_rows(
    plan: Plan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> RowStats:
    """The output and final statistics of this device's rows (differentiable in every mode
    and to any order: :func:`~luong_attention._src.parallel.blocks.rows_jvp`)."""
    return row_stats(_ring_forward(plan, q, k, v, weight, mask))


_ring_rows.defjvp(rows_jvp(_ring_rows, _ring_tangent, _ring_backward))


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
      plan: the static settings of the call.
      q: ``[B, parts * q_chunk, depth]`` (``scale`` folded in), in the matmul operand dtype.
      k: ``[B, parts * kv_chunk, depth]`` (times ``scale`` for ``"concat"``), likewise.
      v: ``[B, parts * kv_chunk, dim_v]``, likewise.
      weight: ``concat_score_weight`` (0 for ``"dot"``) in the statistics dtype (float32 or
        wider), which every statistic, tangent and gradient accumulator uses.
      mask: bool ``[B, parts * kv_chunk]`` value mask, or ``None``.

    Returns:
      ``[B, parts * q_chunk, dim_v]``: this device's rows of the attention output.
    """
    return _ring_rows(plan, q, k, v, weight, mask).out


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
