"""One block of queries against one block of keys, as both sequence-parallel strategies use it.

Each device attends its queries to a key block through the kernel interface
(:mod:`luong_attention._src.kernels.api`), and the strategies merge the resulting online-softmax
states (:func:`~luong_attention._src.kernels.api.merge`) across blocks and devices.

This module is also the one path for *fully masked rows*, queries that see no key in the whole
sequence. The core gives them the softmax over all real keys of ``score - 1e9`` (Keras's fill,
about the mean of the values). Their state is computed exactly, for every block including
those the causal mask skips, by :func:`masked_row_stats` (its push-forward
:func:`masked_row_tangent` and pull-back :func:`masked_row_grads`), in chunks of queries;
the kernel's values for them are discarded. Max and denominator are kept apart, so the
``-1e9`` scale costs no precision, and padding keys (added to split the sequence evenly)
never count.

Both strategies are ``jax.custom_jvp`` functions of the rows' output and statistics with one
rule, :func:`rows_jvp`: their tangent pass (:func:`pair_tangent` per pair) as a linear map
whose transpose is their backward pass (:func:`pair_grads` per pair).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from luong_attention._src.kernels.api import (
    Kernel,
    Operands,
    RowStats,
    SoftmaxState,
    TileConfig,
    empty_state,
    exact_kernel,
    finalise,
    rows_tangent,
)
from luong_attention._src.kernels.registry import get_kernel
from luong_attention._src.primitives.masks import MASK_PENALTY
from luong_attention._src.primitives.rows import join_rows, split_rows
from luong_attention._src.primitives.scores import ScoreParams

# Score entries (times depth for "concat") per query chunk of the fully-masked-row path: 4 MiB.
CHUNK_ELEMENTS = 1 << 20

Grads = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


class Pair(NamedTuple):
    """One query block against one key block (a pytree of arrays).

    Attributes:
      ops: the kernel's operands (``ops.value_mask`` masks padding keys too; no dropout).
      real: bool ``[keys]``, ``False`` at padding keys.
      fully: bool ``[B, rows]``, the rows that see no key in the whole sequence, or ``None``
        when there can be none (no value mask).
    """

    ops: Operands
    real: jax.Array
    fully: jax.Array | None


class Plan(NamedTuple):
    """Static settings of one sequence-parallel call (hashable: a ``custom_jvp`` non-diff
    argument).

    ``parts`` is 1 for the contiguous layout and 2 for zigzag; each device holds ``parts``
    parts of ``q_chunk`` queries and ``kv_chunk`` keys (with replicated queries: one part of
    all ``q_length`` queries, starting at position 0). Keys at global positions
    ``>= kv_length`` are padding. ``kernel`` names the kernel each step runs.
    """

    axis_name: str
    devices: int
    parts: int
    q_chunk: int
    kv_chunk: int
    kv_length: int
    score_mode: str
    causal: bool
    kernel: str = "blocked"


class Residuals(NamedTuple):
    """What a strategy's tangent and backward passes start from, on one device (a pytree).

    Attributes:
      q: ``[B, rows, depth]``, the strategy's queries.
      k: ``[B, keys, depth]``, its keys.
      v: ``[B, keys, dim_v]``, its values.
      weight: ``[]``, ``concat_score_weight``.
      mask: bool ``[B, keys]`` value mask, or ``None``.
      stats: the rows' final :class:`RowStats` over the whole sequence.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    weight: jax.Array
    mask: jax.Array | None
    stats: RowStats


# A strategy's pass: (plan, exact, residuals, tangents or cotangents) -> its results.
Pass = Callable[[Plan, bool, Residuals, tuple], tuple]


