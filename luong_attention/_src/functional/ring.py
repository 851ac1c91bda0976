"""Ring attention: queries, keys, values, outputs and every gradient split over a mesh axis.

Device ``d`` of ``n`` keeps its own queries and starts with its own key/value block. In each of
``n`` steps it attends its queries to the block it holds with the blocked kernel
(:mod:`luong_attention._src.kernels.blocked`, global offsets for the causal mask), merges the
result into a running row max, denominator and accumulator in float32 (the online softmax),
and passes the block to device ``d + 1`` with ``lax.ppermute``; the transfer of the next block
is issued before the step's compute, so XLA can overlap them. The backward pass
(``jax.custom_vjp``) runs the ring again: dQ stays home, while K, V and their dK/dV
accumulators travel and arrive back on their owner after ``n`` steps. Only the local shards,
the per-row statistics and two blocks in flight live on a device, so memory per device falls
as ``1/n``.

A sequence is laid out ``"contiguous"`` (one part per device) or ``"zigzag"`` (two parts, see
:mod:`~luong_attention._src.functional.layout`); every step attends each local query part to
each held key part, and with the causal mask a pair entirely above the diagonal is skipped.

Fully masked rows (queries that see no key in the whole sequence) follow the core: a softmax
over all real keys' ``score - 1e9``. Such rows are found up front (one ``pmin`` of each batch
row's first visible key) and their statistics come from :func:`masked_row_stats`, which scores
every real key of the block (padding excluded, skipped pairs included); the kernel's values for
them are discarded. Max and denominator are kept apart, so their ``-1e9`` scale costs no
precision.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from luong_attention._src.functional.attention import compute_scores
from luong_attention._src.kernels import blocked
from luong_attention._src.primitives.masks import MASK_PENALTY

# Score entries (times depth for "concat") per query chunk of the fully-masked-row path: 4 MiB.
CHUNK_ELEMENTS = 1 << 20

# (max, denominator, accumulator): [B, rows], [B, rows], [B, rows, value_depth], float32.
Stats = tuple[jax.Array, jax.Array, jax.Array]


class RingPlan(NamedTuple):
    """Static settings of one ring call (hashable: a ``custom_vjp`` non-diff argument).

    ``parts`` is 1 for the contiguous layout and 2 for zigzag; each device holds ``parts``
    parts of ``q_chunk`` queries and ``kv_chunk`` keys. Keys at global positions
    ``>= kv_length`` are padding. ``masked``: a value mask was given (rows can be fully masked).
    """

    axis_name: str
    devices: int
    parts: int
    q_chunk: int
    kv_chunk: int
    kv_length: int
    score_mode: str
    causal: bool
    masked: bool


def part_offsets(plan: RingPlan, device: jax.Array | int, chunk: int) -> jax.Array:
    """Global position of the first entry of each of ``device``'s parts, int32 ``[parts]``."""
    firsts = [device] if plan.parts == 1 else [device, 2 * plan.devices - 1 - device]
    return jnp.stack([jnp.asarray(f, jnp.int32) * chunk for f in firsts])


def part_positions(plan: RingPlan, device: jax.Array | int, chunk: int) -> jax.Array:
    """Global positions of ``device``'s ``parts * chunk`` entries, int32 ``[parts * chunk]``."""
    return (part_offsets(plan, device, chunk)[:, None] + jnp.arange(chunk)).reshape(-1)


def sees_block(plan: RingPlan, q_offset: jax.Array, kv_offset: jax.Array) -> jax.Array:
    """Whether some query of a part may see some key of a part (always, without causal)."""
    if not plan.causal:
        return jnp.bool_(True)
    return kv_offset <= q_offset + plan.q_chunk - 1


def kernel_config(plan: RingPlan, batch: int, depth: int) -> blocked._Config:
    """The blocked kernel's tiles for one (query part, key part) pair."""
    return blocked.make_config(
        plan.score_mode, plan.causal, plan.q_chunk, plan.kv_chunk, depth, 0.0, None, None, batch
    )


def pass_on(plan: RingPlan, arrays: tuple) -> tuple:
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


