"""The functional core: masked softmax, dropout, weighted sum, and ``attention``.

Shapes follow the legend in :mod:`luong_attention._src.primitives.scores`.
"""

from __future__ import annotations

import math
from typing import Literal

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from luong_attention._src.kernels import blocked
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.masks import as_bool_mask, mask_scores, score_mask
from luong_attention._src.primitives.scores import (
    PrecisionLike,
    concat_scores,
    dot_scores,
    resolve_matmul_dtype,
    weighted_sum,
)

ScoreMode = Literal["dot", "concat"]
Implementation = Literal["xla", "blocked"]

# The automatic choice (``implementation=None``), measured with ``luong-attention bench`` on
# 2-core x86 CPUs (AMD EPYC and Intel Xeon; see the README's Performance section): below
# these sizes the dense XLA path is as fast or faster; above them the blocked path wins on
# time and memory.
AUTO_BLOCKED_DOT_SCORES = 1 << 20  # Tq * Tv, per example
AUTO_BLOCKED_DOT_BATCH_SCORES = 1 << 25  # B * Tq * Tv (128 MiB of f32 scores)
AUTO_BLOCKED_CONCAT_ELEMENTS = 1 << 23  # B * Tq * Tv * depth


def compute_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Dispatches to :func:`dot_scores` or :func:`concat_scores`.

    Args:
      query: ``[batch..., q_length, depth]``; key: ``[batch..., kv_length, depth]``.

    Returns:
      ``[batch..., q_length, kv_length]`` in float32 (or wider).
    """
    if score_mode == "dot":
        return dot_scores(query, key, scale=scale, precision=precision)
    return concat_scores(query, key, scale=scale, concat_score_weight=concat_score_weight)


def dropout_weights(weights: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout on attention weights, as Keras: keep with ``1 - rate``, rescale.

    Every weight is dropped independently (no sharing across batch rows).

    Args:
      weights: ``[batch..., q_length, kv_length]``.
      rate: fraction to drop, in ``[0, 1)``.
      rng: a PRNG key.

    Returns:
      The dropped weights, same shape and dtype; kept entries are ``w / (1 - rate)``.
    """
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / jnp.asarray(1.0 - rate, weights.dtype), 0.0)


