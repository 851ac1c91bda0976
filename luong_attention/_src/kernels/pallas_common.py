"""What the Pallas GPU and TPU kernels share: the key bias and the dropout stream.

Dropout in a Pallas kernel cannot call ``jax.random`` per tile (no threefry in Triton or
Mosaic), so both kernels draw their mask from a counter-based hash: a 32-bit seed (one
draw from ``dropout_rng``, outside the kernels) mixed with the example index, the query row
and the key column (positions within the call, not the global ones) by murmur3's 32-bit
finaliser. The same pure ``jnp`` function runs inside the kernels on a tile's row and
column indices and densely in :func:`dropout_multiplier`, so the forward, the backward and
``return_attention_scores`` all see one mask, the GPU and TPU kernels the same one.

The arithmetic is int32 with wrap-around (multiplies by odd constants, xors, logical right
shifts): the same bits as uint32, with no unsigned type for Triton or Mosaic to lower. A
weight is kept iff the top 31 bits of its hash are ``>= rate * 2**31``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from luong_attention._src.kernels import blocked
from luong_attention._src.kernels.api import TileConfig
from luong_attention._src.primitives.masks import MASK_PENALTY
from luong_attention._src.primitives.rows import pad_length

# Padded keys get this bias: far below a penalised score (about -1e9), still finite in f32.
PAD_PENALTY = 1.0e30


def _int32(constant: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    return constant - (1 << 32) if constant >= 1 << 31 else constant


_MIX_1 = _int32(0x85EBCA6B)  # murmur3 fmix32's multipliers (odd: the mix is a bijection)
_MIX_2 = _int32(0xC2B2AE35)
_GOLDEN = _int32(0x9E3779B9)  # spreads consecutive columns over all 32 bits


def key_bias(cfg: TileConfig, value_mask: jax.Array | None, kv_padded: int) -> jax.Array:
    """float32 ``[B or 1, kv_padded]``: 0 (attend), ``-MASK_PENALTY`` (masked key) or
    ``-PAD_PENALTY`` (padding past ``cfg.kv_length``)."""
    vmask = jnp.ones((1, cfg.kv_length), bool) if value_mask is None else value_mask
    bias = jnp.where(vmask, 0.0, -MASK_PENALTY).astype(jnp.float32)
    pad = ((0, 0), (0, kv_padded - cfg.kv_length))
    return jnp.pad(bias, pad, constant_values=-PAD_PENALTY)


def dropout_seed(rng: jax.Array) -> jax.Array:
    """The kernels' int32 scalar seed: 32 random bits of ``rng`` (a PRNG key)."""
    return jax.lax.bitcast_convert_type(jax.random.bits(rng, (), jnp.uint32), jnp.int32)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's fmix32 on int32 bits (wrapping multiplies, logical shifts)."""
    h = h ^ jax.lax.shift_right_logical(h, 16)
    h = h * _MIX_1
    h = h ^ jax.lax.shift_right_logical(h, 13)
    h = h * _MIX_2
    return h ^ jax.lax.shift_right_logical(h, 16)


def dropout_scale(
    rate: float, seed: jax.Array, batch: jax.Array, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """float32 ``keep / (1 - rate)`` of the weights at ``(batch, rows, cols)``.

    ``seed``: int32 scalar (:func:`dropout_seed`); ``batch``: int32 example index (scalar or
    broadcastable); ``rows``, ``cols``: int32 query rows and key columns within the call,
    broadcastable to one another (e.g. ``[bq, 1]`` and ``[1, bk]``).
    """
    row_key = _mix(_mix(seed ^ batch) ^ rows)
    bits = _mix(row_key ^ (cols * _GOLDEN))
    threshold = min(round(rate * 2.0**31), 2**31 - 1)
    keep = jax.lax.shift_right_logical(bits, 1) >= threshold
    return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))


def dropout_multiplier(cfg: TileConfig, rng: jax.Array, batch: int) -> jax.Array:
    """The Pallas kernels' dropout multipliers ``keep / (1 - rate)``, ``[B, Tq, Tv]``
    float32: the mask both kernels draw in-tile for ``rng``."""
    b = jnp.arange(batch, dtype=jnp.int32)[:, None, None]
    rows = jnp.arange(cfg.q_length, dtype=jnp.int32)[None, :, None]
    cols = jnp.arange(cfg.kv_length, dtype=jnp.int32)[None, None, :]
    return dropout_scale(cfg.dropout_rate, dropout_seed(rng), b, rows, cols)


def tile_keep(
    cfg: TileConfig, rng: jax.Array | None, i: jax.Array, j: jax.Array, shape: tuple[int, ...]
) -> jax.Array | None:
    """The multipliers of tile ``(i, j)`` (``shape = [B, block_q, block_kv]``) of this
    stream, for the ``lax`` loops of :data:`LAX_TWIN`; ``None`` without dropout."""
    if cfg.dropout_rate == 0.0:
        return None
    batch, rows, cols = (jnp.arange(n, dtype=jnp.int32) for n in shape)
    return dropout_scale(
        cfg.dropout_rate,
        dropout_seed(rng),
        batch[:, None, None],
        (i * cfg.block_q + rows)[None, :, None],
        (j * cfg.block_kv + cols)[None, None, :],
    )


LAX_TWIN = blocked.with_dropout("pallas_lax", tile_keep, dropout_multiplier)
"""The Pallas kernels' maths and dropout mask in the blocked kernel's ``lax`` loops: their
tangent pass (forward-mode derivatives) and what their second derivatives differentiate."""


def pad_rows(x: jax.Array, length: int, depth: int | None = None, fill: float = 0.0) -> jax.Array:
    """``[B, T(, D)]`` padded with ``fill`` to ``[B, length(, depth)]``."""
    x = pad_length(x, 1, length, fill)
    return x if depth is None else pad_length(x, 2, depth, fill)
