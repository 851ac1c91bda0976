"""The Pallas GPU kernel (Triton backend): :data:`KERNEL` and :data:`INTERPRET_KERNEL`.

FlashAttention-2 on the kernel interface (:mod:`luong_attention._src.kernels.api`), for
``score_mode="dot"``, with the blocked kernel's semantics (:mod:`.blocked`): Keras scores
(``scale`` folded into the query by the caller), masked keys at ``score - MASK_PENALTY``,
padded keys excluded by a ``-1e30`` bias, the causal mask on global positions
(``q_offset``/``kv_offset``), the blocked kernel's tile schedule (a causal tile above the
diagonal is skipped unless its query block holds a fully masked row), and float32 softmax
statistics for float32, bfloat16 and float16 operands.

Three ``pallas_call``\\ s, each with ``plgpu.CompilerParams`` (which selects Triton; without
it Pallas lowers to Mosaic GPU):

* forward, grid ``(B, n_q)``: one query tile in registers, a loop over its key tiles with
  the online softmax; writes the unnormalised state (``m``, ``denom``, ``acc``);
* dK/dV, grid ``(B, n_kv)``: one key tile, a loop over the query tiles that see it;
* dQ, grid ``(B, n_q)``: one query tile, a loop over its key tiles.

Both backward kernels recompute ``p = exp(s - m) / denom`` from the rows' final statistics
and use ``delta = rowsum(d_out * out) - d_lse`` (computed by XLA in the wrapper).

Triton wants power-of-two tiles and ``dot`` operands of at least 16 along every axis, so
blocks are powers of two >= 16 and the depths are zero-padded to a power of two >= 16
(zero features change no dot score and no output). float32 operands multiply at full
float32 precision (Triton ``ieee``, not TF32), so the kernel matches the blocked kernel to
float32 rounding; bfloat16/float16 operands multiply natively, accumulating in float32.

``"concat"`` is not in this kernel; the blocked kernel serves it on GPUs. On paper: its
score ``w * sum_d tanh(q_d + k_d)`` needs a ``[block_q, block_kv, depth]`` tile of
``tanh``; at 64 x 64 x 64 that is 256 Ki float32 values (1 MiB), four times an SM's
register file (64 Ki 32-bit registers, 256 KiB) and more than its shared memory (up to
228 KiB on H100/H200), so it would have to be walked one depth column at a time (strided
``[block, 1]`` loads, ``depth`` passes over the ``[block_q, block_kv]`` tile). Either way
the tile costs ``block_q * block_kv * depth`` ``tanh`` on the special-function units
(16 per clock per SM) against the same count of multiply-adds on the tensor cores (about
1000 per clock per SM): the forward is bound by ``tanh`` throughput, about ``depth / 16``
clocks per score per SM, against well under one clock per score to move a float32 score
tile through HBM, so fusing the forward would save at most some 10% over the blocked
kernel under XLA. Fusion could pay in the backward (the blocked kernel stores the ``tanh``
tile once per tile), but that needs the depth-column loop above and a measurement on a GPU.
``config`` therefore refuses ``"concat"``, and the dispatch routes it to the blocked kernel.

Dropout is not implemented yet: ``config`` refuses ``dropout_rate > 0``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from luong_attention._src.kernels.api import Kernel, Operands, RowStats, SoftmaxState, TileConfig
from luong_attention._src.kernels.blocked import schedule
from luong_attention._src.primitives.masks import MASK_PENALTY

# Padded keys get this bias: far below a penalised score (about -1e9), still finite in f32.
_PAD_PENALTY = 1.0e30
# Triton's dot needs at least 16 along each axis; tiles are powers of two.
_MIN_TILE = 16
# Default tiles: 64 x 64 (64 rows a warp group's worth of MMA work with 4 warps, a
# [64, 64] float32 score tile and [64, depth] operand tiles well inside registers and
# shared memory for depths up to 128). Larger tiles take 8 warps.
DEFAULT_BLOCK = 64
_NUM_STAGES = 2
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
      ValueError: for ``"concat"`` or ``dropout_rate > 0`` (not in this kernel), or a block
        size that is not a power of two >= 16.
    """
    del depth, batch  # The defaults depend on neither.
    if score_mode != "dot":
        raise ValueError(
            "The Pallas GPU kernel computes score_mode='dot' only; 'concat' runs on the "
            f"blocked kernel. Received: score_mode={score_mode!r}"
        )
    if dropout_rate > 0.0:
        raise ValueError(
            "The Pallas GPU kernel has no dropout yet. Received: "
            f"dropout_rate={dropout_rate}; use the blocked or xla implementation."
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
        dropout_rate=0.0,
    )