def _rows(mask: jax.Array, like: jax.Array) -> jax.Array:
    """A ``[B, rows]`` row mask broadcast against ``like`` (``[B, rows]`` or ``[B, rows, d]``)."""
    return mask if like.ndim == 2 else mask[..., None]


def merge_stats(a: Stats, b: Stats) -> Stats:
    """The online-softmax merge of two partial statistics over disjoint keys.

    A side that saw no key has max ``-inf`` and weight 0 (no NaN when both did).
    """
    m = jnp.maximum(a[0], b[0])
    shift = jnp.where(jnp.isneginf(m), 0.0, m)
    w_a, w_b = jnp.exp(a[0] - shift), jnp.exp(b[0] - shift)
    return m, w_a * a[1] + w_b * b[1], w_a[..., None] * a[2] + w_b[..., None] * b[2]


def _empty_stats(batch: int, rows: int, value_depth: int, dtype: jnp.dtype) -> Stats:
    return (
        jnp.full((batch, rows), -jnp.inf, dtype),
        jnp.zeros((batch, rows), dtype),
        jnp.zeros((batch, rows, value_depth), dtype),
    )


def key_masks(
    plan: RingPlan, mask: jax.Array | None, owner: jax.Array
) -> tuple[jax.Array | None, jax.Array]:
    """The kernel's value mask of ``owner``'s block and which of its keys are real.

    Returns ``(kernel_mask [B or 1, parts * kv_chunk] or None, real [parts * kv_chunk])``;
    padding keys are masked keys to the kernel (zero weight wherever a row sees a key).
    """
    real = part_positions(plan, owner, plan.kv_chunk) < plan.kv_length
    padded = plan.devices * plan.parts * plan.kv_chunk > plan.kv_length
    if mask is None:
        return (real[None] if padded else None), real
    return jnp.logical_and(mask, real), real


def fully_masked_rows(
    plan: RingPlan, mask: jax.Array | None, device: jax.Array, batch: int
) -> jax.Array | None:
    """bool ``[B, parts * q_chunk]``: local queries that see no key in the whole sequence.

    ``None`` without a value mask (key 0 is then visible to every query). One ``pmin`` over
    the axis of each batch row's first visible key.
    """
    if mask is None:
        return None
    positions = part_positions(plan, device, plan.kv_chunk)
    never = jnp.iinfo(jnp.int32).max
    open_keys = jnp.logical_and(mask, positions < plan.kv_length)
    first = jax.lax.pmin(jnp.min(jnp.where(open_keys, positions, never), axis=-1), plan.axis_name)
    rows = part_positions(plan, device, plan.q_chunk)
    blind = first[:, None] > rows if plan.causal else (first == never)[:, None]
    return jnp.broadcast_to(blind, (batch, rows.shape[0]))


def _penalised_scores(
    plan: RingPlan, query: jax.Array, key: jax.Array, weight: jax.Array, real: jax.Array
) -> jax.Array:
    """Every real key's ``score - 1e9`` (the core's fill), ``-inf`` at padding keys."""
    concat = plan.score_mode == "concat"
    scores = compute_scores(
        query, key, score_mode=plan.score_mode, concat_score_weight=weight if concat else None
    )
    return jnp.where(real, scores - jnp.asarray(MASK_PENALTY, scores.dtype), -jnp.inf)


