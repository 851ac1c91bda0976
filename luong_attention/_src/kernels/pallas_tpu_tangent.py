"""The Pallas TPU (Mosaic) kernel's tangent pass: forward-mode derivatives as one kernel.

The push-forward of tangents ``(dq, dk, dv)`` of the operands to the output and the
logsumexp, given the rows' final statistics (:attr:`api.Kernel.tangent`), laid out as the
forward of :mod:`.pallas_tpu` (whose helpers it uses): grid ``(B, n_q, n_kv)``, the key
axis innermost and ``"arbitrary"``, float32 VMEM accumulators across key blocks, tiles
above the causal diagonal skipped as the forward skips them (no compute, no new DMA). Per
tile, ``p = exp(s - m) / denom`` from the saved ``m`` and ``denom`` (padded rows: ``m =
+inf``, weight 0), ``ds = dq k^T + q dk^T`` (``scale`` is folded into ``q``), and

* ``d_lse += rowsum(p ds)`` (no dropout: the denominator counts every weight), stored
  lane-replicated ``[block_q, 128]``;
* ``d_acc += (p keep ds) v + (p keep) dv`` with the in-tile dropout multiplier ``keep``.

XLA then forms ``d_out = d_acc - d_lse out`` (elementwise). Operands meet in their dtype,
accumulating in float32; ``d_out`` and ``d_lse`` are float32. ``"dot"`` only, as the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from luong_attention._src.kernels import pallas_common
from luong_attention._src.kernels.api import Operands, RowStats, TileConfig
from luong_attention._src.kernels.pallas_tpu import (
    _NT,
    LANES,
    _accumulate,
    _call,
    _dropout,
    _inputs,
    _lane_rows,
    _specs,
    _weights,
)


def _tangent_kernel(cfg: TileConfig, sched, *refs):
    """One ``(b, i, j)`` step: ``d_acc += (p keep ds) v + (p keep) dv``, ``d_lse +=
    rowsum(p ds)``.

    Refs: ``q``, ``k``, ``v``, the bias, ``dq``, ``dk``, ``dv`` (blocks as the forward's),
    ``m`` and ``1 / denom`` (lane-replicated ``[block_q, 128]``); the outputs ``d_acc
    [block_q, dvp]``, ``d_lse [block_q, 128]``; their float32 scratch.
    """
    q_ref, k_ref, v_ref, bias_ref, dq_ref, dk_ref, dv_ref, m_ref, il_ref = refs[:9]
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def step():
        p = _weights(cfg, sched, (q_ref, k_ref, bias_ref), m_ref, il_ref, i, j)
        ds = jax.lax.dot_general(dq_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
        ds += jax.lax.dot_general(q_ref[...], dk_ref[...], _NT, preferred_element_type=jnp.float32)
        p_ds = p * ds
        d_lse = jnp.broadcast_to(p_ds.sum(axis=1)[:, None], (cfg.block_q, LANES))
        keep = _dropout(cfg, sched, b, i, j)
        if keep is not None:
            p, p_ds = p * keep, p_ds * keep
        v, dv = v_ref[...], dv_ref[...]
        d_acc = jax.lax.dot(p_ds.astype(v.dtype), v, preferred_element_type=jnp.float32)
        d_acc += jax.lax.dot(p.astype(dv.dtype), dv, preferred_element_type=jnp.float32)
        return d_acc, d_lse

    _accumulate(sched, i, j, j, refs[9:11], refs[11:], step)


def tangent(
    cfg: TileConfig,
    ops: Operands,
    stats: RowStats,
    d_ops: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Tangents ``(d_out [B, Tq, dim_v], d_lse [B, Tq])`` (float32) of the output and the
    logsumexp.

    Args:
      cfg, ops: as :func:`.pallas_tpu.forward`'s.
      stats: the rows' output ``[B, Tq, dim_v]``, final max and denominator ``[B, Tq]``.
      d_ops: tangents ``(dq [B, Tq, depth], dk [B, Tv, depth], dv [B, Tv, dim_v], dweight)``
        of the operands (``dweight`` unused: ``"dot"`` has no concat weight).
    """
    args, sched, width, width_v = _inputs(cfg, ops)
    dq, dk, dv, _ = d_ops
    batch, rows_p, keys_p = ops.q.shape[0], cfg.n_q * cfg.block_q, cfg.n_kv * cfg.block_kv
    pad = pallas_common.pad_rows
    args += [
        pad(dq.astype(ops.q.dtype), rows_p, width),
        pad(dk.astype(ops.k.dtype), keys_p, width),
        pad(dv.astype(ops.v.dtype), keys_p, width_v),
        _lane_rows(stats.m, rows_p, jnp.inf),  # padded rows: weight 0
        _lane_rows(1.0 / stats.denom, rows_p, 1.0),
    ]
    rows, keys, bias_spec = _specs(cfg, False, args[3].shape[0] > 1)
    operands = [rows(width), keys(width), keys(width_v)]  # q, k, v; then dq, dk, dv
    d_acc, d_lse = _call(
        functools.partial(_tangent_kernel, cfg),
        (batch, cfg.n_q, cfg.n_kv),
        sched,
        [*operands, bias_spec, *operands, rows(LANES), rows(LANES)],
        [rows(width_v), rows(LANES)],
        [jax.ShapeDtypeStruct((batch, rows_p, w), jnp.float32) for w in (width_v, LANES)],
        [pltpu.VMEM((cfg.block_q, w), jnp.float32) for w in (width_v, LANES)],
        args,
    )
    d_lse = d_lse[:, : cfg.q_length, 0]
    d_acc = d_acc[:, : cfg.q_length, : ops.v.shape[-1]]
    return d_acc - d_lse[..., None] * stats.out.astype(jnp.float32), d_lse
