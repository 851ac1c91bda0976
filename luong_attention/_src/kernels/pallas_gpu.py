"""The Pallas GPU kernel (Triton backend): :data:`KERNEL` and :data:`INTERPRET_KERNEL`.

FlashAttention-2 behind the kernel interface (:mod:`luong_attention._src.kernels.api`) for
``score_mode="dot"``, with the blocked kernel's semantics and tile schedule
(:mod:`.blocked`): ``scale`` folded into the query by the caller, masked keys at ``score -
MASK_PENALTY``, padded keys excluded by a ``-1e30`` bias, the causal mask on global positions,
causal tiles above the diagonal skipped unless their query block holds a fully masked row,
float32 softmax statistics for float32, bfloat16 and float16 operands. Three
``pallas_call``\\ s, each given ``plgpu.CompilerParams`` (which selects Triton over Mosaic GPU):
forward on a ``(B, n_q)`` grid (a loop over key tiles, online softmax, the unnormalised
state out); dK/dV on ``(B, n_kv)`` (a loop over the query tiles that see the key tile); dQ
on ``(B, n_q)``. Both recompute ``p = exp(s - m) / denom`` from the rows' final statistics,
with ``delta = rowsum(d_out * out) - d_lse`` computed by XLA. Forward mode has a fourth, laid
out as the forward: the tangent pass of :mod:`.pallas_gpu_tangent`.

Triton wants power-of-two tiles of at least 16 rows for ``dot``: blocks are powers of two
>= 16 and depths are zero-padded to one (zero features change no score). float32 operands
multiply at full precision (Triton ``ieee``, not TF32), as the blocked kernel; bfloat16 and
float16 ones natively, accumulating in float32.

``"concat"`` stays on the blocked kernel, on paper: its ``[block_q, block_kv, depth]`` tanh
tile (1 MiB of float32 at 64 x 64 x 64) exceeds an SM's registers and shared memory, and
costs ``depth / 16`` clocks per score on the special-function units (16 tanh per clock per
SM): fusing the forward saves at most some 10% over XLA (the backward maybe more; it wants
a GPU to measure). :func:`config` refuses it. Dropout masks come in-tile from
:mod:`.pallas_common`'s hash: the same in forward, backward and the TPU kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from luong_attention._src.kernels import pallas_common
from luong_attention._src.kernels.api import Kernel, Operands, RowStats, SoftmaxState, TileConfig
from luong_attention._src.kernels.blocked import schedule
from luong_attention._src.primitives.masks import MASK_PENALTY

# Triton's dot needs at least 16 along each axis; tiles are powers of two.
_MIN_TILE = 16
# Default tiles 64 x 64 with 4 warps: a [64, 64] float32 score tile and [64, depth] operand
# tiles fit registers and shared memory for depths up to 128 (as jax's Triton attention).
DEFAULT_BLOCK = 64
_NUM_STAGES = 2
_HIGHEST = jax.lax.Precision.HIGHEST
_OPERAND_DTYPES = ("float32", "bfloat16", "float16")


def _padded_pow2(length: int) -> int:
    """The smallest power of two ``>= max(length, 16)``."""
    return max(_MIN_TILE, pl.next_power_of_2(length))


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
    """The tiles of one call: :data:`DEFAULT_BLOCK` rows, at most the lengths rounded up
    to a power of two (>= 16).

    Raises:
      ValueError: for ``"concat"`` (not in this kernel), or a block size that is not a
        power of two >= 16 (the smallest tile Triton's ``dot`` takes).
    """
    del depth, batch  # The defaults depend on neither.
    if score_mode != "dot":
        raise ValueError(
            "The Pallas GPU kernel computes score_mode='dot' only ('concat' runs on the "
            f"blocked kernel). Received: score_mode={score_mode!r}"
        )
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        fits = isinstance(block, int) and block >= _MIN_TILE and block & (block - 1) == 0
        if block is not None and not fits:
            raise ValueError(
                f"{name} must be a power of two >= {_MIN_TILE} (Triton tiles) or None. "
                f"Received: {name}={block!r}"
            )
    return TileConfig(
        score_mode="dot",
        causal=bool(causal),
        block_q=min(block_q or DEFAULT_BLOCK, _padded_pow2(q_length)),
        block_kv=min(block_kv or DEFAULT_BLOCK, _padded_pow2(kv_length)),
        q_length=q_length,
        kv_length=kv_length,
        dropout_rate=float(dropout_rate),
    )


def _key_bias(cfg: TileConfig, value_mask: jax.Array | None, kv_padded: int) -> jax.Array | None:
    """:func:`pallas_common.key_bias`, or ``None`` when every score is left as it is."""
    if value_mask is None and not cfg.causal and kv_padded == cfg.kv_length:
        return None
    return pallas_common.key_bias(cfg, value_mask, kv_padded)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting ``a``'s and ``b``'s given axes, accumulated in float32;
    ``HIGHEST``: float32 operands in full precision (Triton ``ieee``, not TF32)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _tile_scores(
    cfg: TileConfig, q: jax.Array, k: jax.Array, bias_ref, scalars_ref, i: jax.Array, j: jax.Array
) -> jax.Array:
    """The masked scores ``[bq, bk]`` of tile ``(i, j)`` from ``q [bq, dp]``, ``k [bk, dp]``.

    A key the causal mask hides gets ``min(bias, -MASK_PENALTY)``: ``-MASK_PENALTY`` for a
    real key, still ``-PAD_PENALTY`` for padding.
    """
    s = _dot(q, k, (1, 1))
    if bias_ref is None:
        return s
    bias = bias_ref[pl.ds(j * cfg.block_kv, cfg.block_kv)][None, :]
    if cfg.causal:
        rows = scalars_ref[0] + i * cfg.block_q + jnp.arange(cfg.block_q)
        cols = scalars_ref[1] + j * cfg.block_kv + jnp.arange(cfg.block_kv)
        hidden = jnp.minimum(bias, -MASK_PENALTY)
        bias = jnp.where(cols[None, :] <= rows[:, None], bias, hidden)
    return s + bias


def _dropout(cfg: TileConfig, scalars_ref, b, i: jax.Array, j: jax.Array) -> jax.Array | None:
    """``keep / (1 - rate)`` ``[bq, bk]`` of example ``b``'s tile ``(i, j)``, or ``None``."""
    if cfg.dropout_rate == 0.0:
        return None
    rows = i * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32)[:, None]
    cols = j * cfg.block_kv + jnp.arange(cfg.block_kv, dtype=jnp.int32)[None, :]
    return pallas_common.dropout_scale(cfg.dropout_rate, scalars_ref[3], b, rows, cols)


