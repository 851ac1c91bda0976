"""The Pallas GPU (Triton) kernel's tangent pass: forward-mode derivatives as one kernel.

The push-forward of tangents ``(dq, dk, dv)`` of the operands to the output and the
logsumexp, given the rows' final statistics (:attr:`api.Kernel.tangent`), laid out as the
forward of :mod:`.pallas_gpu` (whose helpers it uses): one ``pallas_call`` on a ``(B, n_q)``
grid, each program looping over key tiles ``[0, kv_stop[i])`` (causal tiles above the
diagonal skipped as the forward skips them). Per tile, ``p = exp(s - m) / denom`` from the
saved ``m`` and ``denom`` (padded rows: ``m = +inf``, weight 0), ``ds = dq k^T + q dk^T``
(``scale`` is folded into ``q``), and

* ``d_lse += rowsum(p ds)`` (no dropout: the denominator counts every weight),
* ``d_acc += (p keep ds) v + (p keep) dv`` with the in-tile dropout multiplier ``keep``,

then ``d_out = d_acc - d_lse out`` in the kernel. Operands meet in their dtype, accumulating
in float32; ``d_out`` and ``d_lse`` come out in float32 (the forward's statistics dtype).
``"dot"`` only, as the kernel (a concat weight's tangent has nothing to act on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from luong_attention._src.kernels import pallas_common
from luong_attention._src.kernels.api import Operands, RowStats, TileConfig
from luong_attention._src.kernels.pallas_gpu import (
    _call,
    _dot,
    _drop,
    _dropout,
    _f32,
    _padded,
    _tile,
    _tile_scores,
    _weights,
    _whole,
)


def _tangent_kernel(*refs, cfg: TileConfig, has_bias: bool) -> None:
    """One ``(batch, query tile i)``: ``d_out [bq, dvp]`` and ``d_lse [bq]`` over the key
    tiles ``[0, kv_stop[i])``.

    Refs: ``scalars [4]``, ``kv_stop [n_q]``; the tile's ``q [bq, dp]``; ``k [Tv_pad, dp]``,
    ``v [Tv_pad, dvp]`` whole; the tile's ``dq``; ``dk``, ``dv`` whole; the tile's ``m``,
    ``denom [bq]`` and ``out [bq, dvp]``; the bias ``[Tv_pad]`` if any; then the outputs
    ``d_out [bq, dvp]`` and ``d_lse [bq]`` (float32).
    """
    scalars_ref, stop_ref, q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref = refs[:8]
    m_ref, denom_ref, out_ref = refs[8:11]
    bias_ref = refs[11] if has_bias else None
    d_out_ref, d_lse_ref = refs[-2:]
    b, i = pl.program_id(0), pl.program_id(1)
    q, dq, m, denom = q_ref[...], dq_ref[...], m_ref[...], denom_ref[...]

    def body(j, carry):
        d_lse, d_acc = carry
        keys = pl.ds(j * cfg.block_kv, cfg.block_kv)
        k, dk, v, dv = k_ref[keys, :], dk_ref[keys, :], v_ref[keys, :], dv_ref[keys, :]
        s = _tile_scores(cfg, q, k, bias_ref, scalars_ref, i, j)
        p = _weights(s, m, denom)
        p_ds = p * (_dot(dq, k, (1, 1)) + _dot(q, dk, (1, 1)))
        keep = _dropout(cfg, scalars_ref, b, i, j)
        d_acc = d_acc + _dot(_drop(p_ds, keep).astype(v.dtype), v, (1, 0))
        d_acc = d_acc + _dot(_drop(p, keep).astype(dv.dtype), dv, (1, 0))
        return d_lse + p_ds.sum(-1), d_acc

    init = (jnp.zeros(d_lse_ref.shape, jnp.float32), jnp.zeros(d_out_ref.shape, jnp.float32))
    d_lse, d_acc = jax.lax.fori_loop(0, stop_ref[i], body, init)
    d_out_ref[...] = d_acc - d_lse[:, None] * out_ref[...]
    d_lse_ref[...] = d_lse


def tangent(
    cfg: TileConfig,
    ops: Operands,
    stats: RowStats,
    d_ops: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Tangents ``(d_out [B, Tq, dim_v], d_lse [B, Tq])`` (float32) of the output and the
    logsumexp.

    Args:
      cfg, ops, interpret: as :func:`.pallas_gpu.forward`'s.
      stats: the rows' output ``[B, Tq, dim_v]``, final max and denominator ``[B, Tq]``.
      d_ops: tangents ``(dq [B, Tq, depth], dk [B, Tv, depth], dv [B, Tv, dim_v], dweight)``
        of the operands (``dweight`` unused: ``"dot"`` has no concat weight).
    """
    x = _padded(cfg, ops, interpret)
    (batch, tq, dp), (tv, dvp) = x.q.shape, x.v.shape[1:]
    dq, dk, dv, _ = d_ops
    pad = pallas_common.pad_rows
    dq = pad(dq.astype(ops.q.dtype), tq, dp)
    dk, dv = pad(dk.astype(ops.k.dtype), tv, dp), pad(dv.astype(ops.v.dtype), tv, dvp)
    row_stats = (
        pad(stats.m.astype(jnp.float32), tq, fill=jnp.inf),  # padded rows: weight 0
        pad(stats.denom.astype(jnp.float32), tq, fill=1.0),
        pad(stats.out.astype(jnp.float32), tq, dvp),
    )
    bq = cfg.block_q
    d_out, d_lse = _call(
        _tangent_kernel,
        cfg,
        x,
        cfg.n_q,
        [
            _whole(x.kv_stop),
            _tile(x.q, bq),
            *map(_whole, (x.k, x.v)),
            _tile(dq, bq),
            *map(_whole, (dk, dv)),
            *(_tile(a, bq) for a in row_stats),
        ],
        [_tile(_f32(batch, tq, dvp), bq), _tile(_f32(batch, tq), bq)],
        "luong_pallas_gpu_tangent",
    )
    return d_out[:, : cfg.q_length, : ops.v.shape[-1]], d_lse[:, : cfg.q_length]