def dropout_multiplier(cfg: TileConfig, rng: jax.Array, batch: int) -> jax.Array:
    """Not available: :func:`config` refuses dropout, so no call draws a mask."""
    del rng, batch
    raise ValueError(
        f"The Pallas GPU kernel has no dropout yet. Received: dropout_rate={cfg.dropout_rate}"
    )


def _compiler_params(cfg: TileConfig) -> plgpu.CompilerParams:
    """Triton settings: 4 warps for tiles up to 64 x 64, 8 above."""
    warps = 4 if cfg.block_q * cfg.block_kv <= 64 * 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=_NUM_STAGES)


def _pad(x: jax.Array, length: int, depth: int | None = None, fill: float = 0.0) -> jax.Array:
    """``[B, T(, D)]`` zero- (or ``fill``-) padded to ``[B, length(, depth)]``."""
    pad = [(0, 0), (0, length - x.shape[1])]
    if depth is not None:
        pad.append((0, depth - x.shape[2]))
    return jnp.pad(x, pad, constant_values=fill)


def _key_bias(cfg: TileConfig, value_mask: jax.Array | None, kv_padded: int) -> jax.Array | None:
    """``[B or 1, kv_padded]`` float32 key bias: 0 (attend), ``-MASK_PENALTY`` (masked) or
    ``-_PAD_PENALTY`` (padding); ``None`` when every score is left as it is."""
    if value_mask is None and not cfg.causal and kv_padded == cfg.kv_length:
        return None
    vmask = jnp.ones((1, cfg.kv_length), bool) if value_mask is None else value_mask
    bias = jnp.where(vmask, 0.0, -MASK_PENALTY).astype(jnp.float32)
    return _pad(bias, kv_padded, fill=-_PAD_PENALTY)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul contracting ``a``'s and ``b``'s given axes, accumulated in float32.

    ``HIGHEST`` makes float32 operands multiply in full precision (Triton ``ieee``);
    bfloat16/float16 operands multiply natively.
    """
    return jax.lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def _tile_scores(
    cfg: TileConfig, q: jax.Array, k: jax.Array, bias_ref, offs_ref, i: jax.Array, j: jax.Array
) -> jax.Array:
    """The masked scores ``[bq, bk]`` of tile ``(i, j)`` from ``q [bq, dp]``, ``k [bk, dp]``.

    A key the causal mask hides gets ``min(bias, -MASK_PENALTY)``: ``-MASK_PENALTY`` for a
    real key, still ``-_PAD_PENALTY`` for padding.
    """
    s = _dot(q, k, (1, 1))
    if bias_ref is None:
        return s
    bias = bias_ref[pl.ds(j * cfg.block_kv, cfg.block_kv)][None, :]
    if cfg.causal:
        rows = offs_ref[0] + i * cfg.block_q + jnp.arange(cfg.block_q)
        cols = offs_ref[1] + j * cfg.block_kv + jnp.arange(cfg.block_kv)
        hidden = jnp.minimum(bias, -MASK_PENALTY)
        bias = jnp.where(cols[None, :] <= rows[:, None], bias, hidden)
    return s + bias


def _forward_kernel(
    offs_ref, stop_ref, q_ref, k_ref, v_ref, *refs, cfg: TileConfig, has_bias: bool
) -> None:
    """One ``(batch, query tile)``: the online softmax over key tiles ``[0, kv_stop[i])``.

    Refs: ``offs [2]`` (q/kv offsets), ``stop [n_q]``, ``q [bq, dp]``, ``k [Tv_pad, dp]``,
    ``v [Tv_pad, dvp]``, optionally ``bias [Tv_pad]``; outputs ``m``, ``denom [bq]`` and
    ``acc [bq, dvp]`` (float32).
    """
    bias_ref = refs[0] if has_bias else None
    m_ref, denom_ref, acc_ref = refs[-3:]
    i = pl.program_id(1)
    q = q_ref[...]

    def body(j, carry):
        m, denom, acc = carry
        keys = pl.ds(j * cfg.block_kv, cfg.block_kv)
        s = _tile_scores(cfg, q, k_ref[keys, :], bias_ref, offs_ref, i, j)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0))
        return m_new, alpha * denom + p.sum(-1), acc

    init = (
        jnp.full((cfg.block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((cfg.block_q,), jnp.float32),
        jnp.zeros(acc_ref.shape, jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, stop_ref[i], body, init)
    m_ref[...], denom_ref[...], acc_ref[...] = m, denom, acc


def _check_operands(ops: Operands) -> None:
    """Raises ``TypeError`` for operand dtypes Triton's dot does not take here."""
    for name, x in (("query", ops.q), ("key", ops.k), ("value", ops.v)):
        if jnp.dtype(x.dtype).name not in _OPERAND_DTYPES:
            raise TypeError(
                f"The Pallas GPU kernel multiplies float32, bfloat16 or float16 operands. "
                f"Received: {name}.dtype={x.dtype}"
            )


