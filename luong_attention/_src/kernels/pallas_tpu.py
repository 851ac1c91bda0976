"""The Pallas TPU (Mosaic) kernel: :data:`KERNEL`, ``"dot"`` scores only.

The blocked kernel's maths (:mod:`luong_attention._src.kernels.blocked`, the reference for
every rule below) as three ``pl.pallas_call`` s, FlashAttention style, and a fourth for
forward mode (:mod:`.pallas_tpu_tangent`, laid out as the forward):

* forward, grid ``(B, n_q, n_kv)``: the key axis innermost and ``"arbitrary"``; the running
  max, denominator and unnormalised accumulator live in float32 VMEM scratch across key
  blocks and are written out after the last one (the interface's :class:`SoftmaxState`);
* backward, as jax's TPU flash kernel: a dK/dV kernel over ``(B, n_kv, n_q)`` and a dQ
  kernel over ``(B, n_q, n_kv)``, each recomputing the weights from the rows' final max and
  denominator (given, never recomputed: in ring attention they include other calls' keys).

Masking as the blocked kernel: a masked key gets ``score - MASK_PENALTY``, a padded key a
bias of ``-1e30`` (never counted); the causal mask compares global positions (traced
offsets) and a tile above the diagonal is skipped (no compute, no new DMA: its index map
repeats the previous block) only as :func:`blocked.schedule` allows, i.e. never for a query
block holding a fully masked row. The schedule and offsets reach the kernels as one int32
scalar-prefetch array in SMEM.

TPU layout constraints (Mosaic): the last two dims of every block must be multiples of
``(8, 128)`` or the whole array dim. Hence ``block_q`` is a multiple of 8 (sublanes; the
defaults are multiples of 16, bfloat16's packed tile), ``block_kv`` a multiple of 128 (the
lane axis of the ``[block_q, block_kv]`` score tile and of the key-bias row), depth and
value depth are zero-padded to multiples of 128 lanes (zeros change no dot product),
lengths are padded to whole blocks, and per-row statistics are stored lane-replicated as
``[rows, 128]`` (as jax's kernel does). Statistics must be float32 (no float64 in Mosaic).

``"concat"`` stays with the blocked ``lax`` kernel on TPUs (decided on paper): a 128 x 128 x
128 tile costs 2M tanh (EUP) and 4M adds (VPU), 8 MiB of float32 intermediates, for 64-128
KiB of ``q``/``k``: bound by the EUP's tanh rate (about 1.4 us at an assumed 1024 tanh a
cycle at 1.5 GHz), not by HBM, and the MXU (a kernel's main gain: the same ``"dot"`` tile is
about 20 ns on v5e) cannot help. A kernel would loop over depth slices to fit scoped VMEM
(the backward adds ``1 - tanh**2``) and spend its time where XLA's fused
broadcast-tanh-reduce does. :func:`config` refuses ``"concat"`` (ValueError; the dispatcher
routes it to the blocked kernel). Dropout masks come in-tile from :mod:`.pallas_common`'s
hash (seed: the schedule array's last entry), the same in every kernel, GPU's included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from luong_attention._src.kernels import blocked, pallas_common
from luong_attention._src.kernels.api import Kernel, Operands, RowStats, SoftmaxState, TileConfig
from luong_attention._src.primitives.masks import MASK_PENALTY

LANES = 128  # the minor (lane) tile of a TPU vreg
SUBLANES = 8  # the second-minor (sublane) tile of a float32 vreg
PACKED_SUBLANES = 16  # bfloat16 packs two rows a sublane: default query blocks align to it
# Default tiles: jax's TPU flash kernel uses 128 x 128; larger key blocks mean fewer grid
# steps (each has a fixed pipeline overhead) for a few hundred KiB of VMEM.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 512
# Contract the last dims of both operands: q @ k^T without a transpose.
_NT = (((1,), (1,)), ((), ()))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(
    name: str, block: int | None, length: int, target: int, multiple: int, default_multiple: int
) -> int:
    """A checked block size: ``block`` (capped at ``length`` rounded up) or, for ``None``,
    the smallest multiple of ``default_multiple`` that splits ``length`` in as many blocks as
    ``target`` does (little padding).

    Raises:
      ValueError: for a block that is not ``None`` or a positive multiple of ``multiple``.
    """
    if block is None:
        return _round_up(-(-length // -(-length // target)), default_multiple)
    if not isinstance(block, int) or block < 1 or block % multiple:
        raise ValueError(
            f"{name} must be None or a positive multiple of {multiple} for the pallas_tpu "
            f"kernel (TPU tiles are 8 x 128). Received: {name}={block!r}"
        )
    return min(block, _round_up(length, multiple))


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
    """The tiles of one call: ``block_q`` a multiple of 8, ``block_kv`` of 128.

    Raises:
      ValueError: for ``score_mode="concat"`` (served by the blocked kernel) and for block
        sizes TPUs cannot tile.
    """
    del depth, batch
    if score_mode != "dot":
        raise ValueError(
            "The pallas_tpu kernel computes score_mode='dot' only; 'concat' runs on the "
            f"blocked kernel. Received: score_mode={score_mode!r}"
        )
    return TileConfig(
        score_mode="dot",
        causal=bool(causal),
        block_q=_block("block_q", block_q, q_length, DEFAULT_BLOCK_Q, SUBLANES, PACKED_SUBLANES),
        block_kv=_block("block_kv", block_kv, kv_length, DEFAULT_BLOCK_KV, LANES, LANES),
        q_length=q_length,
        kv_length=kv_length,
        dropout_rate=float(dropout_rate),
    )


# ------------------------------------------------------------------ in-kernel helpers


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated ``[rows, 128]`` statistic tiled to ``[rows, width]``."""
    return jnp.tile(x, (1, width // LANES))


def _visited(sched: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Whether tile ``(i, j)`` is computed: ``j < kv_stop[i]`` (see :func:`_schedule_array`)."""
    return j < sched[2 + i]


def _scores(cfg: TileConfig, sched, q_ref, k_ref, bias_ref, i: jax.Array, j: jax.Array):
    """The masked scores ``[block_q, block_kv]`` (float32) of tile ``(i, j)``.

    ``bias_ref`` (``[1, block_kv]``) holds 0, ``-MASK_PENALTY`` (masked) or ``-PAD_PENALTY``
    (padding); the causal mask lowers an allowed key to ``-MASK_PENALTY``.
    """
    s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
    bias = bias_ref[...]
    if cfg.causal:
        shape = (cfg.block_q, cfg.block_kv)
        rows = sched[0] + i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        cols = sched[1] + j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        bias = jnp.where(cols <= rows, bias, jnp.minimum(bias, -MASK_PENALTY))
    return s + bias


def _dropout(cfg: TileConfig, sched, b, i: jax.Array, j: jax.Array) -> jax.Array | None:
    """``keep / (1 - rate)`` ``[block_q, block_kv]`` of example ``b``'s tile ``(i, j)``, or
    ``None`` (program ids are read at the kernel's top: the interpreter wants them there)."""
    if cfg.dropout_rate == 0.0:
        return None
    shape = (cfg.block_q, cfg.block_kv)
    rows = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = j * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    seed = sched[2 + cfg.n_q + cfg.n_kv]
    return pallas_common.dropout_scale(cfg.dropout_rate, seed, b, rows, cols)


def _forward_kernel(cfg: TileConfig, sched, q_ref, k_ref, v_ref, bias_ref, *refs):
    """One ``(b, i, j)`` step of the online softmax; stores the state after the last ``j``."""
    m_out, l_out, acc_out, m_scr, l_scr, acc_scr = refs
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_visited(sched, i, j))
    def _step():
        s = _scores(cfg, sched, q_ref, k_ref, bias_ref, i, j)
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1)[:, None])  # [block_q, 128]
        p = jnp.exp(s - _lanes(m_next, cfg.block_kv))
        alpha = jnp.exp(m_prev - m_next)  # 0 on a row's first visited tile (m_prev = -inf)
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=1)[:, None]
        m_scr[...] = m_next
        v, keep = v_ref[...], _dropout(cfg, sched, b, i, j)
        p = p if keep is None else p * keep  # the denominator counts every weight
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_scr[...] = _lanes(alpha, acc_scr.shape[-1]) * acc_scr[...] + pv

    @pl.when(j == pl.num_programs(2) - 1)
    def _store():
        m_out[...], l_out[...], acc_out[...] = m_scr[...], l_scr[...], acc_scr[...]


