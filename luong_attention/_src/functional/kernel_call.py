"""Attention through a kernel of :mod:`luong_attention._src.kernels` (memory linear in T).

:func:`kernel_attention` turns the public arguments (any batch dims, a value mask, the score
parameters) into one kernel call; :func:`blocked_attention_with_lse` is its public face.
Shapes follow the legend in :mod:`luong_attention._src.primitives.scores`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from luong_attention._src.kernels.api import Kernel, Operands, attend
from luong_attention._src.kernels.registry import get_kernel
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.masks import as_bool_mask, mask_scores, score_mask
from luong_attention._src.primitives.scores import (
    ScoreMode,
    ScoreParams,
    resolve_matmul_dtype,
    stats_dtype,
)


def flatten_batch(
    x: jax.Array, batch_shape: tuple[int, ...], dtype: jnp.dtype, core_ndim: int = 2
) -> jax.Array:
    """``[batch..., *core]`` broadcast to ``batch_shape`` and flattened to ``[B, *core]``."""
    tail = x.shape[x.ndim - core_ndim :]
    x = jnp.broadcast_to(x.astype(dtype), (*batch_shape, *tail))
    return x.reshape(-1, *tail)


def kernel_attention(
    kernel: Kernel,
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    *,
    scores: ScoreParams,
    use_causal_mask: bool = False,
    q_offset: ArrayLike = 0,
    kv_offset: ArrayLike = 0,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One call of ``kernel`` on checked arrays (see :func:`blocked_attention_with_lse`).

    Args:
      kernel: the kernel (:class:`~luong_attention._src.kernels.api.Kernel`).
      query: ``[batch..., Tq, depth]``; value: ``[batch..., Tv, dim_v]``;
      key: ``[batch..., Tv, depth]``; value_mask: ``[batch..., Tv]`` or ``None``.
      scores: the score function; the other arguments as in
        :func:`blocked_attention_with_lse`.

    Query, key and value enter the matmuls in ``resolve_matmul_dtype(inputs, matmul_dtype)``;
    the scores, the softmax statistics, the logsumexp and the gradient accumulators are
    ``stats_dtype`` (float32 for float32/16 inputs).

    Returns:
      ``(output [batch..., Tq, dim_v], lse [batch..., Tq])`` in ``stats_dtype``.
    """
    input_dtype = jnp.result_type(query, key, value)
    dtype = stats_dtype(input_dtype)
    operand = resolve_matmul_dtype(input_dtype, matmul_dtype)
    value_mask = as_bool_mask(value_mask)
    mask_batch = () if value_mask is None else value_mask.shape[:-1]
    batch_shape = jnp.broadcast_shapes(
        query.shape[:-2], key.shape[:-2], value.shape[:-2], mask_batch
    )
    q, k, v = (flatten_batch(x, batch_shape, operand) for x in (query, key, value))
    if value_mask is not None:
        value_mask = flatten_batch(value_mask, batch_shape, jnp.bool_, core_ndim=1)
    q, k, weight = scores.fold(q, k, dtype)
    cfg = kernel.config(
        scores.mode,
        q.shape[1],
        k.shape[1],
        q.shape[-1],
        causal=use_causal_mask,
        dropout_rate=dropout_rate,
        block_q=block_q,
        block_kv=block_kv,
        batch=q.shape[0],
    )
    offsets = (jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_offset, jnp.int32))
    rng = dropout_rng if cfg.dropout_rate > 0.0 else None
    out, lse = attend(kernel, cfg, Operands(q, k, v, weight, value_mask, offsets, rng))
    return (
        out.reshape(*batch_shape, cfg.q_length, v.shape[-1]),
        lse.reshape(*batch_shape, cfg.q_length),
    )