def _chunk_rows(plan: RingPlan, rows: int, depth: int) -> int:
    """Queries per chunk of the fully-masked-row path (at most CHUNK_ELEMENTS scores)."""
    per_query = plan.kv_chunk * (depth if plan.score_mode == "concat" else 1)
    return max(1, min(rows, CHUNK_ELEMENTS // per_query))


def block_major(x: jax.Array, block: int, fill: float) -> jax.Array:
    """``[B, rows, ...]`` -> ``[n, B, block, ...]`` padded with ``fill`` (padded rows stay finite)."""
    rows = -(-x.shape[1] // block) * block
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, rows - x.shape[1])
    return blocked._to_blocks(jnp.pad(x, widths, constant_values=fill), block)


def masked_row_stats(
    plan: RingPlan,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    weight: jax.Array,
    real: jax.Array,
) -> Stats:
    """Exact statistics of fully masked rows over one key block (meaningless for others).

    Args:
      query: ``[B, rows, depth]``; key: ``[B, keys, depth]``; value: ``[B, keys, dim_v]``.
      weight: ``concat_score_weight``; real: bool ``[keys]``, ``False`` at padding keys.

    Returns:
      ``(max, denominator, accumulator)`` of the penalised scores, in chunks of queries.
    """
    rows = query.shape[1]

    def chunk_stats(q_chunk: jax.Array) -> Stats:
        filled = _penalised_scores(plan, q_chunk, key, weight, real)
        m = filled.max(-1)
        p = jnp.exp(filled - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
        acc = jnp.einsum("bqk,bkv->bqv", p, value, preferred_element_type=p.dtype)
        return m, p.sum(-1), acc

    chunk = _chunk_rows(plan, rows, query.shape[-1])
    stats = jax.lax.map(chunk_stats, block_major(query, chunk, 0.0))
    return tuple(blocked._from_blocks(x, rows) for x in stats)


def masked_row_grads(
    plan: RingPlan,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    weight: jax.Array,
    real: jax.Array,
    rows: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv, dweight)`` of fully masked rows over one key block.

    ``rows = (m, denom, d_out, delta)``: the rows' final max and denominator, the output
    cotangent and ``sum(d_out * out)``, all zero (or anything finite) on other rows. The
    weights are ``p = exp(score - 1e9 - m) / denom`` and ``d score = p * (dp - delta)``: the
    pull-back of ``(p @ v, sum(p))`` with cotangents ``(d_out, -delta)``.
    """
    n_rows = query.shape[1]
    chunk = _chunk_rows(plan, n_rows, query.shape[-1])

    def chunk_grads(carry, xs):
        dk, dv, dweight = carry
        q_c, m_c, denom_c, d_out_c, delta_c = xs

        def weighted(q_c, key, value, weight):
            filled = _penalised_scores(plan, q_c, key, weight, real)
            p = jnp.exp(filled - m_c[..., None]) / denom_c[..., None]
            out = jnp.einsum("bqk,bkv->bqv", p, value, preferred_element_type=p.dtype)
            return out, p.sum(-1)

        _, pull_back = jax.vjp(weighted, q_c, key, value, weight)
        dq_c, dk_c, dv_c, dw_c = pull_back((d_out_c, -delta_c))
        return (dk + dk_c, dv + dv_c, dweight + dw_c), dq_c

    m, denom, d_out, delta = rows
    fills = ((query, 0.0), (m, 0.0), (denom, 1.0), (d_out, 0.0), (delta, 0.0))
    xs = tuple(block_major(x, chunk, fill) for x, fill in fills)
    init = (jnp.zeros(key.shape, weight.dtype), jnp.zeros(value.shape, weight.dtype), 0 * weight)
    (dk, dv, dweight), dq = jax.lax.scan(chunk_grads, init, xs)
    return blocked._from_blocks(dq, n_rows), dk, dv, dweight


def _pair_stats(
    plan: RingPlan,
    cfg: blocked._Config,
    inputs: tuple[jax.Array, ...],
    offsets: tuple[jax.Array, jax.Array],
    fully: jax.Array | None,
) -> Stats:
    """Statistics of one query part over one key part (kernel, skip, or masked rows)."""
    q, k, v, weight, kernel_mask, real = inputs

    def kernel() -> Stats:
        out, m, denom = blocked._forward(cfg, q, k, v, weight, kernel_mask, offsets, None)
        out, m, denom = (blocked._from_blocks(x, plan.q_chunk) for x in (out, m, denom))
        return m, denom, out * denom[..., None]

    def skipped() -> Stats:
        return _empty_stats(q.shape[0], plan.q_chunk, v.shape[-1], weight.dtype)

    stats = jax.lax.cond(sees_block(plan, *offsets), kernel, skipped)
    if fully is None:
        return stats

    def exact() -> Stats:
        masked = masked_row_stats(plan, q, k, v, weight, real)
        return tuple(jnp.where(_rows(fully, x), x, y) for x, y in zip(masked, stats, strict=True))

    return jax.lax.cond(jnp.any(fully), exact, lambda: stats)


def _ring_forward(
    plan: RingPlan,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    weight: jax.Array,
    mask: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The ring forward on one device's ``[B, parts * chunk, ...]`` shards.

    Returns ``(out [B, rows, dim_v], m [B, rows], denom [B, rows], fully [B, rows] or None)``.
    """
    device = jax.lax.axis_index(plan.axis_name)
    batch, depth = q.shape[0], q.shape[-1]
    cfg = kernel_config(plan, batch, depth)
    fully = fully_masked_rows(plan, mask, device, batch)
    q_offsets = part_offsets(plan, device, plan.q_chunk)

    def attend(held, step, stats: Stats) -> Stats:
        k_b, v_b, mask_b = held
        owner = (device - step) % plan.devices
        kernel_mask, real = key_masks(plan, mask_b, owner)
        kv_offsets = part_offsets(plan, owner, plan.kv_chunk)

        def pair(t, stats: Stats) -> Stats:
            a, b = t // plan.parts, t % plan.parts
            kc = plan.kv_chunk
            inputs = (
                _part(q, a, plan.q_chunk),
                _part(k_b, b, kc),
                _part(v_b, b, kc),
                weight,
                None if kernel_mask is None else _part(kernel_mask, b, kc),
                jax.lax.dynamic_slice_in_dim(real, b * kc, kc),
            )
            rows = None if fully is None else _part(fully, a, plan.q_chunk)
            new = _pair_stats(plan, cfg, inputs, (q_offsets[a], kv_offsets[b]), rows)
            old = tuple(_part(x, a, plan.q_chunk) for x in stats)
            merged = merge_stats(old, new)
            return tuple(
                _set_part(x, a, plan.q_chunk, y) for x, y in zip(stats, merged, strict=True)
            )

        return jax.lax.fori_loop(0, plan.parts * plan.parts, pair, stats)

    def step(carry, index):
        held, stats = carry
        # Issued before the compute that does not depend on it: XLA may overlap the two.
        upcoming = pass_on(plan, held)
        return (upcoming, attend(held, index, stats)), None

    carry = ((k, v, mask), _empty_stats(batch, q.shape[1], v.shape[-1], weight.dtype))
    held, stats = jax.lax.scan(step, carry, jnp.arange(plan.devices - 1))[0]
    m, denom, acc = attend(held, plan.devices - 1, stats)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out, m, denom, fully


def _pair_grads(
    plan: RingPlan,
    cfg: blocked._Config,
    inputs: tuple[jax.Array, ...],
    offsets: tuple[jax.Array, jax.Array],
    rows: tuple[jax.Array, ...],
    fully: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(dq, dk, dv, dweight)`` of one query part over one key part."""
    q, k, v, weight, kernel_mask, real = inputs
    out, m, denom, d_out, delta = rows
    d_kernel = d_out if fully is None else jnp.where(fully[..., None], 0.0, d_out)

    def kernel():
        residuals = (
            block_major(out, cfg.block_q, 0.0),
            block_major(m, cfg.block_q, 0.0),
            block_major(denom, cfg.block_q, 1.0),
        )
        d_lse = jnp.zeros_like(m)
        grads = blocked._backward(
            cfg, q, k, v, weight, kernel_mask, offsets, None, *residuals, d_kernel, d_lse
        )
        return tuple(grads)

    def skipped():
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(weight)

    grads = jax.lax.cond(sees_block(plan, *offsets), kernel, skipped)
    if fully is None:
        return grads

    def exact():
        masked_rows = tuple(jnp.where(_rows(fully, x), x, 0.0) for x in (d_out, delta))
        extra = masked_row_grads(plan, q, k, v, weight, real, (m, denom, *masked_rows))
        return tuple((g + e).astype(g.dtype) for g, e in zip(grads, extra, strict=True))

    return jax.lax.cond(jnp.any(fully), exact, lambda: grads)


def _ring_backward(
    plan: RingPlan, residuals: tuple, d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The ring backward: ``(dq, dk, dv, dweight)`` on one device (dweight unreduced)."""
    q, k, v, weight, mask, out, m, denom, fully = residuals
    device = jax.lax.axis_index(plan.axis_name)
    cfg = kernel_config(plan, q.shape[0], q.shape[-1])
    q_offsets = part_offsets(plan, device, plan.q_chunk)
    delta = (d_out * out).sum(-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    denom = jnp.where(denom > 0, denom, 1.0)

    def attend(held, grads_b, step, dq, dweight):
        k_b, v_b, mask_b = held
        owner = (device - step) % plan.devices
        kernel_mask, real = key_masks(plan, mask_b, owner)
        kv_offsets = part_offsets(plan, owner, plan.kv_chunk)

        def pair(t, carry):
            dq, dk_b, dv_b, dweight = carry
            a, b = t // plan.parts, t % plan.parts
            qc, kc = plan.q_chunk, plan.kv_chunk
            inputs = (
                _part(q, a, qc),
                _part(k_b, b, kc),
                _part(v_b, b, kc),
                weight,
                None if kernel_mask is None else _part(kernel_mask, b, kc),
                jax.lax.dynamic_slice_in_dim(real, b * kc, kc),
            )
            rows = tuple(_part(x, a, qc) for x in (out, m, denom, d_out, delta))
            part_fully = None if fully is None else _part(fully, a, qc)
            g_q, g_k, g_v, g_w = _pair_grads(
                plan, cfg, inputs, (q_offsets[a], kv_offsets[b]), rows, part_fully
            )
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

    stats = weight.dtype  # gradient accumulators, also those that travel
    zeros = tuple(jnp.zeros(x.shape, stats) for x in (k, v, q))
    carry = ((k, v, mask), zeros[:2], zeros[2], 0 * weight)
    held, grads_b, dq, dweight = jax.lax.scan(step, carry, jnp.arange(plan.devices - 1))[0]
    dq, dweight, grads_b = attend(held, grads_b, plan.devices - 1, dq, dweight)
    # After n steps the accumulators sit one device short of their owner: one last hop.
    dk, dv = pass_on(plan, grads_b)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dweight


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention_shards(
    plan: RingPlan,
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
    return _ring_forward(plan, q, k, v, weight, mask)[0]


def _ring_fwd(plan, q, k, v, weight, mask):
    out, m, denom, fully = _ring_forward(plan, q, k, v, weight, mask)
    return out, (q, k, v, weight, mask, out, m, denom, fully)


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
    blocked kernel's own tile schedule (``blocked._schedule``: key tiles visited per query
    tile), without a value mask, and counts ``block_q * block_kv`` entries per visited tile.

    Returns:
      int64 ``[devices, devices]``: entry ``[d, s]`` is device ``d``'s work in step ``s``.
    """
    parts = 2 if layout == "zigzag" else 1
    q_chunk, kv_chunk = (-(-length // (devices * parts)) for length in (q_length, kv_length))
    plan = RingPlan(
        "ring", devices, parts, q_chunk, kv_chunk, kv_length, score_mode, use_causal_mask, False
    )
    cfg = kernel_config(plan, batch, depth)
    n_q, n_kv = -(-q_chunk // cfg.block_q), -(-kv_chunk // cfg.block_kv)
    work = np.zeros((devices, devices), np.int64)
    for device in range(devices):
        q_offsets = np.asarray(part_offsets(plan, device, q_chunk))
        for step in range(devices):
            kv_offsets = np.asarray(part_offsets(plan, (device - step) % devices, kv_chunk))
            for a in range(parts):
                for b in range(parts):
                    offsets = (jnp.int32(q_offsets[a]), jnp.int32(kv_offsets[b]))
                    if not bool(sees_block(plan, *offsets)):
                        continue
                    kv_stop = blocked._schedule(cfg, None, offsets, n_q, n_kv)[0]
                    work[device, step] += int(kv_stop.sum()) * cfg.block_q * cfg.block_kv
    return work