def _spec(block: tuple[int | None, ...], whole: bool = False) -> pl.BlockSpec:
    """A spec on the ``(batch, tile)`` grid of ``[B, T(, D)]``: block ``t`` along ``T``, or
    the whole of it (``whole``); the batch axis is squeezed."""
    if len(block) == 2:
        return pl.BlockSpec(block, lambda b, t: (b, 0 if whole else t))
    return pl.BlockSpec(block, lambda b, t: (b, 0 if whole else t, 0))


def _full(x: jax.Array) -> pl.BlockSpec:
    """The whole of a small 1-D array (offsets, schedule), read by scalar loads."""
    return pl.BlockSpec(x.shape, lambda b, t: (0,))


class _Padded(NamedTuple):
    """The operands as the kernels read them: padded to whole tiles and power-of-two depths.

    Attributes:
      q: ``[B, Tq_pad, dp]``; k: ``[B, Tv_pad, dp]``; v: ``[B, Tv_pad, dvp]``.
      bias: ``[B or 1, Tv_pad]`` float32 key bias or ``None`` (see :func:`_key_bias`).
      offs: int32 ``[2]``, the query and key offsets.
      kv_stop: int32 ``[n_q]``; q_start: int32 ``[n_kv]``; n_full: int32 ``[1]`` (the
        blocked kernel's :func:`~.blocked.schedule`).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    offs: jax.Array
    kv_stop: jax.Array
    q_start: jax.Array
    n_full: jax.Array


def _padded(cfg: TileConfig, ops: Operands) -> _Padded:
    """Pads and schedules ``ops`` for the kernels (see :class:`_Padded`)."""
    _check_operands(ops)
    tq, tv = cfg.n_q * cfg.block_q, cfg.n_kv * cfg.block_kv
    dp, dvp = _padded_pow2(ops.q.shape[-1]), _padded_pow2(ops.v.shape[-1])
    sched = schedule(cfg, ops.value_mask, ops.offsets)
    return _Padded(
        q=_pad(ops.q, tq, dp),
        k=_pad(ops.k, tv, dp),
        v=_pad(ops.v, tv, dvp),
        bias=_key_bias(cfg, ops.value_mask, tv),
        offs=jnp.stack(ops.offsets).astype(jnp.int32),
        kv_stop=sched.kv_stop.astype(jnp.int32),
        q_start=sched.q_start.astype(jnp.int32),
        n_full=jnp.reshape(sched.n_full, (1,)).astype(jnp.int32),
    )


def _bias_args(padded: _Padded) -> tuple[tuple[jax.Array, ...], list[pl.BlockSpec]]:
    """The optional bias operand and its spec (row ``b``, or row 0 of a shared bias)."""
    if padded.bias is None:
        return (), []
    shared = padded.bias.shape[0] == 1
    spec = pl.BlockSpec((None, padded.bias.shape[1]), lambda b, t: (0 if shared else b, 0))
    return (padded.bias,), [spec]


def forward(cfg: TileConfig, ops: Operands, *, interpret: bool = False) -> SoftmaxState:
    """The online-softmax state of every query row: ``m``, ``denom`` ``[B, Tq]`` and the
    unnormalised ``acc`` ``[B, Tq, dim_v]``, float32. ``interpret``: run in the Pallas
    interpreter (CPUs, tests) instead of compiling with Triton.
    """
    x = _padded(cfg, ops)
    batch, tq, dvp = x.q.shape[0], x.q.shape[1], x.v.shape[-1]
    bias, bias_spec = _bias_args(x)
    m, denom, acc = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, has_bias=x.bias is not None),
        grid=(batch, cfg.n_q),
        in_specs=[
            _full(x.offs),
            _full(x.kv_stop),
            _spec((None, cfg.block_q, x.q.shape[-1])),
            _spec((None, x.k.shape[1], x.k.shape[-1]), whole=True),
            _spec((None, x.v.shape[1], dvp), whole=True),
            *bias_spec,
        ],
        out_specs=[
            _spec((None, cfg.block_q)),
            _spec((None, cfg.block_q)),
            _spec((None, cfg.block_q, dvp)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, tq), jnp.float32),
            jax.ShapeDtypeStruct((batch, tq), jnp.float32),
            jax.ShapeDtypeStruct((batch, tq, dvp), jnp.float32),
        ],
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="luong_pallas_gpu_forward",
    )(x.offs, x.kv_stop, x.q, x.k, x.v, *bias)
    rows, dim_v = cfg.q_length, ops.v.shape[-1]
    return SoftmaxState(m[:, :rows], denom[:, :rows], acc[:, :rows, :dim_v])


def _weights(s: jax.Array, m: jax.Array, denom: jax.Array) -> jax.Array:
    """``p = exp(s - m) / denom`` ``[bq, bk]`` from the rows' final statistics ``[bq]``."""
    return jnp.exp(s - m[:, None]) * (1.0 / denom)[:, None]