def _weights(cfg: TileConfig, sched, refs, m_ref, il_ref, i: jax.Array, j: jax.Array):
    """``p = exp(s - m) / denom`` ``[block_q, block_kv]`` of tile ``(i, j)`` from ``refs = (q,
    k, bias)`` and the rows' final max and ``1 / denom`` (lane-replicated ``[block_q, 128]``)."""
    s = _scores(cfg, sched, *refs, i, j)
    return jnp.exp(s - _lanes(m_ref[...], cfg.block_kv)) * _lanes(il_ref[...], cfg.block_kv)


def _tile_grads(cfg: TileConfig, sched, refs, b: jax.Array, i: jax.Array, j: jax.Array):
    """Recomputed weights ``p`` (times the dropout multiplier) and score gradients ``ds``
    (``[block_q, block_kv]``, f32).

    ``refs``: ``(q, k, v, bias, d_out, m, inv_denom, delta)``, the statistics
    lane-replicated ``[block_q, 128]``; ``delta = rowsum(d_out * out) - d_lse``.
    """
    q_ref, k_ref, v_ref, bias_ref, do_ref, m_ref, il_ref, delta_ref = refs
    p = _weights(cfg, sched, (q_ref, k_ref, bias_ref), m_ref, il_ref, i, j)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    keep = _dropout(cfg, sched, b, i, j)
    if keep is None:
        return p, p * (dp - _lanes(delta_ref[...], cfg.block_kv))
    return p * keep, p * (dp * keep - _lanes(delta_ref[...], cfg.block_kv))


