"""The blocked kernel (``lax`` loops over tiles, for CPUs): :data:`KERNEL`.

Online-softmax attention with a FlashAttention-2 style backward, behind the kernel interface
(:mod:`luong_attention._src.kernels.api`).

The maths is the core's (:func:`luong_attention.attention`): Keras scores, masked scores
pushed down by :data:`MASK_PENALTY`, a float32 softmax and the weighted sum of the values.
Instead of building the ``[Tq, Tv]`` score matrix (and for ``"concat"`` the
``[Tq, Tv, depth]`` tanh tensor) it walks over ``[block_q, block_kv]`` tiles, carrying the
running row max, denominator and output accumulator in float32. The backward pass
recomputes each tile from the saved per-row max and denominator, so forward and gradient both need
memory linear in the lengths.

Masking follows the core exactly. A masked score is ``score - MASK_PENALTY``; in a row that
has any unmasked key those entries get exactly zero weight, so whole tiles of them are
skipped (causal tiles above the diagonal). A *fully masked* row, however, is a softmax over
all ``Tv`` penalised scores (close to the mean of the values, as in Keras), so a tile is
skipped only when no row of its query block is fully masked. Under the causal mask the
fully masked rows are a prefix of the queries, which keeps the tile schedule two ranges.

Internal layout: the interface's ``[B, T, ...]`` arrays are padded to whole blocks and
stored block-major, ``[n_blocks, B, block, depth]``, so the
loops index their leading axis. Padded keys are excluded outright (a bias of
``-_PAD_PENALTY``), unlike masked keys, which still count in fully masked rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from luong_attention._src.kernels.api import (
    Kernel,
    Operands,
    RowStats,
    Schedule,
    SoftmaxState,
    TileConfig,
)
from luong_attention._src.primitives.masks import MASK_PENALTY
from luong_attention._src.primitives.rows import join_rows, split_rows
from luong_attention._src.primitives.scores import concat_scores, dot_scores, narrower_dtype

# Padded keys get this bias: far below a penalised score (about -1e9), still finite in f32.
_PAD_PENALTY = 1.0e30
# Default tiles, measured with `luong-attention bench`. "dot": key blocks of 512 and as many
# queries as fit B * block_q * block_kv <= DOT_TILE_ELEMENTS (8 MiB of f32 scores): tall tiles
# make few, large matmuls, which XLA:CPU runs near its peak. "concat" keeps its
# [block_q, block_kv, depth] tanh tile at CONCAT_TILE_ELEMENTS.
DOT_BLOCK_KV = 512
DOT_WHOLE_KV_MAX = 1024  # up to this many keys, one key block holds them all
DOT_BLOCK_Q_RANGE = (128, 4096)
# Under the causal mask a query block skips the key blocks above the diagonal; tall blocks
# skip little (one 4096-query block skips nothing), so causal query blocks stay at most a
# quarter of Tq and at most this.
DOT_CAUSAL_BLOCK_Q_MAX = 2048
DOT_TILE_ELEMENTS = 1 << 21
CONCAT_TILE_ELEMENTS = 1 << 21


def _balanced(length: int, target: int) -> int:
    """The smallest multiple of 8 that splits ``length`` in as many blocks as ``target`` does.

    Keeps padding small: 1500 with target 1024 gives 2 blocks of 752, not 2 of 1024.
    """
    n_blocks = -(-length // target)
    block = -(-length // n_blocks)
    return min(length, -(-block // 8) * 8)


def default_blocks(
    score_mode: str,
    q_length: int,
    kv_length: int,
    depth: int,
    batch: int = 1,
    causal: bool = False,
) -> tuple[int, int]:
    """The default ``(block_q, block_kv)`` for a problem, balanced over the lengths.

    ``"dot"``: one tile when ``batch == 1`` and ``Tq * Tv`` fits in ``2**21`` elements. Else
    ``block_kv = 512`` (or all keys in one block when ``Tv <= 1024``: batches of 8-16 rows of
    1024 ran the gradient 10-25% faster than with 512-key blocks) and the tallest
    ``block_q`` (a power of two in ``[128, 4096]``) with ``batch * block_q * block_kv <=
    2**21``: at ``batch=1`` tiles of 4096 x 512, which on a 2-core CPU ran the forward 10-25%
    faster than 512 x 1024 (few large matmuls, each near peak; a single tile of 2048 x 2048,
    by contrast, ran 2x slower than 2048 x 512). With ``causal``, ``block_q`` is also at most
    ``Tq / 4`` (a power of two) and 2048, so that whole tiles above the diagonal are skipped
    (at T=4096 the gradient took 59 ms with 1024-query blocks against 99 ms with one
    4096-query block). ``"concat"`` aims at square tiles with
    ``block_q * block_kv * depth <= 2**21`` elements (8 MiB in f32).
    """
    if score_mode == "dot":
        if batch == 1 and q_length * kv_length <= DOT_TILE_ELEMENTS:
            # One tile, no loop: fastest for one example. Not for a batch: XLA:CPU ran the
            # loop-free kernel's gradient 1.6-1.7x slower there than with two query blocks.
            return q_length, kv_length
        block_kv = kv_length if kv_length <= DOT_WHOLE_KV_MAX else DOT_BLOCK_KV
        low, high = DOT_BLOCK_Q_RANGE
        fit = DOT_TILE_ELEMENTS // (max(batch, 1) * block_kv)
        if causal:
            fit = min(fit, q_length // 4, DOT_CAUSAL_BLOCK_Q_MAX)
        elif block_kv == kv_length:
            fit = min(fit, q_length // 2)  # never one loop-free tile for a batch (see above)
        block_q = min(high, max(low, 2 ** int(math.log2(max(fit, 1)))))
    else:
        side = 2 ** max(3, int(math.log2(max(1, CONCAT_TILE_ELEMENTS // max(depth, 1)))) // 2)
        block_q = block_kv = side
    return _balanced(q_length, block_q), _balanced(kv_length, block_kv)


def config(
    score_mode: str,
    q_length: int,
    kv_length: int,
    depth: int,
    *,
    causal: bool = False,
    dropout_rate: float = 0.0,
    block_q: int | None = None,
    block_kv: int | None = None,
    batch: int = 1,
) -> TileConfig:
    """The tiles of one call: checks ``block_q``/``block_kv``, fills in :func:`default_blocks`.

    Raises:
      ValueError: for a block size that is not a positive int or ``None``.
    """
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block is not None and (not isinstance(block, int) or block < 1):
            raise ValueError(f"{name} must be a positive int or None. Received: {name}={block!r}")
    default_q, default_kv = default_blocks(score_mode, q_length, kv_length, depth, batch, causal)
    return TileConfig(
        score_mode=score_mode,
        causal=bool(causal),
        block_q=min(block_q or default_q, q_length),
        block_kv=min(block_kv or default_kv, kv_length),
        q_length=q_length,
        kv_length=kv_length,
        dropout_rate=float(dropout_rate),
    )


# (cfg, rng, i, j, [B, bq, bk]) -> the dropout multiplier of tile (i, j), or None.
KeepFn = Callable[
    [TileConfig, jax.Array | None, jax.Array, jax.Array, tuple[int, ...]], jax.Array | None
]


def dropout_multiplier(cfg: TileConfig, rng: jax.Array, batch: int) -> jax.Array:
    """The blocked path's dropout multipliers as one ``[B, Tq, Tv]`` array.

    Tile ``(i, j)`` draws its mask from ``fold_in(rng, i * n_kv + j)``, exactly as the kernel
    does, so the weights returned by ``return_attention_scores`` match the output.
    """
    n_q, n_kv = cfg.n_q, cfg.n_kv
    shape = (batch, cfg.block_q, cfg.block_kv)
    tiles = jax.vmap(
        jax.vmap(lambda i, j: _tile_keep(cfg, rng, i, j, shape), (None, 0)), (0, None)
    )(jnp.arange(n_q), jnp.arange(n_kv))
    # [n_q, n_kv, B, bq, bk] -> [B, n_q * bq, n_kv * bk]
    full = tiles.transpose(2, 0, 3, 1, 4).reshape(batch, n_q * cfg.block_q, n_kv * cfg.block_kv)
    return full[:, : cfg.q_length, : cfg.kv_length]


def _bmm(a: jax.Array, b: jax.Array, contract: tuple[int, int], out: jnp.dtype) -> jax.Array:
    """Batched (over axis 0) matmul contracting ``a``'s and ``b``'s given axes.

    Both operands are multiplied in the narrower of their dtypes (the float32 weights or
    score gradients meet bfloat16/float16 inputs as low-precision operands, as in
    FlashAttention) and accumulated in ``out`` (float32 or wider).
    """
    narrow = narrower_dtype(a, b)
    return jax.lax.dot_general(
        a.astype(narrow),
        b.astype(narrow),
        (((contract[0],), (contract[1],)), ((0,), (0,))),
        preferred_element_type=out,
    )


def _tile_scores(cfg: TileConfig, qb: jax.Array, kb: jax.Array, weight: jax.Array) -> jax.Array:
    """Raw scores of one tile, ``[B, bq, bk]``; ``scale`` was folded into ``qb``/``kb``."""
    if cfg.score_mode == "dot":
        return dot_scores(qb, kb)
    return concat_scores(qb, kb, concat_score_weight=weight)


def _tile_bias(
    cfg: TileConfig,
    biases: tuple[jax.Array, jax.Array] | None,
    offsets: tuple[jax.Array, jax.Array],
    i: jax.Array,
    j: jax.Array,
) -> jax.Array | None:
    """Additive score bias of tile ``(i, j)``: 0, ``-MASK_PENALTY`` or ``-_PAD_PENALTY``.

    ``biases`` are ``(allowed, masked)``, each ``[n_kv, B or 1, bk]``: the bias of a key that
    the causal mask lets through, and of one it masks. Returns ``[B or 1, bq or 1, bk]``.
    """
    if biases is None:
        return None
    allowed, masked = biases[0][j][:, None, :], biases[1][j][:, None, :]
    if not cfg.causal:
        return allowed
    rows = offsets[0] + i * cfg.block_q + jnp.arange(cfg.block_q)
    cols = offsets[1] + j * cfg.block_kv + jnp.arange(cfg.block_kv)
    return jnp.where((cols[None, :] <= rows[:, None])[None], allowed, masked)


def _tile_keep(
    cfg: TileConfig, rng: jax.Array | None, i: jax.Array, j: jax.Array, shape: tuple[int, ...]
) -> jax.Array | None:
    """Dropout multiplier of tile ``(i, j)``: ``keep / (1 - rate)``, or ``None``."""
    if cfg.dropout_rate == 0.0:
        return None
    keep = jax.random.bernoulli(
        jax.random.fold_in(rng, i * cfg.n_kv + j), 1.0 - cfg.dropout_rate, shape
    )
    return keep.astype(jnp.float32) / (1.0 - cfg.dropout_rate)


def _key_biases(
    cfg: TileConfig, value_mask: jax.Array | None, n_kv: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array] | None:
    """The ``(allowed, masked)`` key biases ``[n_kv, B or 1, bk]`` (see :func:`_tile_bias`)."""
    padded = n_kv * cfg.block_kv != cfg.kv_length
    if value_mask is None and not cfg.causal and not padded:
        return None
    real = jnp.arange(n_kv * cfg.block_kv) < cfg.kv_length
    vmask = jnp.ones((1, cfg.kv_length), bool) if value_mask is None else value_mask
    vmask = jnp.pad(vmask, ((0, 0), (0, n_kv * cfg.block_kv - cfg.kv_length)))
    pad = jnp.asarray(-_PAD_PENALTY, dtype)
    penalty = jnp.asarray(-MASK_PENALTY, dtype)
    allowed = jnp.where(real, jnp.where(vmask, jnp.asarray(0, dtype), penalty), pad)
    masked = jnp.broadcast_to(jnp.where(real, penalty, pad), allowed.shape)
    return split_rows(allowed[..., None], cfg.block_kv)[..., 0], split_rows(
        masked[..., None], cfg.block_kv
    )[..., 0]


def schedule(
    cfg: TileConfig, value_mask: jax.Array | None, offsets: tuple[jax.Array, jax.Array]
) -> Schedule:
    """Which tiles to compute (see :class:`Schedule`): everything without the causal mask.

    Under the causal mask the fully masked rows (their first allowed key lies after them)
    are a prefix of the queries, so ``n_full`` leading query tiles see every key.
    """
    n_q, n_kv = cfg.n_q, cfg.n_kv
    if not cfg.causal:
        return Schedule(jnp.full((n_q,), n_kv), jnp.zeros((n_kv,), jnp.int32), jnp.int32(0))
    q_off, kv_off = offsets
    last_row = q_off + (jnp.arange(n_q) + 1) * cfg.block_q - 1
    kv_stop = jnp.clip((last_row - kv_off) // cfg.block_kv + 1, 0, n_kv)
    q_start = jnp.clip((kv_off + jnp.arange(n_kv) * cfg.block_kv - q_off) // cfg.block_q, 0, n_q)
    # Row r is fully masked iff its first allowed key kv_off + first lies after q_off + r.
    if value_mask is None:
        first = jnp.zeros((1,), jnp.int32)
    else:
        first = jnp.where(value_mask.any(-1), jnp.argmax(value_mask, axis=-1), cfg.kv_length)
    full_rows = jnp.clip(kv_off + jnp.max(first) - q_off, 0, cfg.q_length)
    n_full = -(-full_rows // cfg.block_q)
    kv_stop = jnp.where(jnp.arange(n_q) < n_full, n_kv, kv_stop)
    return Schedule(kv_stop, q_start, n_full.astype(jnp.int32))


def _tiles(
    cfg: TileConfig, ops: Operands
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None, Schedule]:
    """What forward and backward both start from: block-major ``q``/``k``/``v``
    (``[n_blocks, B, block, ...]``), the per-key-block biases (in the statistics dtype of
    ``ops.weight``) and the tile schedule."""
    qb, kb, vb = (
        split_rows(ops.q, cfg.block_q),
        split_rows(ops.k, cfg.block_kv),
        split_rows(ops.v, cfg.block_kv),
    )
    biases = _key_biases(cfg, ops.value_mask, cfg.n_kv, ops.weight.dtype)
    return qb, kb, vb, biases, schedule(cfg, ops.value_mask, ops.offsets)


def forward(cfg: TileConfig, ops: Operands, *, keep: KeepFn = _tile_keep) -> SoftmaxState:
    """The online softmax over ``[block_q, block_kv]`` tiles: the state of every query row
    (``[B, Tq]``, ``[B, Tq]``, ``[B, Tq, dim_v]``, in the statistics dtype of ``ops.weight``).
    """
    qb, kb, vb, biases, sched = _tiles(cfg, ops)
    weight, offsets, stats = ops.weight, ops.offsets, ops.weight.dtype
    batch, dim_v = ops.q.shape[0], ops.v.shape[-1]

    def q_block(args):
        i, q_i = args

        def kv_step(j, carry):
            m, denom, acc = carry
            s = _tile_scores(cfg, q_i, kb[j], weight)
            bias = _tile_bias(cfg, biases, offsets, i, j)
            if bias is not None:
                s = s + bias
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            denom = alpha * denom + p.sum(-1)
            kept = keep(cfg, ops.rng, i, j, p.shape)
            pv = _bmm(p if kept is None else p * kept, vb[j], (2, 1), stats)
            return m_new, denom, alpha[..., None] * acc + pv

        init = (
            jnp.full((batch, cfg.block_q), -jnp.inf, stats),
            jnp.zeros((batch, cfg.block_q), stats),
            jnp.zeros((batch, cfg.block_q, dim_v), stats),
        )
        return jax.lax.fori_loop(0, _kv_stop(cfg, sched, i), kv_step, init)

    m, denom, acc = jax.lax.map(q_block, (jnp.arange(cfg.n_q), qb))
    return SoftmaxState(*(join_rows(x, cfg.q_length) for x in (m, denom, acc)))


def _kv_stop(cfg: TileConfig, sched: Schedule, i: jax.Array) -> jax.Array | int:
    """How many key tiles query tile ``i`` visits: all of them, as a static bound that JAX
    differentiates in reverse, under ``cfg.every_tile``."""
    return cfg.n_kv if cfg.every_tile else sched.kv_stop[i]


def _row_weights(cfg: TileConfig, stats: RowStats) -> tuple[jax.Array, jax.Array]:
    """Block-major ``m`` and ``1 / denom`` ``[n_q, B, bq]`` of the rows' final statistics;
    padded rows get ``m = +inf``, so weight 0 (no overflow from an unknown max)."""
    return (
        split_rows(stats.m, cfg.block_q, jnp.inf),
        1.0 / split_rows(stats.denom, cfg.block_q, 1.0),
    )


def _score_tangent(
    cfg: TileConfig,
    q_i: jax.Array,
    k_j: jax.Array,
    weight: jax.Array,
    d: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """A tile's raw scores and their tangent ``[B, bq, bk]`` for tangents ``d = (dq_i [B, bq,
    depth], dk_j [B, bk, depth], dweight [])``, in the statistics dtype of ``weight``."""
    dq_i, dk_j, dweight = d
    acc = weight.dtype
    if cfg.score_mode == "dot":
        # dq k^T + q dk^T as one product over twice the depth: 8-10% faster on XLA:CPU.
        both = _bmm(jnp.concatenate([dq_i, q_i], -1), jnp.concatenate([k_j, dk_j], -1), (2, 2), acc)
        return _bmm(q_i, k_j, (2, 2), acc), both
    tanh = jnp.tanh(q_i.astype(acc)[:, :, None, :] + k_j.astype(acc)[:, None])
    slope = 1.0 - tanh * tanh
    d_pre = dq_i.astype(acc)[:, :, None, :] + dk_j.astype(acc)[:, None]
    tanh_sum = tanh.sum(-1)
    return weight * tanh_sum, dweight * tanh_sum + weight * (slope * d_pre).sum(-1)


def _tangent_tiles(cfg: TileConfig, batch: int) -> TileConfig:
    """The tangent pass's tiles: a "dot" tile holds about twice the forward's temporaries
    (scores, their tangent, the weights, their product), so without dropout (whose mask is
    drawn per tile, fixing the tiles) query blocks fit half the forward's tile budget:
    2048 x 512 ran the pass 10-13% faster than 4096 x 512 at T = 4096-16384."""
    if cfg.dropout_rate or cfg.score_mode != "dot":
        return cfg
    fit = DOT_TILE_ELEMENTS // (2 * batch * cfg.block_kv)
    if cfg.block_q <= fit:
        return cfg
    block_q = max(DOT_BLOCK_Q_RANGE[0], 2 ** int(math.log2(max(fit, 1))))
    return cfg._replace(block_q=_balanced(cfg.q_length, block_q))


def tangent(
    cfg: TileConfig,
    ops: Operands,
    stats: RowStats,
    d_ops: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    keep: KeepFn = _tile_keep,
) -> tuple[jax.Array, jax.Array]:
    """The forward-mode pass: tangents ``(d_out [B, Tq, dim_v], d_lse [B, Tq])`` of the
    output and logsumexp for tangents ``d_ops = (dq, dk, dv, dweight)`` of the operands.

    One sweep over the forward's tiles with the rows' final statistics: the weights ``p``
    of a tile are ``exp(s - m) / denom``, so ``d_lse = sum_j p ds`` and ``d_out = sum_j p
    keep (ds v + dv) - d_lse out``; memory stays linear in the lengths.
    """
    dq, dk, dv, dweight = d_ops
    cfg = _tangent_tiles(cfg, ops.q.shape[0])
    qb, kb, vb, biases, sched = _tiles(cfg, ops)
    dqb, dkb, dvb = (
        split_rows(dq, cfg.block_q),
        split_rows(dk, cfg.block_kv),
        split_rows(dv, cfg.block_kv),
    )
    acc = ops.weight.dtype
    m, inv_denom = _row_weights(cfg, stats)
    batch, dim_v = ops.q.shape[0], ops.v.shape[-1]

    def q_block(args):
        i, q_i, dq_i, m_i, inv_i = args

        def kv_step(j, carry):
            d_lse, d_acc = carry
            s, ds = _score_tangent(cfg, q_i, kb[j], ops.weight, (dq_i, dkb[j], dweight))
            bias = _tile_bias(cfg, biases, ops.offsets, i, j)
            if bias is not None:
                s = s + bias
            p = jnp.exp(s - m_i[..., None]) * inv_i[..., None]
            p_ds = p * ds
            d_lse = d_lse + p_ds.sum(-1)
            kept = keep(cfg, ops.rng, i, j, p.shape)
            if kept is not None:
                p, p_ds = p * kept, p_ds * kept
            d_acc = d_acc + _bmm(p_ds, vb[j], (2, 1), acc) + _bmm(p, dvb[j], (2, 1), acc)
            return d_lse, d_acc

        init = (jnp.zeros((batch, cfg.block_q), acc), jnp.zeros((batch, cfg.block_q, dim_v), acc))
        return jax.lax.fori_loop(0, _kv_stop(cfg, sched, i), kv_step, init)

    d_lse, d_acc = jax.lax.map(q_block, (jnp.arange(cfg.n_q), qb, dqb, m, inv_denom))
    d_lse, d_acc = join_rows(d_lse, cfg.q_length), join_rows(d_acc, cfg.q_length)
    return d_acc - d_lse[..., None] * stats.out, d_lse


def backward(
    cfg: TileConfig,
    ops: Operands,
    stats: RowStats,
    d_out: jax.Array,
    d_lse: jax.Array,
    *,
    keep: KeepFn = _tile_keep,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv, dweight)`` of the blocked forward (FlashAttention-2 order).

    The outer loop walks key blocks and accumulates their ``dk``/``dv``; the inner loop walks
    the query blocks that see them, recomputing the tile's weights from ``stats.m`` and
    ``stats.denom`` and adding into ``dq``.

    Args:
      cfg, ops: as the forward's.
      stats: the rows' output ``[B, Tq, dim_v]``, final max and denominator ``[B, Tq]``.
      d_out: ``[B, Tq, dim_v]``; d_lse: ``[B, Tq]``, cotangents of output and logsumexp.
    """
    q, k, v, weight, _, offsets, rng = ops
    acc_dtype = weight.dtype
    qb, kb, vb, biases, (_, q_start, n_full) = _tiles(cfg, ops)
    n_q, n_kv = qb.shape[0], kb.shape[0]
    d_outb = split_rows(d_out, cfg.block_q)
    # d lse / d s = p, so the lse cotangent enters as a shift of the usual row term D.
    delta = (d_outb * split_rows(stats.out, cfg.block_q)).sum(-1) - split_rows(d_lse, cfg.block_q)
    # dO meets v and p in the matmuls: in the operand dtype, as the inputs.
    d_outb = d_outb.astype(v.dtype)
    m, inv_denom = _row_weights(cfg, stats)

    # Key-major tiles [B, bk, bq]: every matmul below is then NN or NT, which XLA:CPU runs
    # about 3x faster than the TN products (p^T dO, ds^T q) of the query-major layout. For
    # "dot", dq is accumulated transposed, [n_q, B, depth, bq], from k^T (transposed once).
    key_t = jnp.swapaxes(kb, -1, -2) if cfg.score_mode == "dot" else None

    def kv_block(j, carry):
        dq, dweight = carry
        k_j, v_j = kb[j], vb[j]
        # Under every_tile: all query tiles, in order, a static trip count.
        head = n_q if cfg.every_tile else jnp.minimum(n_full, q_start[j])

        def q_step(t, inner):
            dk_j, dv_j, dq, dweight = inner
            i = jnp.where(t < head, t, q_start[j] + t - head)
            q_i, do_i = qb[i], d_outb[i]
            if cfg.score_mode == "dot":
                s_t = _bmm(k_j, q_i, (2, 2), acc_dtype)
            else:
                tanh = jnp.tanh(
                    k_j.astype(acc_dtype)[:, :, None, :] + q_i.astype(acc_dtype)[:, None]
                )
                tanh_sum = tanh.sum(-1)
                s_t = weight * tanh_sum
            bias = _tile_bias(cfg, biases, offsets, i, j)
            if bias is not None:
                s_t = s_t + jnp.swapaxes(bias, -1, -2)
            p_t = jnp.exp(s_t - m[i][:, None, :]) * inv_denom[i][:, None, :]
            dp_t = _bmm(v_j, do_i, (2, 2), acc_dtype)
            kept = keep(cfg, rng, i, j, (p_t.shape[0], cfg.block_q, cfg.block_kv))
            if kept is None:
                dv_j = dv_j + _bmm(p_t, do_i, (2, 1), acc_dtype)
            else:
                keep_t = jnp.swapaxes(kept, -1, -2)
                dp_t = dp_t * keep_t
                dv_j = dv_j + _bmm(p_t * keep_t, do_i, (2, 1), acc_dtype)
            ds_t = p_t * (dp_t - delta[i][:, None, :])
            if cfg.score_mode == "dot":
                dk_j = dk_j + _bmm(ds_t, q_i, (2, 1), acc_dtype)
                dq_i = _bmm(key_t[j], ds_t, (2, 1), acc_dtype)
            else:
                dweight = dweight + (ds_t * tanh_sum).sum()
                g = (weight * ds_t)[..., None] * (1.0 - tanh * tanh)
                dk_j = dk_j + g.sum(2)
                dq_i = g.sum(1)
            return dk_j, dv_j, dq.at[i].add(dq_i), dweight

        init = (jnp.zeros(k_j.shape, acc_dtype), jnp.zeros(v_j.shape, acc_dtype), dq, dweight)
        visits = n_q if cfg.every_tile else head + n_q - q_start[j]
        dk_j, dv_j, dq, dweight = jax.lax.fori_loop(0, visits, q_step, init)
        return (dq, dweight), (dk_j, dv_j)

    def scan_step(carry, j):
        return kv_block(j, carry)

    dq_shape = jnp.swapaxes(qb, -1, -2).shape if cfg.score_mode == "dot" else qb.shape
    (dq, dweight), (dk, dv) = jax.lax.scan(
        scan_step, (jnp.zeros(dq_shape, acc_dtype), jnp.zeros((), acc_dtype)), jnp.arange(n_kv)
    )
    if cfg.score_mode == "dot":
        dq = jnp.swapaxes(dq, -1, -2)
    # Accumulated in float32 over the tiles; handed back in the inputs' (operand) dtype.
    return (
        join_rows(dq, cfg.q_length).astype(q.dtype),
        join_rows(dk, cfg.kv_length).astype(k.dtype),
        join_rows(dv, cfg.kv_length).astype(v.dtype),
        dweight,
    )


def with_dropout(
    name: str, keep: KeepFn, multiplier: Callable[[TileConfig, jax.Array, int], jax.Array]
) -> Kernel:
    """This kernel's ``lax`` loops drawing another kernel's dropout mask (``keep`` per tile,
    ``multiplier`` densely): that kernel's maths in code JAX differentiates."""
    return Kernel(
        name=name,
        config=config,
        forward=functools.partial(forward, keep=keep),
        backward=functools.partial(backward, keep=keep),
        schedule=schedule,
        dropout_multiplier=multiplier,
        tangent=functools.partial(tangent, keep=keep),
    )


KERNEL = Kernel(
    name="blocked",
    config=config,
    forward=forward,
    backward=backward,
    schedule=schedule,
    dropout_multiplier=dropout_multiplier,
    tangent=tangent,
)