def kernel_weights(
    kernel: Kernel,
    query: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    *,
    scores: ScoreParams,
    use_causal_mask: bool,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
    batch_shape: tuple[int, ...],
) -> jax.Array:
    """The dense weights matching a kernel call's output (the same dropout mask).

    ``[*batch_shape, Tq, Tv]`` (``batch_shape``: the output's): the core's masked softmax,
    times the kernel's dropout multipliers when ``dropout_rate > 0``.
    """
    q_length, kv_length = query.shape[-2], key.shape[-2]
    mask = score_mask(
        value_mask, use_causal_mask=use_causal_mask, q_length=q_length, kv_length=kv_length
    )
    weights = jax.nn.softmax(mask_scores(scores.scores(query, key), mask), axis=-1)
    weights = jnp.broadcast_to(weights, (*batch_shape, q_length, kv_length))
    if dropout_rate == 0.0:
        return weights
    batch = math.prod(batch_shape)
    cfg = kernel.config(
        scores.mode,
        q_length,
        kv_length,
        query.shape[-1],
        causal=use_causal_mask,
        dropout_rate=dropout_rate,
        batch=batch,
    )
    keep = kernel.dropout_multiplier(cfg, dropout_rng, batch)
    return weights * keep.reshape(weights.shape)


def blocked_attention_with_lse(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None = None,
    *,
    value_mask: ArrayLike | None = None,
    use_causal_mask: bool = False,
    q_offset: ArrayLike = 0,
    kv_offset: ArrayLike = 0,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Memory-efficient attention that also returns each row's logsumexp.

    The same maths as :func:`attention` (without ``query_mask``, which only zeroes output
    rows), computed over ``[block_q, block_kv]`` tiles with an online softmax and a
    FlashAttention-2 style backward, so memory stays linear in the lengths. It is
    differentiable in ``query``, ``key``, ``value``, ``scale``, ``concat_score_weight`` and
    through both outputs (``d lse / d score = softmax weight``).

    Partial results over disjoint key sets merge exactly:
    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) *
    out_b``. Positions ``q_offset``/``kv_offset`` place the blocks in a longer sequence for
    the causal mask: query ``q_offset + i`` sees key ``kv_offset + j`` iff
    ``kv_offset + j <= q_offset + i``.

    Args:
      query: ``[batch..., Tq, depth]``.
      value: ``[batch..., Tv, dim_v]``.
      key: ``[batch..., Tv, depth]`` (``None``: ``value``).
      value_mask: ``[batch..., Tv]`` or ``None``; masked scores are ``score - 1e9``, so a
        row with no visible key is a near-uniform softmax over all ``Tv`` keys (as Keras).
      use_causal_mask: causal mask on the global positions (see above).
      q_offset: global position of the first query (int, may be traced).
      kv_offset: global position of the first key (int, may be traced).
      score_mode: as in :func:`attention`.
      scale: as in :func:`attention`.
      concat_score_weight: as in :func:`attention`.
      dropout_rate: as in :func:`attention`.
      dropout_rng: as in :func:`attention`; each kernel draws its own mask from it (the
        blocked one from ``fold_in(dropout_rng, i * n_kv + j)`` per tile ``(i, j)``, the
        Pallas ones from a hash of one seed and each weight's position).
      block_q: query tile size (``None``: the kernel's default, balanced over the lengths).
      block_kv: key tile size (``None``: the kernel's default, balanced over the lengths).
      matmul_dtype: the matmuls' operand dtype, as in :func:`attention`.

    Returns:
      ``(output [batch..., Tq, dim_v], lse [batch..., Tq])``: the normalised output and the
      logsumexp of each row's masked scores, both in float32 (``stats_dtype`` of the inputs).
      In a fully masked row ``lse`` is about ``-1e9`` and carries only float32 precision
      there (spacing 64), so merging such rows across shards is approximate.
    """
    query, value, key, _, value_mask = checks.validate_attention_args(
        query,
        value,
        key,
        None,
        value_mask,
        score_mode=score_mode,
        concat_score_weight=concat_score_weight,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    return kernel_attention(
        get_kernel("blocked"),
        query,
        value,
        key,
        value_mask,
        scores=ScoreParams(score_mode, scale, concat_score_weight),
        use_causal_mask=use_causal_mask,
        q_offset=q_offset,
        kv_offset=kv_offset,
        dropout_rate=float(dropout_rate),
        dropout_rng=dropout_rng,
        block_q=block_q,
        block_kv=block_kv,
        matmul_dtype=matmul_dtype,
    )