def _accumulate(sched, i, j, inner, outs, scratch, step: Callable[[], tuple]) -> None:
    """Zero the float32 ``scratch`` at the first step of the inner grid axis, add
    ``step()`` at visited tiles, store into ``outs`` (their dtypes) after the last step."""

    @pl.when(inner == 0)
    def _init():
        for ref in scratch:
            ref[...] = jnp.zeros(ref.shape, jnp.float32)

    @pl.when(_visited(sched, i, j))
    def _step():
        for ref, grad in zip(scratch, step(), strict=True):
            ref[...] += grad

    @pl.when(inner == pl.num_programs(2) - 1)
    def _store():
        for out, ref in zip(outs, scratch, strict=True):
            out[...] = ref[...].astype(out.dtype)


def _dkv_kernel(cfg: TileConfig, sched, *refs):
    """One ``(b, j, i)`` step of dK/dV: ``dk += ds^T q``, ``dv += (p * keep)^T dO``."""
    inputs = refs[:8]
    b, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def step():
        p, ds = _tile_grads(cfg, sched, inputs, b, i, j)
        q, d_out = inputs[0][...], inputs[4][...]
        return (
            jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32),
            jax.lax.dot(p.T.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32),
        )

    _accumulate(sched, i, j, i, refs[8:10], refs[10:], step)


def _dq_kernel(cfg: TileConfig, sched, *refs):
    """One ``(b, i, j)`` step of dQ: ``dq += ds k``."""
    inputs = refs[:8]
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def step():
        _, ds = _tile_grads(cfg, sched, inputs, b, i, j)
        k = inputs[1][...]
        return (jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32),)

    _accumulate(sched, i, j, j, refs[8:9], refs[9:], step)


# ------------------------------------------------------------------ wrappers


