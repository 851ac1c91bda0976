"""How a sequence is laid out over a mesh axis: padding, partition specs and the zigzag order.

With the *contiguous* layout device ``d`` of ``n`` holds positions ``[d * s, (d + 1) * s)`` of a
sequence padded to ``n * s``. With the *zigzag* layout the sequence is cut into ``2n`` chunks
of ``c`` positions and device ``d`` holds chunks ``d`` and ``2n - 1 - d``, in that order (the
load-balanced order of TransformerEngine's DualChunkSwap and MaxText's reorder): under the
causal mask every device then has the same number of query-key pairs below the diagonal.
:func:`to_zigzag` puts a sequence in natural order into that order, :func:`from_zigzag` takes it
back; both are plain gathers, meant to be applied once to a model's inputs (the token ids and
masks) and outputs, since everything position-wise commutes with them.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

Layout = Literal["contiguous", "zigzag"]


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """The natural positions in zigzag order: ``x_zigzag = x[..., order, :]``.

    Args:
      length: the sequence length, a multiple of ``2 * devices``.
      devices: the number of devices on the sequence axis.

    Returns:
      int ``[length]``: device ``d``'s slice ``[d * length / n, (d + 1) * length / n)`` holds
      chunks ``d`` and ``2n - 1 - d`` of ``length / (2n)`` positions.

    Raises:
      ValueError: if ``length`` is not a multiple of ``2 * devices``.
    """
    check_zigzag_length("length", length, devices)
    chunks = np.arange(length).reshape(2 * devices, -1)
    picked = [chunks[[d, 2 * devices - 1 - d]] for d in range(devices)]
    return np.concatenate(picked).reshape(-1)


def check_zigzag_length(name: str, length: int, devices: int) -> None:
    """Raises ``ValueError`` unless ``length`` splits into ``2 * devices`` equal chunks."""
    if length % (2 * devices):
        raise ValueError(
            f"layout='zigzag' cuts the sequence into 2 * {devices} devices = {2 * devices} "
            f"equal chunks, so {name} must be a multiple of {2 * devices}. Received: "
            f"{name}={length}. Pad the sequence (and mask the padding) or use "
            "layout='contiguous'."
        )


def to_zigzag(x: ArrayLike, devices: int, axis: int = -2) -> jax.Array:
    """Reorders ``x`` along ``axis`` from natural to zigzag order (see :func:`zigzag_order`).

    Use ``axis=-2`` for queries, keys and values ``[batch..., length, depth]`` and ``axis=-1``
    for masks ``[batch..., length]``.
    """
    x = jnp.asarray(x)
    return jnp.take(x, zigzag_order(x.shape[axis], devices), axis=axis)


def from_zigzag(x: ArrayLike, devices: int, axis: int = -2) -> jax.Array:
    """The inverse of :func:`to_zigzag`: zigzag order back to natural order along ``axis``."""
    x = jnp.asarray(x)
    return jnp.take(x, np.argsort(zigzag_order(x.shape[axis], devices)), axis=axis)


def shard_spec(
    x: jax.Array | None,
    core_dims: int,
    split: int | None,
    axis_name: str,
    batch_axis: str | None,
    batch_shape: tuple[int, ...],
) -> P:
    """The PartitionSpec of one input of :func:`sequence_parallel_attention`.

    Dimension ``split`` (negative, or ``None``) goes over ``axis_name``; the first batch dim
    goes over ``batch_axis`` when ``x`` has it in full (inputs that broadcast over it, with a
    size-1 or missing dim, are replicated instead).
    """
    if x is None:
        return P()
    spec = [None] * x.ndim
    if split is not None:
        spec[split] = axis_name
    full_batch = x.ndim - core_dims == len(batch_shape) and x.shape[:1] == batch_shape[:1]
    if batch_axis is not None and full_batch:
        spec[0] = batch_axis
    return P(*spec)


def check_axes(
    mesh: Mesh, axis_name: str, batch_axis: str | None, batch_shape: tuple[int, ...]
) -> None:
    """Raises ``ValueError`` for axes the mesh lacks or a batch that does not divide."""
    for name, axis in (("axis_name", axis_name), ("batch_axis", batch_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"{name} must be one of the mesh's axes {mesh.axis_names}. "
                f"Received: {name}={axis!r}"
            )
    if batch_axis is None:
        return
    if batch_axis == axis_name or not batch_shape or batch_shape[0] % mesh.shape[batch_axis]:
        raise ValueError(
            f"batch_axis must differ from axis_name, and the first batch dim must divide by its "
            f"{mesh.shape[batch_axis]} devices. Received: batch_axis={batch_axis!r}, "
            f"axis_name={axis_name!r}, batch dims {batch_shape}"
        )