def apply_scores(
    scores: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
    """Masked softmax, optional dropout, and the weighted sum of the values.

    The softmax runs in ``scores``' dtype (float32 or wider, see :func:`dot_scores`).

    Args:
      scores: ``[batch..., q_length, kv_length]``.
      value: ``[batch..., kv_length, value_depth]``.
      mask: bool, broadcastable to ``scores`` (see :func:`score_mask`), or ``None``.
      dropout_rate: fraction of weights to drop; 0 disables dropout.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      precision: matmul precision of the weighted sum.

    Returns:
      ``(output, weights)``: ``output [batch..., q_length, value_depth]`` and the (dropped)
      ``weights [batch..., q_length, kv_length]``, both in ``scores``' dtype. A bfloat16 or
      float16 ``value`` makes the weighted sum take low-precision operands (the weights
      rounded to ``value``'s dtype) with float32 accumulation.
    """
    weights = jax.nn.softmax(mask_scores(scores, mask), axis=-1)
    if dropout_rate > 0.0:
        weights = dropout_weights(weights, dropout_rate, dropout_rng)
    return weighted_sum(weights, value, precision=precision), weights


def apply_query_mask(output: jax.Array, query_mask: ArrayLike | None) -> jax.Array:
    """Zeroes the output rows of masked queries (the weights are left alone, as in Keras).

    Args:
      output: ``[batch..., q_length, value_depth]``.
      query_mask: ``[batch..., q_length]`` or ``None``.

    Returns:
      ``output`` with masked rows set to exactly 0 (even if they held NaN).
    """
    query_mask = as_bool_mask(query_mask)
    if query_mask is None:
        return output
    return jnp.where(query_mask[..., None], output, jnp.zeros((), output.dtype))


def validate_attention_args(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None,
    query_mask: ArrayLike | None,
    value_mask: ArrayLike | None,
    *,
    score_mode: str,
    concat_score_weight: ArrayLike | None,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Checks every argument of :func:`attention` and returns the arrays it will use.

    Returns:
      ``(query, value, key, query_mask, value_mask)`` as arrays; ``key`` is ``value`` when
      none was given.

    Raises:
      ValueError, TypeError: naming the argument, the shapes seen and what was expected.
    """
    checks.check_score_mode(score_mode)
    checks.check_rate("dropout_rate", dropout_rate)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate} needs a PRNG key: pass dropout_rng=jax.random.key(...)."
        )
    if score_mode != "concat" and concat_score_weight is not None:
        raise ValueError(
            "concat_score_weight is only used with score_mode='concat'. "
            f"Received: score_mode={score_mode!r}"
        )
    query = checks.as_float_array("query", query)
    value = checks.as_float_array("value", value)
    key = value if key is None else checks.as_float_array("key", key)
    batch_shape = checks.check_attention_shapes(query, value, key)
    query_mask = checks.check_mask("query_mask", query_mask, batch_shape, query.shape[-2], "Tq")
    value_mask = checks.check_mask("value_mask", value_mask, batch_shape, value.shape[-2], "Tv")
    return query, value, key, query_mask, value_mask


def attention(
    query: ArrayLike,
    value: ArrayLike,
    key: ArrayLike | None = None,
    *,
    query_mask: ArrayLike | None = None,
    value_mask: ArrayLike | None = None,
    use_causal_mask: bool = False,
    score_mode: ScoreMode = "dot",
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_attention_scores: bool = False,
    precision: PrecisionLike = None,
    implementation: Implementation | None = None,
    matmul_dtype: DTypeLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Luong-style attention with the exact semantics of ``keras.layers.Attention``.

    ``weights = softmax(mask(score(query, key)))`` and ``output = weights @ value``, with the
    scores, masking, dropout and query masking of Keras 3.

    Args:
      query: ``[batch..., q_length, depth]``.
      value: ``[batch..., kv_length, value_depth]``.
      key: ``[batch..., kv_length, depth]``; ``None`` uses ``value`` as the key.
      query_mask: ``[batch..., q_length]``, bool/int/float (non-zero = keep). Masked queries
        get an all-zero output row; their returned weights stay a normal softmax row.
      value_mask: ``[batch..., kv_length]`` (non-zero = attend). Masked keys get weight 0.
      use_causal_mask: add a top-left aligned causal mask (query ``i`` sees keys ``j <= i``),
        combined with ``value_mask`` by AND. See :func:`causal_mask` for ``q_length == 1``.
      score_mode: ``"dot"`` or ``"concat"`` (see :func:`dot_scores`, :func:`concat_scores`).
      scale: ``None`` for no scaling (Keras ``use_scale=False``) or a scalar (float or 0-d
        array, differentiable) applied as Keras applies its ``scale`` weight in each mode.
      concat_score_weight: scalar for ``"concat"``; ``None`` means 1.0.
      dropout_rate: fraction of the attention weights to drop (inverted dropout).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      return_attention_scores: also return the weights (after masking, softmax, dropout).
      precision: matmul precision (of the ``"xla"`` path; the blocked path multiplies in
        the ``matmul_dtype`` operands with the default precision).
      implementation: ``"xla"`` builds the full ``[Tq, Tv]`` score matrix (fastest for small
        problems); ``"blocked"`` runs :func:`blocked_attention_with_lse`, whose memory is
        linear in the lengths; ``None`` picks with :func:`select_implementation`. Both give
        the same numbers up to float32 rounding (dropout masks differ: each path draws its
        own). With ``return_attention_scores`` the blocked path still computes its output
        blockwise but must also build the dense ``[Tq, Tv]`` weights (one extra dense score
        pass and ``Tq * Tv`` memory), so ``None`` picks ``"xla"`` then.
      matmul_dtype: dtype of the operands of the two matmuls (query-key and weights-value,
        and the backward's); they always accumulate in float32, and the softmax and its
        statistics always run in float32. ``None``: the inputs' dtype, except bfloat16 and
        float16 on a CPU without matrix units for them, which multiply in float32 (faster
        there); see :func:`resolve_matmul_dtype`.

    Returns:
      ``output [batch..., q_length, value_depth]``, or ``(output, weights)`` with
      ``weights [batch..., q_length, kv_length]``; both in the inputs' dtype.

    .. note::
      A fully masked row gets the mean of the values (Keras's ``-1e9`` fill), finite in the
      output and in every gradient. Scores and softmax run in float32 even for float16 and
      bfloat16 inputs, so half-precision inputs never overflow in the mask.

    Raises:
      ValueError, TypeError: for bad shapes, dtypes, ``score_mode`` or dropout arguments.
    """
    checks.check_implementation(implementation)
    query, value, key, query_mask, value_mask = validate_attention_args(
        query,
        value,
        key,
        query_mask,
        value_mask,
        score_mode=score_mode,
        concat_score_weight=concat_score_weight,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    dtype = jnp.result_type(query, key, value)
    operand = resolve_matmul_dtype(dtype, matmul_dtype)
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if implementation is None:
        implementation = select_implementation(
            score_mode, query, key, value, return_attention_scores=return_attention_scores
        )
    # "dot" multiplies in the operand dtype; "concat" adds, so its tanh runs in float32.
    score_query, score_key = (
        (query.astype(operand), key.astype(operand)) if score_mode == "dot" else (query, key)
    )
    scores_args = dict(
        score_mode=score_mode,
        scale=scale,
        concat_score_weight=concat_score_weight,
    )
    if implementation == "blocked":
        output, _ = blocked.blocked_attention(
            query,
            value,
            key,
            value_mask,
            use_causal_mask=use_causal_mask,
            dropout_rate=float(dropout_rate),
            dropout_rng=dropout_rng,
            matmul_dtype=operand,
            **scores_args,
        )
        weights = None
        if return_attention_scores:
            weights = _blocked_weights(
                score_query,
                score_key,
                value_mask,
                use_causal_mask,
                dropout_rate,
                dropout_rng,
                scores_args,
                batch_shape=output.shape[:-2],
            )
    else:
        scores = compute_scores(score_query, score_key, precision=precision, **scores_args)
        mask = score_mask(
            value_mask, use_causal_mask=use_causal_mask, q_length=q_length, kv_length=kv_length
        )
        output, weights = apply_scores(
            scores,
            value.astype(operand),
            mask,
            dropout_rate=float(dropout_rate),
            dropout_rng=dropout_rng,
            precision=precision,
        )
    output = apply_query_mask(output, query_mask).astype(dtype)
    batch_shape = output.shape[:-2]
    chex.assert_shape(output, (*batch_shape, q_length, value.shape[-1]))
    if return_attention_scores:
        chex.assert_shape(weights, (*batch_shape, q_length, kv_length))
        return output, weights.astype(dtype)
    return output


def select_implementation(
    score_mode: str,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    return_attention_scores: bool = False,
) -> Implementation:
    """The implementation :func:`attention` uses when given ``implementation=None``.

    For ``"dot"``, ``"blocked"`` once each example's score matrix is large, ``Tq * Tv >=``
    :data:`AUTO_BLOCKED_DOT_SCORES` (from about 1024 x 1024 the blocked forward and gradient
    are the faster ones), or once the whole batch's is, ``B * Tq * Tv >=``
    :data:`AUTO_BLOCKED_DOT_BATCH_SCORES` (many short rows: the dense gradient is faster
    there, by up to 1.8x at T=256, but would hold several 128 MiB score tensors). For
    ``"concat"``, ``"blocked"`` once ``B * Tq * Tv * depth >=``
    :data:`AUTO_BLOCKED_CONCAT_ELEMENTS` (its dense gradient is slow from T of a few hundred
    on). ``B`` is the product of the batch dims. ``"xla"`` otherwise, and always when the
    weights are requested (they are dense).
    """
    if return_attention_scores:
        return "xla"
    batch_shape = jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    per_example = query.shape[-2] * key.shape[-2]
    scores = math.prod(batch_shape) * per_example
    if score_mode == "concat":
        blocked_wins = scores * query.shape[-1] >= AUTO_BLOCKED_CONCAT_ELEMENTS
    else:
        blocked_wins = (
            per_example >= AUTO_BLOCKED_DOT_SCORES or scores >= AUTO_BLOCKED_DOT_BATCH_SCORES
        )
    return "blocked" if blocked_wins else "xla"


def _blocked_weights(
    query: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    use_causal_mask: bool,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
    scores_args: dict,
    batch_shape: tuple[int, ...],
) -> jax.Array:
    """The dense weights matching a blocked call's output (same dropout tiles).

    ``[*batch_shape, Tq, Tv]`` (``batch_shape``: the output's): the core's masked softmax,
    times the blocked kernel's dropout multipliers when ``dropout_rate > 0``.
    """
    q_length, kv_length = query.shape[-2], key.shape[-2]
    scores = compute_scores(query, key, **scores_args)
    mask = score_mask(
        value_mask, use_causal_mask=use_causal_mask, q_length=q_length, kv_length=kv_length
    )
    weights = jax.nn.softmax(mask_scores(scores, mask), axis=-1)
    weights = jnp.broadcast_to(weights, (*batch_shape, q_length, kv_length))
    if dropout_rate == 0.0:
        return weights
    batch = math.prod(batch_shape)
    cfg = blocked.make_config(
        scores_args["score_mode"],
        use_causal_mask,
        q_length,
        kv_length,
        query.shape[-1],
        dropout_rate,
        None,
        None,
        batch,
    )
    keep = blocked.dropout_multiplier(cfg, dropout_rng, batch)
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
      query: ``[batch..., Tq, depth]``; value: ``[batch..., Tv, dim_v]``;
      key: ``[batch..., Tv, depth]`` (``None``: ``value``).
      value_mask: ``[batch..., Tv]`` or ``None``; masked scores are ``score - 1e9``, so a
        row with no visible key is a near-uniform softmax over all ``Tv`` keys (as Keras).
      use_causal_mask: causal mask on the global positions (see above).
      q_offset, kv_offset: global position of the first query / key (int, may be traced).
      score_mode, scale, concat_score_weight, dropout_rate, dropout_rng: as in
        :func:`attention`; dropout tile ``(i, j)`` uses ``fold_in(dropout_rng, i * n_kv + j)``.
      block_q, block_kv: tile sizes (``None``: :func:`blocked.default_blocks`).
      matmul_dtype: the matmuls' operand dtype, as in :func:`attention`.

    Returns:
      ``(output [batch..., Tq, dim_v], lse [batch..., Tq])``: the normalised output and the
      logsumexp of each row's masked scores, both in float32 (``stats_dtype`` of the inputs).
      In a fully masked row ``lse`` is about ``-1e9`` and carries only float32 precision
      there (spacing 64), so merging such rows across shards is approximate.
    """
    query, value, key, _, value_mask = validate_attention_args(
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
    return blocked.blocked_attention(
        query,
        value,
        key,
        value_mask,
        use_causal_mask=use_causal_mask,
        q_offset=q_offset,
        kv_offset=kv_offset,
        score_mode=score_mode,
        scale=scale,
        concat_score_weight=concat_score_weight,
        dropout_rate=float(dropout_rate),
        dropout_rng=dropout_rng,
        block_q=block_q,
        block_kv=block_kv,
        matmul_dtype=matmul_dtype,
    )
