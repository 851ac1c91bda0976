"""Padding and cutting the sequence axis: what the kernels and the parallel strategies share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_length(x: jax.Array, axis: int, length: int, fill: bool | float = 0) -> jax.Array:
    """Pads ``x`` at the end of ``axis`` with ``fill`` up to ``length`` entries."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=fill)


def split_rows(x: jax.Array, size: int, fill: float = 0.0) -> jax.Array:
    """``[B, T, ...]`` -> ``[ceil(T / size), B, size, ...]``, padded with ``fill``."""
    n = -(-x.shape[1] // size)
    x = pad_length(x, 1, n * size, fill)
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def join_rows(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`split_rows`: ``[n, B, size, ...]`` -> ``[B, length, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]