def _kv_index(sched: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Key block fetched at step ``(i, j)``: past ``kv_stop[i]``, the last visited one (the
    block already in VMEM, so a skipped tile costs no DMA)."""
    return jnp.maximum(jnp.minimum(j, sched[2 + i] - 1), 0)


def _q_index(cfg: TileConfig, sched: jax.Array, i: jax.Array, j: jax.Array) -> jax.Array:
    """Query block fetched at step ``(j, i)`` of dK/dV: a skipped one is replaced by the next
    query block that visits key block ``j`` (``q_start[j]``), prefetched early."""
    return jnp.where(_visited(sched, i, j), i, jnp.minimum(sched[2 + cfg.n_q + j], cfg.n_q - 1))


def _specs(cfg: TileConfig, kv_major: bool, per_example_bias: bool):
    """Block specs of a grid ``(B, n_q, n_kv)`` or, ``kv_major``, ``(B, n_kv, n_q)``.

    Returns ``rows(width)`` (a ``[block_q, width]`` block of a ``[B, Tq, width]`` array),
    ``keys(width)`` (``[block_kv, width]`` of ``[B, Tv, width]``) and the key bias's spec
    (``[1, block_kv]`` of ``[B or 1, 1, Tv]``).
    """

    def q_block(outer, inner, sched):
        return _q_index(cfg, sched, inner, outer) if kv_major else outer

    def kv_block(outer, inner, sched):
        return outer if kv_major else _kv_index(sched, outer, inner)

    def rows(width: int) -> pl.BlockSpec:
        return pl.BlockSpec(
            (pl.squeezed, cfg.block_q, width), lambda b, o, n, s: (b, q_block(o, n, s), 0)
        )

    def keys(width: int) -> pl.BlockSpec:
        return pl.BlockSpec(
            (pl.squeezed, cfg.block_kv, width), lambda b, o, n, s: (b, kv_block(o, n, s), 0)
        )

    def bias_block(b, o, n, s):
        return (b if per_example_bias else 0, 0, kv_block(o, n, s))

    return rows, keys, pl.BlockSpec((pl.squeezed, 1, cfg.block_kv), bias_block)


def _schedule_array(cfg: TileConfig, ops: Operands) -> jax.Array:
    """int32 ``[3 + n_q + n_kv]``: ``q_offset, kv_offset, kv_stop..., q_start...`` of
    :func:`blocked.schedule` and the dropout seed (or 0): the scalar-prefetch operand (SMEM)."""
    sched = blocked.schedule(cfg, ops.value_mask, ops.offsets)
    seed = jnp.zeros((), jnp.int32) if ops.rng is None else pallas_common.dropout_seed(ops.rng)
    parts = (jnp.stack(ops.offsets), sched.kv_stop, sched.q_start, seed)
    return jnp.concatenate([x.astype(jnp.int32).reshape(-1) for x in parts])


def _lane_rows(x: jax.Array, length: int, fill: float) -> jax.Array:
    """A per-row statistic ``[B, T]`` as ``[B, length, 128]``, lane-replicated."""
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, length - x.shape[1])), constant_values=fill)
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _call(kernel, grid, sched, in_specs, out_specs, out_shape, scratch, args) -> list[jax.Array]:
    """A ``pallas_call`` with the schedule prefetched to SMEM; the innermost grid axis
    carries the scratch accumulators, so it is ``"arbitrary"``."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
    )(sched, *args)


def _inputs(cfg: TileConfig, ops: Operands) -> tuple[list[jax.Array], jax.Array, int, int]:
    """What every kernel starts from: ``[q, k, v, key bias]`` padded to whole blocks and
    128 lanes, the schedule array and the padded widths of ``depth`` and ``dim_v``.

    Raises:
      TypeError: unless the statistics dtype (``ops.weight``'s) is float32.
    """
    if ops.weight.dtype != jnp.float32:
        raise TypeError(
            "The pallas_tpu kernel keeps float32 statistics (Mosaic has no float64). "
            f"Received: statistics dtype {ops.weight.dtype}"
        )
    width, width_v = _round_up(ops.q.shape[-1], LANES), _round_up(ops.v.shape[-1], LANES)
    rows_p, keys_p = cfg.n_q * cfg.block_q, cfg.n_kv * cfg.block_kv
    args = [
        pallas_common.pad_rows(ops.q, rows_p, width),
        pallas_common.pad_rows(ops.k, keys_p, width),
        pallas_common.pad_rows(ops.v, keys_p, width_v),
    ]
    # [B or 1, 1, Tv_pad]: one [1, block_kv] row a step, cheap next to the tile.
    args.append(pallas_common.key_bias(cfg, ops.value_mask, keys_p)[:, None, :])
    return args, _schedule_array(cfg, ops), width, width_v