def rows_jvp(rows: Callable[..., RowStats], tangent: Pass, backward: Pass) -> Callable:
    """The ``jax.custom_jvp`` rule of a strategy's ``rows(plan, q, k, v, weight, mask) ->
    RowStats``.

    The primal is ``rows`` itself (so derivatives of the rule go through it again); the
    tangent is :func:`~luong_attention._src.kernels.api.rows_tangent` of the strategy's
    ``tangent`` pass (tangents ``(dq, dk, dv, dweight)`` to ``(d_out, d_lse)``) and its
    transpose ``backward``, differentiated with ``exact=True`` (:func:`kernel_config`).
    """

    def rule(plan: Plan, primals: tuple, tangents: tuple) -> tuple[RowStats, RowStats]:
        stats = rows(plan, *primals)
        passes = (functools.partial(tangent, plan), functools.partial(backward, plan))
        return stats, rows_tangent(*passes, Residuals(*primals, stats), tuple(tangents[:4]), stats)

    return rule


def part_offsets(plan: Plan, device: jax.Array | int, chunk: int) -> jax.Array:
    """Global position of the first entry of each of ``device``'s parts, int32 ``[parts]``."""
    firsts = [device] if plan.parts == 1 else [device, 2 * plan.devices - 1 - device]
    return jnp.stack([jnp.asarray(f, jnp.int32) * chunk for f in firsts])


def part_positions(plan: Plan, device: jax.Array | int, chunk: int) -> jax.Array:
    """Global positions of ``device``'s ``parts * chunk`` entries, int32 ``[parts * chunk]``."""
    return (part_offsets(plan, device, chunk)[:, None] + jnp.arange(chunk)).reshape(-1)


def kernel_config(
    plan: Plan, batch: int, depth: int, *, exact: bool = False
) -> tuple[Kernel, TileConfig]:
    """The kernel and its tiles for one (query part, key part) pair.

    With ``exact``, the kernel's maths in code JAX differentiates in every mode
    (``Kernel.differentiable``, every tile visited): for derivatives of the strategies'
    tangent and backward passes.
    """
    kernel = get_kernel(plan.kernel)
    cfg = kernel.config(
        plan.score_mode, plan.q_chunk, plan.kv_chunk, depth, causal=plan.causal, batch=batch
    )
    return exact_kernel(kernel, cfg) if exact else (kernel, cfg)


