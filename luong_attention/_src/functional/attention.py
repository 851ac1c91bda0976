"""The functional core: masked softmax, dropout, weighted sum, and ``attention``.

Shapes follow the legend in :mod:`luong_attention._src.primitives.scores`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from luong_attention._src.functional.kernel_call import kernel_attention, kernel_weights
from luong_attention._src.kernels.registry import KERNELS, get_kernel
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.masks import as_bool_mask, mask_scores, score_mask
from luong_attention._src.primitives.scores import (
    PrecisionLike,
    ScoreMode,
    ScoreParams,
    resolve_matmul_dtype,
    weighted_sum,
)

Implementation = Literal["xla", "blocked", "pallas"]
PallasPlatform = Literal["gpu", "tpu"]

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
      query: ``[batch..., q_length, depth]``.
      key: ``[batch..., kv_length, depth]``.

    Returns:
      ``[batch..., q_length, kv_length]`` in float32 (or wider).
    """
    return ScoreParams(score_mode, scale, concat_score_weight).scores(query, key, precision)


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
    pallas_platform: PallasPlatform | None = None,
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
        linear in the lengths; ``"pallas"`` runs the Pallas kernel of the running backend
        (``"dot"`` only; on a GPU a Triton kernel, memory linear in the
        lengths; on a CPU the same GPU kernel in the Pallas interpreter, slow: a testing
        aid); ``None`` picks with :func:`select_implementation`. All give the same numbers
        up to float32 rounding (dropout masks differ: each path draws its own). With
        ``return_attention_scores`` the blocked and Pallas paths still compute their output
        blockwise but must also build the dense ``[Tq, Tv]`` weights (one extra dense score
        pass and ``Tq * Tv`` memory), so ``None`` picks ``"xla"`` then.
      matmul_dtype: dtype of the operands of the two matmuls (query-key and weights-value,
        and the backward's); they always accumulate in float32, and the softmax and its
        statistics always run in float32. ``None``: the inputs' dtype, except bfloat16 and
        float16 on a CPU without matrix units for them, which multiply in float32 (faster
        there); see :func:`resolve_matmul_dtype`. ``"pallas"`` always multiplies in the
        inputs' dtype (its kernels target GPU/TPU matrix units).
      pallas_platform: with ``implementation="pallas"``, ``"gpu"`` (Triton) or ``"tpu"``
        (Mosaic) picks that platform's compiled kernel whatever the running backend, so that
        a CPU process can lower or export the program for that platform (e.g.
        ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``; it cannot run it).
        ``None``: the running backend's kernel (the GPU one interpreted on a CPU).

    Returns:
      ``output [batch..., q_length, value_depth]``, or ``(output, weights)`` with
      ``weights [batch..., q_length, kv_length]``; both in the inputs' dtype.

    Note:
      A fully masked row gets the mean of the values (Keras's ``-1e9`` fill), finite in the
      output and in every gradient. Scores and softmax run in float32 even for float16 and
      bfloat16 inputs, so half-precision inputs never overflow in the mask.

    Raises:
      ValueError, TypeError: for bad shapes, dtypes, ``score_mode`` or dropout arguments,
        or a Pallas kernel asked for what it does not compute (``"concat"``; pass
        ``implementation="blocked"`` for it).
    """
    checks.check_implementation(implementation, pallas_platform)
    query, value, key, query_mask, value_mask = checks.validate_attention_args(
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
    if implementation is None:
        implementation = select_implementation(
            score_mode,
            query,
            key,
            value,
            return_attention_scores=return_attention_scores,
            dropout_rate=dropout_rate,
        )
    dtype = jnp.result_type(query, key, value)
    if implementation == "pallas":
        # A Pallas kernel targets matrix units: the CPU rule of resolve_matmul_dtype is moot.
        matmul_dtype = dtype if matmul_dtype is None else matmul_dtype
    run = _dense
    if implementation != "xla":
        run = functools.partial(_kernel_path, _kernel_name(implementation, pallas_platform))
    output, weights = run(
        query,
        value,
        key,
        value_mask,
        _Settings(
            scores=ScoreParams(score_mode, scale, concat_score_weight),
            use_causal_mask=use_causal_mask,
            dropout_rate=float(dropout_rate),
            dropout_rng=dropout_rng,
            weights=return_attention_scores,
            precision=precision,
            operand=resolve_matmul_dtype(dtype, matmul_dtype),
        ),
    )
    output = apply_query_mask(output, query_mask).astype(dtype)
    batch_shape = output.shape[:-2]
    _assert_shape(output, (*batch_shape, query.shape[-2], value.shape[-1]))
    if return_attention_scores:
        _assert_shape(weights, (*batch_shape, query.shape[-2], key.shape[-2]))
        return output, weights.astype(dtype)
    return output


def _assert_shape(x: jax.Array, shape: tuple[int, ...]) -> None:
    """``chex.assert_shape``, imported on first use: at trace time only, and chex stays out
    of ``import luong_attention``."""
    import chex

    chex.assert_shape(x, shape)


class _Settings(NamedTuple):
    """What :func:`attention` hands its implementations besides the checked arrays."""

    scores: ScoreParams
    use_causal_mask: bool
    dropout_rate: float
    dropout_rng: jax.Array | None
    weights: bool  # also return the weights
    precision: PrecisionLike
    operand: jnp.dtype  # the matmul operand dtype


def _score_operands(
    query: jax.Array, key: jax.Array, settings: _Settings
) -> tuple[jax.Array, jax.Array]:
    """ "dot" multiplies in the operand dtype; "concat" adds, so its tanh runs in float32."""
    if settings.scores.mode != "dot":
        return query, key
    return query.astype(settings.operand), key.astype(settings.operand)


def _dense(
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array]:
    """The ``"xla"`` implementation: the full ``[batch..., Tq, Tv]`` scores and weights."""
    scores = settings.scores.scores(
        *_score_operands(query, key, settings), precision=settings.precision
    )
    mask = score_mask(
        value_mask,
        use_causal_mask=settings.use_causal_mask,
        q_length=query.shape[-2],
        kv_length=key.shape[-2],
    )
    return apply_scores(
        scores,
        value.astype(settings.operand),
        mask,
        dropout_rate=settings.dropout_rate,
        dropout_rng=settings.dropout_rng,
        precision=settings.precision,
    )


def _kernel_name(implementation: Implementation, pallas_platform: PallasPlatform | None) -> str:
    """The registry name of the kernel behind ``"blocked"`` or ``"pallas"``.

    ``"pallas"`` takes ``pallas_platform``'s compiled kernel, else the running backend's
    (``"pallas_gpu"`` on GPUs, ``"pallas_tpu"`` on TPUs), else the GPU kernel interpreted.

    Raises:
      ValueError: for a platform whose Pallas kernel this build lacks.
    """
    if implementation == "blocked":
        return "blocked"
    backend = jax.default_backend()
    platform = pallas_platform or (backend if backend in ("gpu", "tpu") else None)
    name = "pallas_gpu_interpret" if platform is None else f"pallas_{platform}"
    if name not in KERNELS:
        raise ValueError(
            f"implementation='pallas' has no Pallas kernel for {platform!r} in this build "
            f"(kernels: {sorted(KERNELS)}). Received: pallas_platform={pallas_platform!r} "
            f"on the {backend!r} backend"
        )
    return name


def _kernel_path(
    kernel_name: str,
    query: jax.Array,
    value: jax.Array,
    key: jax.Array,
    value_mask: jax.Array | None,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array | None]:
    """The ``"blocked"`` and ``"pallas"`` implementations: the kernel ``kernel_name`` (see
    :func:`_kernel_name`); the dense weights only when asked for."""
    kernel = get_kernel(kernel_name)
    output, _ = kernel_attention(
        kernel,
        query,
        value,
        key,
        value_mask,
        scores=settings.scores,
        use_causal_mask=settings.use_causal_mask,
        dropout_rate=settings.dropout_rate,
        dropout_rng=settings.dropout_rng,
        matmul_dtype=settings.operand,
    )
    if not settings.weights:
        return output, None
    weights = kernel_weights(
        kernel,
        *_score_operands(query, key, settings),
        value_mask,
        scores=settings.scores,
        use_causal_mask=settings.use_causal_mask,
        dropout_rate=settings.dropout_rate,
        dropout_rng=settings.dropout_rng,
        batch_shape=output.shape[:-2],
    )
    return output, weights


def select_implementation(
    score_mode: str,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    return_attention_scores: bool = False,
    dropout_rate: float = 0.0,
) -> Implementation:
    """The implementation :func:`attention` uses when given ``implementation=None``.

    On a GPU or a TPU (``jax.default_backend()`` is ``"gpu"`` or ``"tpu"``), ``"pallas"``
    (the Triton or the Mosaic kernel) for ``"dot"`` without the weights requested, dropout
    or not (the kernels draw their mask in-tile; ``dropout_rate`` changes no choice).
    Elsewhere, and for the other cases there, by problem size as follows.

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
    del dropout_rate  # every implementation has dropout: it changes no choice
    if return_attention_scores:
        return "xla"
    on_accelerator = jax.default_backend() in ("gpu", "tpu")
    if on_accelerator and score_mode == "dot":
        return "pallas"
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