def forward(cfg: TileConfig, ops: Operands) -> SoftmaxState:
    """The online softmax of every query row over the call's keys (float32 state:
    ``m``, ``denom`` ``[B, Tq]`` and the unnormalised ``acc`` ``[B, Tq, dim_v]``)."""
    args, sched, width, width_v = _inputs(cfg, ops)
    batch, rows_p = ops.q.shape[0], cfg.n_q * cfg.block_q
    rows, keys, bias_spec = _specs(cfg, False, args[3].shape[0] > 1)
    stat = jax.ShapeDtypeStruct((batch, rows_p, LANES), jnp.float32)
    m, denom, acc = _call(
        functools.partial(_forward_kernel, cfg),
        (batch, cfg.n_q, cfg.n_kv),
        sched,
        [rows(width), keys(width), keys(width_v), bias_spec],
        [rows(LANES), rows(LANES), rows(width_v)],
        [stat, stat, jax.ShapeDtypeStruct((batch, rows_p, width_v), jnp.float32)],
        [pltpu.VMEM((cfg.block_q, w), jnp.float32) for w in (LANES, LANES, width_v)],
        args,
    )
    tq, dim_v = cfg.q_length, ops.v.shape[-1]
    return SoftmaxState(m[:, :tq, 0], denom[:, :tq, 0], acc[:, :tq, :dim_v])


def backward(
    cfg: TileConfig, ops: Operands, stats: RowStats, d_out: jax.Array, d_lse: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv, dweight)`` from the rows' final statistics.

    Args:
      cfg, ops: as the forward's.
      stats: the rows' output ``[B, Tq, dim_v]``, final max and denominator ``[B, Tq]``.
      d_out: ``[B, Tq, dim_v]``; d_lse: ``[B, Tq]``, cotangents of output and logsumexp.

    Returns:
      ``dq``, ``dk``, ``dv`` in the operands' dtypes and ``dweight = 0`` (float32).
    """
    args, sched, width, width_v = _inputs(cfg, ops)
    q, k, v = ops.q, ops.k, ops.v
    batch, rows_p, keys_p = q.shape[0], cfg.n_q * cfg.block_q, cfg.n_kv * cfg.block_kv
    # d lse / d s = p, so the lse cotangent enters as a shift of the row term D.
    delta = (d_out.astype(jnp.float32) * stats.out).sum(-1) - d_lse
    # dO meets v and p in the matmuls, in the operand dtype; padded rows: m = +inf, p = 0.
    args += [
        pallas_common.pad_rows(d_out.astype(v.dtype), rows_p, width_v),
        _lane_rows(stats.m, rows_p, jnp.inf),
        _lane_rows(1.0 / stats.denom, rows_p, 1.0),
        _lane_rows(delta, rows_p, 0.0),
    ]

    def call(kv_major: bool, kernel, outputs: list[tuple[int, jnp.dtype]]) -> list[jax.Array]:
        """One backward ``pallas_call``; ``outputs``: ``(width, dtype)`` of each gradient."""
        rows, keys, bias_spec = _specs(cfg, kv_major, args[3].shape[0] > 1)
        if kv_major:
            grid, block, length, spec = (batch, cfg.n_kv, cfg.n_q), cfg.block_kv, keys_p, keys
        else:
            grid, block, length, spec = (batch, cfg.n_q, cfg.n_kv), cfg.block_q, rows_p, rows
        return _call(
            functools.partial(kernel, cfg),
            grid,
            sched,
            [rows(width), keys(width), keys(width_v), bias_spec, rows(width_v)] + [rows(LANES)] * 3,
            [spec(w) for w, _ in outputs],
            [jax.ShapeDtypeStruct((batch, length, w), dtype) for w, dtype in outputs],
            [pltpu.VMEM((block, w), jnp.float32) for w, _ in outputs],
            args,
        )

    dk, dv = call(True, _dkv_kernel, [(width, k.dtype), (width_v, v.dtype)])
    (dq,) = call(False, _dq_kernel, [(width, q.dtype)])
    tq, tv, depth = cfg.q_length, cfg.kv_length, q.shape[-1]
    dv = dv[:, :tv, : v.shape[-1]]
    return dq[:, :tq, :depth], dk[:, :tv, :depth], dv, jnp.zeros((), ops.weight.dtype)


def tangent(cfg: TileConfig, ops: Operands, stats: RowStats, d_ops: tuple):
    """:func:`.pallas_tpu_tangent.tangent`, imported at the first call (it imports us)."""
    from luong_attention._src.kernels import pallas_tpu_tangent

    return pallas_tpu_tangent.tangent(cfg, ops, stats, d_ops)


KERNEL = Kernel(
    name="pallas_tpu",
    config=config,
    forward=forward,
    backward=backward,
    schedule=blocked.schedule,
    dropout_multiplier=pallas_common.dropout_multiplier,
    tangent=tangent,
    differentiable=pallas_common.LAX_TWIN,
)