def key_masks(
    plan: Plan, mask: jax.Array | None, owner: jax.Array
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


def row_stats(state: SoftmaxState) -> RowStats:
    """The final :class:`RowStats` of merged states; a row that saw no key (padding
    queries) gets ``m = 0``, ``denom = 1`` and output 0, so its backward stays finite."""
    return RowStats(
        finalise(state),
        jnp.where(jnp.isfinite(state.m), state.m, 0.0),
        jnp.where(state.denom > 0, state.denom, 1.0),
    )


def sees_block(cfg: TileConfig, offsets: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Whether some query of the block may see some key of the other (always, unless causal)."""
    if not cfg.causal:
        return jnp.bool_(True)
    return offsets[1] <= offsets[0] + cfg.q_length - 1


def blind_rows(
    value_mask: jax.Array | None,
    key_positions: jax.Array,
    query_positions: jax.Array,
    *,
    kv_length: int,
    causal: bool,
    axis_name: str,
    batch: int,
) -> jax.Array | None:
    """bool ``[B, rows]``: the local queries that see no key in the whole sequence.

    One ``pmin`` over ``axis_name`` of each batch row's first visible key; ``None`` without a
    value mask (key 0 is then visible to every query).

    Args:
      value_mask: bool ``[B or 1, keys]`` of this device's keys, or ``None``.
      key_positions: int ``[keys]``, global positions of this device's keys (padding keys at
        ``>= kv_length``); query_positions: int ``[rows]``, of its queries.
    """
    if value_mask is None:
        return None
    never = jnp.iinfo(jnp.int32).max
    open_keys = jnp.logical_and(value_mask, key_positions < kv_length)
    first = jnp.min(jnp.where(open_keys, key_positions, never), axis=-1)
    first = jax.lax.pmin(first, axis_name)
    blind = first[:, None] > query_positions if causal else (first == never)[:, None]
    return jnp.broadcast_to(blind, (batch, query_positions.shape[0]))


def _rows(mask: jax.Array, like: jax.Array) -> jax.Array:
    """A ``[B, rows]`` row mask broadcast against ``like`` (``[B, rows]`` or ``[B, rows, d]``)."""
    return mask if like.ndim == 2 else mask[..., None]


def _penalised_scores(
    score_mode: str, query: jax.Array, key: jax.Array, weight: jax.Array, real: jax.Array
) -> jax.Array:
    """Every real key's ``score - 1e9`` (the core's fill), ``-inf`` at padding keys."""
    params = ScoreParams(score_mode, None, weight if score_mode == "concat" else None)
    scores = params.scores(query, key)
    return jnp.where(real, scores - jnp.asarray(MASK_PENALTY, scores.dtype), -jnp.inf)


def _chunk_rows(score_mode: str, rows: int, keys: int, depth: int) -> int:
    """Queries per chunk of the fully-masked-row path (at most CHUNK_ELEMENTS scores)."""
    per_query = keys * (depth if score_mode == "concat" else 1)
    return max(1, min(rows, CHUNK_ELEMENTS // per_query))


def masked_row_stats(score_mode: str, ops: Operands, real: jax.Array) -> SoftmaxState:
    """Exact state of fully masked rows over one key block (meaningless for other rows).

    Args:
      score_mode: ``"dot"`` or ``"concat"``.
      ops: ``q [B, rows, depth]``, ``k [B, keys, depth]``, ``v [B, keys, dim_v]`` and
        ``weight`` (``concat_score_weight``); the mask, offsets and key are not used.
      real: bool ``[keys]``, ``False`` at padding keys.

    Returns:
      The state over the block's real keys of the penalised scores, in chunks of queries.
    """
    rows, stats = ops.q.shape[1], ops.weight.dtype

    def chunk_stats(q_chunk: jax.Array) -> SoftmaxState:
        filled = _penalised_scores(score_mode, q_chunk, ops.k, ops.weight, real)
        m = filled.max(-1)
        p = jnp.exp(filled - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
        acc = jnp.einsum("bqk,bkv->bqv", p, ops.v, preferred_element_type=stats)
        return SoftmaxState(m, p.sum(-1), acc)

    state = jax.lax.map(chunk_stats, _row_chunks(score_mode, ops, ((ops.q, 0.0),))[0])
    return SoftmaxState(*(join_rows(x, rows) for x in state))


def _masked_rows_output(
    score_mode: str, real: jax.Array, m: jax.Array, denom: jax.Array
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``(q, k, v, weight) -> (p @ v [B, rows, dim_v], sum(p) [B, rows])`` of fully masked
    rows over one key block, with ``p = exp(score - 1e9 - m) / denom`` from the rows' final
    max and denominator ``[B, rows]`` (their share of the output and of the softmax)."""

    def weighted(query, key, value, weight):
        filled = _penalised_scores(score_mode, query, key, weight, real)
        p = jnp.exp(filled - m[..., None]) / denom[..., None]
        out = jnp.einsum("bqk,bkv->bqv", p, value, preferred_element_type=p.dtype)
        return out, p.sum(-1)

    return weighted


def _row_chunks(score_mode: str, ops: Operands, fills: tuple) -> tuple:
    """``[B, rows, ...]`` arrays split into the query chunks of the fully-masked-row path,
    ``[n_chunks, B, chunk, ...]`` (``fills``: ``(array, pad value)`` pairs)."""
    chunk = _chunk_rows(score_mode, ops.q.shape[1], ops.k.shape[1], ops.q.shape[-1])
    return tuple(split_rows(x, chunk, fill) for x, fill in fills)