def _drop(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """``x * keep`` (``[bq, bk]``): the forward's weights, the backward's ``dp``."""
    return x if keep is None else x * keep


def _forward_kernel(*refs, cfg: TileConfig, has_bias: bool) -> None:
    """One ``(batch, query tile)``: the online softmax over key tiles ``[0, kv_stop[i])``.

    Refs: ``scalars [4]`` (see :class:`_Padded`), ``kv_stop [n_q]``, ``q [bq, dp]``,
    ``k [Tv_pad, dp]``, ``v [Tv_pad, dvp]``, the bias ``[Tv_pad]`` if any; then the outputs
    ``m``, ``denom [bq]`` and ``acc [bq, dvp]`` (float32).
    """
    scalars_ref, stop_ref, q_ref, k_ref, v_ref = refs[:5]
    bias_ref = refs[5] if has_bias else None
    m_ref, denom_ref, acc_ref = refs[-3:]
    b, i = pl.program_id(0), pl.program_id(1)
    q = q_ref[...]

    def body(j, carry):
        m, denom, acc = carry
        keys = pl.ds(j * cfg.block_kv, cfg.block_kv)
        s = _tile_scores(cfg, q, k_ref[keys, :], bias_ref, scalars_ref, i, j)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        v, keep = v_ref[keys, :], _dropout(cfg, scalars_ref, b, i, j)
        pv = _dot(_drop(p, keep).astype(v.dtype), v, (1, 0))
        return m_new, alpha * denom + p.sum(-1), alpha[:, None] * acc + pv

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    init = (zero - jnp.inf, zero, jnp.zeros(acc_ref.shape, jnp.float32))
    m, denom, acc = jax.lax.fori_loop(0, stop_ref[i], body, init)
    m_ref[...], denom_ref[...], acc_ref[...] = m, denom, acc


def _tile(a: jax.Array | jax.ShapeDtypeStruct, block: int) -> tuple:
    """``(a, spec)``: tile ``t`` (``block`` rows) of batch ``b`` of ``a [B, T(, D)]`` on the
    ``(b, t)`` grid."""
    rest = (0,) * (len(a.shape) - 2)
    return a, pl.BlockSpec((None, block, *a.shape[2:]), lambda b, t: (b, t, *rest))


def _whole(a: jax.Array) -> tuple:
    """``(a, spec)``: all of batch ``b`` of ``a [B, T(, D)]``, or all of a 1-D ``a``
    (offsets, schedule: read by scalar loads)."""
    if a.ndim == 1:
        return a, pl.BlockSpec(a.shape, lambda b, t: (0,))
    rest = (0,) * (a.ndim - 1)
    return a, pl.BlockSpec((None, *a.shape[1:]), lambda b, t: (b, *rest))


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    """A float32 output of ``shape``."""
    return jax.ShapeDtypeStruct(shape, jnp.float32)


class _Padded(NamedTuple):
    """The operands as the kernels read them: padded to whole tiles and power-of-two depths.

    Attributes:
      q: ``[B, Tq_pad, dp]``; k: ``[B, Tv_pad, dp]``; v: ``[B, Tv_pad, dvp]``.
      bias: ``[B or 1, Tv_pad]`` float32 key bias or ``None`` (see :func:`_key_bias`).
      scalars: int32 ``[4]``: the query and key offsets, ``n_full``, the dropout seed (or 0).
      kv_stop: int32 ``[n_q]``; q_start: int32 ``[n_kv]`` (with ``n_full``, the blocked
        kernel's :func:`~.blocked.schedule`).
      interpret: run the kernels in the Pallas interpreter instead of compiling them.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    scalars: jax.Array
    kv_stop: jax.Array
    q_start: jax.Array
    interpret: bool


def _padded(cfg: TileConfig, ops: Operands, interpret: bool) -> _Padded:
    """Pads and schedules ``ops`` for the kernels (see :class:`_Padded`).

    Raises:
      TypeError: for operands Triton's dot does not take here (e.g. float64).
    """
    for name, x in (("query", ops.q), ("key", ops.k), ("value", ops.v)):
        if jnp.dtype(x.dtype).name not in _OPERAND_DTYPES:
            raise TypeError(
                f"The Pallas GPU kernel takes {_OPERAND_DTYPES}. Got {name}.dtype={x.dtype}"
            )
    tq, tv = cfg.n_q * cfg.block_q, cfg.n_kv * cfg.block_kv
    dp, dvp = _padded_pow2(ops.q.shape[-1]), _padded_pow2(ops.v.shape[-1])
    sched = schedule(cfg, ops.value_mask, ops.offsets)
    seed = 0 if ops.rng is None else pallas_common.dropout_seed(ops.rng)
    return _Padded(
        q=pallas_common.pad_rows(ops.q, tq, dp),
        k=pallas_common.pad_rows(ops.k, tv, dp),
        v=pallas_common.pad_rows(ops.v, tv, dvp),
        bias=_key_bias(cfg, ops.value_mask, tv),
        scalars=jnp.stack([*ops.offsets, sched.n_full, seed]).astype(jnp.int32),
        kv_stop=sched.kv_stop.astype(jnp.int32),
        q_start=sched.q_start.astype(jnp.int32),
        interpret=interpret,
    )


def _call(
    kernel, cfg: TileConfig, x: _Padded, tiles: int, inputs: list, outputs: list, name: str
) -> list[jax.Array]:
    """``pl.pallas_call`` of ``kernel`` on the ``(B, tiles)`` grid with Triton settings.

    ``inputs`` and ``outputs`` are ``(array or ShapeDtypeStruct, BlockSpec)`` pairs; the
    kernel gets ``x.scalars`` first and the bias (row ``b``, or row 0 of a shared one) last.
    """
    inputs = [_whole(x.scalars), *inputs]
    warps = 4 if cfg.block_q * cfg.block_kv <= 64 * 64 else 8
    if x.bias is not None:
        shared = x.bias.shape[0] == 1
        spec = pl.BlockSpec((None, x.bias.shape[1]), lambda b, t: (0 if shared else b, 0))
        inputs.append((x.bias, spec))
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, has_bias=x.bias is not None),
        grid=(x.q.shape[0], tiles),
        in_specs=[spec for _, spec in inputs],
        out_specs=[spec for _, spec in outputs],
        out_shape=[shape for shape, _ in outputs],
        # Triton (not Mosaic GPU): 4 warps for tiles up to 64 x 64, 8 above.
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=_NUM_STAGES),
        interpret=x.interpret,
        name=name,
    )(*(array for array, _ in inputs))


def forward(cfg: TileConfig, ops: Operands, *, interpret: bool = False) -> SoftmaxState:
    """The online-softmax state of every query row: ``m``, ``denom`` ``[B, Tq]`` and the
    unnormalised ``acc`` ``[B, Tq, dim_v]``, float32. ``interpret``: run in the Pallas
    interpreter (CPUs, tests) instead of compiling with Triton.
    """
    x = _padded(cfg, ops, interpret)
    (batch, tq, _), bq = x.q.shape, cfg.block_q
    m, denom, acc = _call(
        _forward_kernel,
        cfg,
        x,
        cfg.n_q,
        [_whole(x.kv_stop), _tile(x.q, bq), _whole(x.k), _whole(x.v)],
        [
            _tile(_f32(batch, tq), bq),
            _tile(_f32(batch, tq), bq),
            _tile(_f32(batch, tq, x.v.shape[-1]), bq),
        ],
        "luong_pallas_gpu_forward",
    )
    n, dim_v = cfg.q_length, ops.v.shape[-1]
    return SoftmaxState(m[:, :n], denom[:, :n], acc[:, :n, :dim_v])


def _weights(s: jax.Array, m: jax.Array, denom: jax.Array) -> jax.Array:
    """``p = exp(s - m) / denom`` ``[bq, bk]`` from the rows' final statistics ``[bq]``."""
    return jnp.exp(s - m[:, None]) * (1.0 / denom)[:, None]


def _dkdv_kernel(*refs, cfg: TileConfig, has_bias: bool) -> None:
    """One ``(batch, key tile j)``: ``dk``, ``dv`` ``[bk, dp/dvp]`` summed over the query
    tiles that see it, ``[0, min(n_full, q_start[j]))`` and ``[q_start[j], n_q)``.

    Refs: ``scalars``, ``q_start [n_kv]``; ``q [Tq_pad, dp]``; the tile's ``k``
    and ``v``; ``do [Tq_pad, dvp]``, ``m``, ``denom``, ``delta [Tq_pad]``; the bias if any;
    then the outputs ``dk``, ``dv``.
    """
    scalars_ref, q_start_ref, q_ref, k_ref, v_ref, do_ref, m_ref, denom_ref, delta_ref = refs[:9]
    bias_ref = refs[9] if has_bias else None
    dk_ref, dv_ref = refs[-2:]
    b, j = pl.program_id(0), pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    start = q_start_ref[j]
    head = jnp.minimum(scalars_ref[2], start)

    def body(t, carry):
        dk, dv = carry
        i = jnp.where(t < head, t, start + t - head)
        rows = pl.ds(i * cfg.block_q, cfg.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _tile_scores(cfg, q, k, bias_ref, scalars_ref, i, j)
        p, keep = _weights(s, m_ref[rows], denom_ref[rows]), _dropout(cfg, scalars_ref, b, i, j)
        dv = dv + _dot(_drop(p, keep).astype(do.dtype), do, (0, 0))
        ds = p * (_drop(_dot(do, v, (1, 1)), keep) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, head + cfg.n_q - start, body, init)
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: TileConfig, has_bias: bool) -> None:
    """One ``(batch, query tile i)``: ``dq [bq, dp]`` summed over key tiles ``[0, kv_stop[i])``.

    Refs: ``scalars``, ``kv_stop [n_q]``; the tile's ``q``; ``k``, ``v`` whole; the tile's
    ``do``, ``m``, ``denom``, ``delta``; the bias if any; then the output ``dq``.
    """
    scalars_ref, stop_ref, q_ref, k_ref, v_ref, do_ref, m_ref, denom_ref, delta_ref = refs[:9]
    bias_ref = refs[9] if has_bias else None
    dq_ref = refs[-1]
    b, i = pl.program_id(0), pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    m, denom, delta = m_ref[...], denom_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * cfg.block_kv, cfg.block_kv)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = _weights(_tile_scores(cfg, q, k, bias_ref, scalars_ref, i, j), m, denom)
        dp = _drop(_dot(do, v, (1, 1)), _dropout(cfg, scalars_ref, b, i, j))
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = jax.lax.fori_loop(0, stop_ref[i], body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def backward(
    cfg: TileConfig,
    ops: Operands,
    stats: RowStats,
    d_out: jax.Array,
    d_lse: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv, dweight)`` from the rows' final statistics (FlashAttention-2).

    ``cfg``, ``ops``, ``interpret`` as the forward's; ``stats``: the rows' output ``[B, Tq,
    dim_v]``, final max and denominator ``[B, Tq]``; ``d_out [B, Tq, dim_v]`` and ``d_lse
    [B, Tq]``: the cotangents. ``dq``, ``dk``, ``dv`` come in the operands' dtypes
    (accumulated in float32), ``dweight`` is 0 (``"dot"`` has no concat weight).
    """
    x = _padded(cfg, ops, interpret)
    tq, dvp = x.q.shape[1], x.v.shape[-1]
    # d lse / d s = p, so the lse cotangent enters as a shift of the usual row term.
    delta = (d_out.astype(jnp.float32) * stats.out.astype(jnp.float32)).sum(-1) - d_lse
    row_stats = (  # padded rows: m = +inf, weight 0
        pallas_common.pad_rows(stats.m.astype(jnp.float32), tq, fill=jnp.inf),
        pallas_common.pad_rows(stats.denom.astype(jnp.float32), tq, fill=1.0),
        pallas_common.pad_rows(delta.astype(jnp.float32), tq),
    )
    # dO meets v and p in the matmuls: in the operand dtype, as the inputs.
    do = pallas_common.pad_rows(d_out.astype(ops.v.dtype), tq, dvp)
    bq, bk = cfg.block_q, cfg.block_kv
    dk, dv = _call(
        _dkdv_kernel,
        cfg,
        x,
        cfg.n_kv,
        [
            *map(_whole, (x.q_start, x.q)),
            *(_tile(a, bk) for a in (x.k, x.v)),
            *map(_whole, (do, *row_stats)),
        ],
        [_tile(jax.ShapeDtypeStruct(a.shape, a.dtype), bk) for a in (x.k, x.v)],
        "luong_pallas_gpu_dkdv",
    )
    (dq,) = _call(
        _dq_kernel,
        cfg,
        x,
        cfg.n_q,
        [
            _whole(x.kv_stop),
            _tile(x.q, bq),
            *map(_whole, (x.k, x.v)),
            *(_tile(a, bq) for a in (do, *row_stats)),
        ],
        [_tile(jax.ShapeDtypeStruct(x.q.shape, x.q.dtype), bq)],
        "luong_pallas_gpu_dq",
    )
    depth, dim_v = ops.q.shape[-1], ops.v.shape[-1]
    return (
        dq[:, : cfg.q_length, :depth],
        dk[:, : cfg.kv_length, :depth],
        dv[:, : cfg.kv_length, :dim_v],
        jnp.zeros((), ops.weight.dtype),
    )


def tangent(cfg: TileConfig, ops: Operands, stats: RowStats, d_ops: tuple, *, interpret=False):
    """:func:`.pallas_gpu_tangent.tangent`, imported at the first call (it imports us)."""
    from luong_attention._src.kernels import pallas_gpu_tangent

    return pallas_gpu_tangent.tangent(cfg, ops, stats, d_ops, interpret=interpret)


KERNEL = Kernel(
    name="pallas_gpu",
    config=config,
    forward=forward,
    backward=backward,
    schedule=schedule,
    dropout_multiplier=pallas_common.dropout_multiplier,
    tangent=tangent,
    differentiable=pallas_common.LAX_TWIN,
)
"""The Triton kernel, compiled (GPUs; from a CPU it can be lowered, not run)."""

INTERPRET_KERNEL = KERNEL._replace(
    name="pallas_gpu_interpret",
    forward=functools.partial(forward, interpret=True),
    backward=functools.partial(backward, interpret=True),
    tangent=functools.partial(tangent, interpret=True),
)
"""The same kernel in the Pallas interpreter: runs anywhere (CPUs, tests), slowly."""