def _dkdv_kernel(
    offs_ref,
    q_start_ref,
    n_full_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    m_ref,
    denom_ref,
    delta_ref,
    *refs,
    cfg: TileConfig,
    has_bias: bool,
) -> None:
    """One ``(batch, key tile j)``: ``dk``, ``dv`` ``[bk, dp/dvp]`` summed over the query
    tiles that see it, ``[0, min(n_full, q_start[j]))`` and ``[q_start[j], n_q)``.

    Refs: ``k``/``v`` the tile; ``q [Tq_pad, dp]``, ``do [Tq_pad, dvp]`` and the row
    statistics ``m``, ``denom``, ``delta [Tq_pad]`` whole.
    """
    bias_ref = refs[0] if has_bias else None
    dk_ref, dv_ref = refs[-2:]
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    start = q_start_ref[j]
    head = jnp.minimum(n_full_ref[0], start)

    def body(t, carry):
        dk, dv = carry
        i = jnp.where(t < head, t, start + t - head)
        rows = pl.ds(i * cfg.block_q, cfg.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _tile_scores(cfg, q, k, bias_ref, offs_ref, i, j)
        p = _weights(s, m_ref[rows], denom_ref[rows])
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, head + cfg.n_q - start, body, init)
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _dq_kernel(
    offs_ref,
    stop_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    m_ref,
    denom_ref,
    delta_ref,
    *refs,
    cfg: TileConfig,
    has_bias: bool,
) -> None:
    """One ``(batch, query tile i)``: ``dq [bq, dp]`` summed over key tiles
    ``[0, kv_stop[i])``; ``k``, ``v`` whole, the rest the tile."""
    bias_ref = refs[0] if has_bias else None
    (dq_ref,) = refs[-1:]
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    m, denom, delta = m_ref[...], denom_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * cfg.block_kv, cfg.block_kv)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = _weights(_tile_scores(cfg, q, k, bias_ref, offs_ref, i, j), m, denom)
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
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

    Args:
      cfg, ops: as the forward's.
      stats: the rows' output ``[B, Tq, dim_v]``, final max and denominator ``[B, Tq]``.
      d_out: ``[B, Tq, dim_v]``; d_lse: ``[B, Tq]``, cotangents of output and logsumexp.
      interpret: as in :func:`forward`.

    Returns:
      ``dq``, ``dk``, ``dv`` in the operands' dtypes (accumulated in float32) and a zero
      float32 ``dweight`` (``"dot"`` has no concat weight).
    """
    x = _padded(cfg, ops)
    batch, tq, dp, dvp = x.q.shape[0], x.q.shape[1], x.q.shape[-1], x.v.shape[-1]
    # d lse / d s = p, so the lse cotangent enters as a shift of the usual row term.
    delta = (d_out.astype(jnp.float32) * stats.out.astype(jnp.float32)).sum(-1) - d_lse
    rows = (
        _pad(stats.m.astype(jnp.float32), tq, fill=jnp.inf),  # padded rows: weight 0
        _pad(stats.denom.astype(jnp.float32), tq, fill=1.0),
        _pad(delta.astype(jnp.float32), tq),
    )
    # dO meets v and p in the matmuls: in the operand dtype, as the inputs.
    do = _pad(d_out.astype(ops.v.dtype), tq, dvp)
    bias, bias_spec = _bias_args(x)
    has_bias = x.bias is not None
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_bias=has_bias),
        grid=(batch, cfg.n_kv),
        in_specs=[
            _full(x.offs),
            _full(x.q_start),
            _full(x.n_full),
            _spec((None, tq, dp), whole=True),
            _spec((None, cfg.block_kv, dp)),
            _spec((None, cfg.block_kv, dvp)),
            _spec((None, tq, dvp), whole=True),
            *(_spec((None, tq), whole=True) for _ in rows),
            *bias_spec,
        ],
        out_specs=[_spec((None, cfg.block_kv, dp)), _spec((None, cfg.block_kv, dvp))],
        out_shape=[
            jax.ShapeDtypeStruct(x.k.shape, x.k.dtype),
            jax.ShapeDtypeStruct(x.v.shape, x.v.dtype),
        ],
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="luong_pallas_gpu_dkdv",
    )(x.offs, x.q_start, x.n_full, x.q, x.k, x.v, do, *rows, *bias)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_bias=has_bias),
        grid=(batch, cfg.n_q),
        in_specs=[
            _full(x.offs),
            _full(x.kv_stop),
            _spec((None, cfg.block_q, dp)),
            _spec((None, x.k.shape[1], dp), whole=True),
            _spec((None, x.v.shape[1], dvp), whole=True),
            _spec((None, cfg.block_q, dvp)),
            *(_spec((None, cfg.block_q)) for _ in rows),
            *bias_spec,
        ],
        out_specs=_spec((None, cfg.block_q, dp)),
        out_shape=jax.ShapeDtypeStruct(x.q.shape, x.q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="luong_pallas_gpu_dq",
    )(x.offs, x.kv_stop, x.q, x.k, x.v, do, *rows, *bias)
    depth, dim_v = ops.q.shape[-1], ops.v.shape[-1]
    return (
        dq[:, : cfg.q_length, :depth],
        dk[:, : cfg.kv_length, :depth],
        dv[:, : cfg.kv_length, :dim_v],
        jnp.zeros((), ops.weight.dtype),
    )


KERNEL = Kernel(
    name="pallas_gpu",
    config=config,
    forward=forward,
    backward=backward,
    schedule=schedule,
    dropout_multiplier=dropout_multiplier,
)
"""The Triton kernel, compiled (GPUs; from a CPU it can be lowered, not run)."""

INTERPRET_KERNEL = KERNEL._replace(
    name="pallas_gpu_interpret",
    forward=functools.partial(forward, interpret=True),
    backward=functools.partial(backward, interpret=True),
)
"""The same kernel in the Pallas interpreter: runs anywhere (CPUs, tests), slowly."""