def masked_row_grads(
    score_mode: str,
    ops: Operands,
    real: jax.Array,
    stats: RowStats,
    d_out: jax.Array,
    d_lse: jax.Array,
) -> Grads:
    """Gradients ``(dq, dk, dv, dweight)`` of fully masked rows over one key block.

    ``stats`` holds the rows' final output, max and denominator; ``d_out`` ``[B, rows,
    dim_v]`` and ``d_lse`` ``[B, rows]`` the cotangents of output and logsumexp, zero on the
    rows that are not fully masked. The weights are ``p = exp(score - 1e9 - m) / denom`` and
    ``d score = p * (dp - delta + d_lse)`` with ``delta = sum(d_out * out)``: the pull-back
    of ``(p @ v, sum(p))`` with cotangents ``(d_out, d_lse - delta)``; the transpose of
    :func:`masked_row_tangent`.
    """
    delta = (d_out * stats.out).sum(-1)
    fills = ((ops.q, 0.0), (stats.m, 0.0), (stats.denom, 1.0), (d_out, 0.0), (d_lse - delta, 0.0))
    xs = _row_chunks(score_mode, ops, fills)

    def chunk_grads(carry, xs):
        dk, dv, dweight = carry
        q_c, m_c, denom_c, d_out_c, d_sum_c = xs
        weighted = _masked_rows_output(score_mode, real, m_c, denom_c)
        _, pull_back = jax.vjp(weighted, q_c, ops.k, ops.v, ops.weight)
        dq_c, dk_c, dv_c, dw_c = pull_back((d_out_c, d_sum_c))
        return (dk + dk_c, dv + dv_c, dweight + dw_c), dq_c

    acc = ops.weight.dtype
    init = (jnp.zeros(ops.k.shape, acc), jnp.zeros(ops.v.shape, acc), 0 * ops.weight)
    (dk, dv, dweight), dq = jax.lax.scan(chunk_grads, init, xs)
    return join_rows(dq, ops.q.shape[1]), dk, dv, dweight


def masked_row_tangent(
    score_mode: str, ops: Operands, real: jax.Array, stats: RowStats, d_ops: Grads
) -> tuple[jax.Array, jax.Array]:
    """Tangents ``(d_out [B, rows, dim_v], d_lse [B, rows])`` of fully masked rows over one
    key block (meaningless for other rows), for tangents ``d_ops = (dq, dk, dv, dweight)``.

    The push-forward of ``(p @ v, sum(p))`` (see :func:`masked_row_grads`): ``d_lse = sum
    p ds`` and ``d_out = sum p (ds v + dv) - d_lse out`` with the rows' final ``out``, so
    the blocks' tangents add up to the rows'.
    """
    dq, dk, dv, dweight = d_ops
    fills = ((ops.q, 0.0), (dq, 0.0), (stats.m, 0.0), (stats.denom, 1.0))
    xs = _row_chunks(score_mode, ops, fills)

    def chunk_tangent(xs):
        q_c, dq_c, m_c, denom_c = xs
        weighted = _masked_rows_output(score_mode, real, m_c, denom_c)
        primals = (q_c, ops.k, ops.v, ops.weight)
        return jax.jvp(weighted, primals, (dq_c, dk, dv, dweight))[1]

    d_acc, d_lse = (join_rows(x, ops.q.shape[1]) for x in jax.lax.map(chunk_tangent, xs))
    return d_acc - d_lse[..., None] * stats.out, d_lse


def _exact_where_fully(
    pair: Pair, computed: tuple, exact: Callable[[], tuple], combine: Callable
) -> tuple:
    """``computed``, with ``exact()`` combined in (under a ``lax.cond``) if a row is fully
    masked."""
    if pair.fully is None:
        return computed
    return jax.lax.cond(jnp.any(pair.fully), lambda: combine(computed, exact()), lambda: computed)


def pair_state(kernel: Kernel, cfg: TileConfig, pair: Pair) -> SoftmaxState:
    """The state of the pair's queries over its keys: the kernel's, none where the causal
    mask hides the whole block, the exact one in fully masked rows."""
    ops = pair.ops
    state = jax.lax.cond(
        sees_block(cfg, ops.offsets),
        lambda: kernel.forward(cfg, ops),
        lambda: empty_state(ops.q.shape[0], cfg.q_length, ops.v.shape[-1], ops.weight.dtype),
    )

    def combine(kernel_state: SoftmaxState, exact: SoftmaxState) -> SoftmaxState:
        return SoftmaxState(
            *(
                jnp.where(_rows(pair.fully, x), x, y)
                for x, y in zip(exact, kernel_state, strict=True)
            )
        )

    return _exact_where_fully(
        pair, state, lambda: masked_row_stats(cfg.score_mode, ops, pair.real), combine
    )


def pair_grads(
    kernel: Kernel,
    cfg: TileConfig,
    pair: Pair,
    stats: RowStats,
    d_out: jax.Array,
    d_lse: jax.Array,
) -> Grads:
    """``(dq, dk, dv, dweight)`` of the pair, given its rows' final :class:`RowStats` (over the
    whole sequence) and the cotangents of their output ``[B, rows, dim_v]`` and logsumexp
    ``[B, rows]``; the pull-back of :func:`pair_state`, the transpose of :func:`pair_tangent`."""
    ops = pair.ops

    def kernel_grads() -> Grads:
        return tuple(kernel.backward(cfg, ops, stats, *_not_fully(pair, (d_out, d_lse))))

    def skipped() -> Grads:
        return tuple(jnp.zeros_like(x) for x in (ops.q, ops.k, ops.v, ops.weight))

    grads = jax.lax.cond(sees_block(cfg, ops.offsets), kernel_grads, skipped)

    def exact() -> Grads:
        d_fully = (jnp.where(_rows(pair.fully, x), x, 0.0) for x in (d_out, d_lse))
        return masked_row_grads(cfg.score_mode, ops, pair.real, stats, *d_fully)

    def combine(grads: Grads, extra: Grads) -> Grads:
        return tuple((g + e).astype(g.dtype) for g, e in zip(grads, extra, strict=True))

    return _exact_where_fully(pair, grads, exact, combine)


def pair_tangent(
    kernel: Kernel, cfg: TileConfig, pair: Pair, stats: RowStats, d_ops: Grads
) -> tuple[jax.Array, jax.Array]:
    """The pair's share ``(d_out [B, rows, dim_v], d_lse [B, rows])`` of its rows' output and
    logsumexp tangents, for tangents ``d_ops = (dq, dk, dv, dweight)`` of its operands,
    given the rows' final :class:`RowStats`: the push-forward of :func:`pair_state`. The
    shares of disjoint key blocks add up to the rows' tangents."""
    ops = pair.ops

    def kernel_tangent() -> tuple[jax.Array, jax.Array]:
        return tuple(kernel.tangent(cfg, ops, stats, d_ops))

    def skipped() -> tuple[jax.Array, jax.Array]:
        return jnp.zeros_like(stats.out), jnp.zeros_like(stats.m)

    tangents = jax.lax.cond(sees_block(cfg, ops.offsets), kernel_tangent, skipped)

    def combine(tangents: tuple, exact: tuple) -> tuple:
        return tuple(
            jnp.where(_rows(pair.fully, x), y, x) for x, y in zip(tangents, exact, strict=True)
        )

    def exact() -> tuple[jax.Array, jax.Array]:
        return masked_row_tangent(cfg.score_mode, ops, pair.real, stats, d_ops)

    return _exact_where_fully(pair, tangents, exact, combine)


def _not_fully(pair: Pair, arrays: tuple) -> tuple:
    """``[B, rows, ...]`` arrays zeroed on the fully masked rows (the kernel's share there
    is replaced by the exact path's)."""
    if pair.fully is None:
        return arrays
    return tuple(jnp.where(_rows(pair.fully, x), 0.0, x) for x in arrays)
