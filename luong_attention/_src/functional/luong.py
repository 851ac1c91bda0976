"""Luong et al. (2015) attention as pure functions: scores, local windows, attentional state.

"Effective Approaches to Attention-based Neural Machine Translation" (Luong, Pham, Manning
2015) scores a decoder state ``h_t`` (the *query*) against every encoder state ``h_s`` (the
*memory*) in one of four ways:

* ``"dot"``: ``h_t^T h_s``;
* ``"general"``: ``h_t^T W_a h_s``;
* ``"concat"``: ``v_a^T tanh(W_a [h_t; h_s])``;
* ``"location"``: ``a_t = softmax(W_a h_t)``, one score per source *position*, independent of
  the memory (``W_a`` has a row per position up to a fixed ``max_length``).

The alignment is the softmax of the masked scores, either over the whole source (``"global"``)
or over a window ``[p_t - D, p_t + D]`` (local attention): ``"local-m"`` sets ``p_t = t``, the
decoder step; ``"local-p"`` predicts ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))`` and, *after*
the softmax, multiplies the weights by ``exp(-(s - p_t)^2 / (2 sigma^2))`` with
``sigma = D / 2``, as in the paper (no renormalisation: the weights of a local-p row sum to
less than 1). The context ``c_t = sum_s a_t(s) h_s`` then gives the attentional hidden state
``h~_t = tanh(W_c [c_t; h_t])``.

Shapes: ``query [batch..., q_length, query_depth]``, ``memory [batch..., kv_length,
memory_depth]``, masks ``[batch..., kv_length]``, positions ``[batch..., q_length]``; batch
dims broadcast. Source positions count from 0, so ``p_t`` lies in ``[0, S]``.
Scores and softmax run in ``stats_dtype`` (float32 or wider); masked scores use the core's
Keras fill (:func:`~luong_attention.mask_scores`), so nothing is ever NaN.
"""

from __future__ import annotations

import operator
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from luong_attention._src.functional.luong_local import (
    gaussian_weights,
    length_mask,
    monotonic_positions,
    predictive_positions,
    source_lengths_of,
    window_mask,
)
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.checks import check_param
from luong_attention._src.primitives.masks import as_bool_mask, mask_scores
from luong_attention._src.primitives.scores import (
    PrecisionLike,
    dot_scores,
    resolve_matmul_dtype,
    stats_dtype,
    weighted_sum,
)

LuongScore = Literal["dot", "general", "concat", "location"]
LuongMode = Literal["global", "local-m", "local-p"]
LUONG_SCORES = ("dot", "general", "concat", "location")
"""The ``score`` functions of Luong et al. (2015), section 3.1."""
LUONG_MODES = ("global", "local-m", "local-p")
"""Global attention and the two local modes (monotonic and predictive), sections 3.1-3.2."""

# -- configuration checks ------------------------------------------------------------------


def check_luong_config(
    score: str, mode: str, window: int | None, *, use_scale: bool = False
) -> None:
    """Raises ``ValueError`` for an inconsistent attention configuration.

    ``score`` must be one of :data:`LUONG_SCORES` and ``mode`` one of :data:`LUONG_MODES`;
    a local mode needs an integer ``window`` ``D >= 0`` (``D >= 1`` for ``"local-p"``, whose
    Gaussian has ``sigma = D / 2``) and ``"global"`` takes none; ``use_scale`` goes with
    ``"dot"`` and ``"general"`` only (``v_a``/``W_a`` already carry a scale in the others).
    """
    if score not in LUONG_SCORES:
        raise ValueError(f"score must be one of {LUONG_SCORES}. Received: score={score!r}")
    if mode not in LUONG_MODES:
        raise ValueError(f"mode must be one of {LUONG_MODES}. Received: mode={mode!r}")
    if mode == "global" and window is not None:
        raise ValueError(
            "window is the half-width D of local attention and needs mode='local-m' or "
            f"mode='local-p'. Received: mode='global', window={window!r}"
        )
    if mode != "global":
        minimum = 1 if mode == "local-p" else 0
        if isinstance(window, bool) or not isinstance(window, int) or window < minimum:
            raise ValueError(
                f"mode={mode!r} needs an integer window (half-width D) >= {minimum}. "
                f"Received: window={window!r}"
            )
    if use_scale and score not in ("dot", "general"):
        raise ValueError(
            f"use_scale applies to score='dot' or 'general' only. Received: score={score!r}"
        )


def check_max_length(score: str, max_length: int | None) -> None:
    """``"location"`` needs a positive int ``max_length``; the other scores take none."""
    if score == "location":
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(
                "score='location' needs max_length, a positive int: the number of source "
                f"positions W_a can score. Received: max_length={max_length!r}"
            )
    elif max_length is not None:
        raise ValueError(
            f"max_length is only used with score='location'. Received: score={score!r}, "
            f"max_length={max_length!r}"
        )


def _check_query_memory(query: jax.Array, memory: jax.Array) -> tuple[int, ...]:
    """Checks ranks and batch dims of query and memory; returns the broadcast batch shape."""
    for name, x in (("query", query), ("memory", memory)):
        if x.ndim < 2:
            raise ValueError(
                f"{name} must have rank >= 2, shape [batch..., length, depth]. "
                f"Received: {name}.shape={x.shape}"
            )
    try:
        return jnp.broadcast_shapes(query.shape[:-2], memory.shape[:-2])
    except ValueError as err:
        raise ValueError(
            "query [batch..., Tq, depth_q] and memory [batch..., Tv, depth_m] must have "
            f"broadcastable batch dims. Received: query.shape={query.shape}, "
            f"memory.shape={memory.shape}"
        ) from err


def _check_broadcasts(
    name: str, x: ArrayLike | None, target: tuple[int, ...], pattern: str
) -> None:
    """Raises unless ``x`` (if given) is an integer array broadcasting to ``target``."""
    if x is None:
        return
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    fits = jnp.issubdtype(dtype, jnp.integer) and len(shape) <= len(target)
    fits = fits and all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))
    if not fits:
        raise ValueError(
            f"{name} must be integers of shape {pattern} = {target} (dims may be 1 or left "
            f"out). Received: {name} of shape {shape} and dtype {dtype}"
        )


# -- scores --------------------------------------------------------------------------------


def general_scores(
    query: jax.Array,
    memory: jax.Array,
    w_a: ArrayLike,
    *,
    scale: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Luong "general" scores ``h_t^T W_a h_s``, i.e. :func:`dot_scores` against ``h_s W_a``.

    The query is projected (``h_t W_a^T``) rather than the memory, which is the same number
    and far cheaper for a decoder's single query.

    Args:
      query: ``[batch..., q_length, query_depth]``.
      memory: ``[batch..., kv_length, memory_depth]``.
      w_a: ``[memory_depth, query_depth]``: the keys are ``memory @ w_a``.
      scale: optional scalar multiplying the scores (TFA's ``scale=True``).
      precision: matmul precision.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    check_param("w_a", w_a, (memory.shape[-1], query.shape[-1]), "score='general'")
    projected = jnp.einsum("...qd,md->...qm", query, w_a, precision=precision)
    return dot_scores(projected, memory, scale=scale, precision=precision)


def luong_concat_scores(
    query: jax.Array,
    memory: jax.Array,
    w_a: ArrayLike,
    v_a: ArrayLike,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Luong "concat" scores ``v_a^T tanh(W_a [h_t; h_s])`` (not Keras's weightless concat).

    ``W_a [h_t; h_s]`` is computed as ``h_t W_q + h_s W_m`` with ``W_a = [W_q; W_m]`` split
    along its input rows; it builds a ``[batch..., q_length, kv_length, units]`` intermediate.

    Args:
      query: ``[batch..., q_length, query_depth]``.
      memory: ``[batch..., kv_length, memory_depth]``.
      w_a: ``[query_depth + memory_depth, units]``.
      v_a: ``[units]``.
      precision: matmul precision.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    depth_q, depth_m = query.shape[-1], memory.shape[-1]
    units = check_param("w_a", w_a, (depth_q + depth_m, None), "score='concat'")
    check_param("v_a", v_a, (units,), "score='concat' [units]")
    out = stats_dtype(jnp.result_type(query, memory, w_a, v_a))
    w_a = jnp.asarray(w_a)
    q = jnp.einsum("...qd,du->...qu", query, w_a[:depth_q], precision=precision)
    m = jnp.einsum("...vd,du->...vu", memory, w_a[depth_q:], precision=precision)
    hidden = jnp.tanh(q.astype(out)[..., :, None, :] + m.astype(out)[..., None, :, :])
    return jnp.einsum("...qvu,u->...qv", hidden, jnp.asarray(v_a, out), precision=precision)


def location_scores(
    query: jax.Array,
    w_a: ArrayLike,
    kv_length: int,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Luong "location" scores ``W_a h_t``: one score per source position, no memory.

    Args:
      query: ``[batch..., q_length, query_depth]``.
      w_a: ``[query_depth, max_length]``; only its first ``kv_length`` columns are used.
      kv_length: source length Tv of the memory, at most ``max_length``.
      precision: matmul precision.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    max_length = check_param("w_a", w_a, (query.shape[-1], None), "score='location'")
    if kv_length > max_length:
        raise ValueError(
            f"score='location' scores at most max_length={max_length} source positions. "
            f"Received: memory of length {kv_length}"
        )
    out = stats_dtype(jnp.result_type(query, w_a))
    w_a = jnp.asarray(w_a)[:, :kv_length]
    return jnp.einsum(
        "...qd,dv->...qv", query, w_a, precision=precision, preferred_element_type=out
    )


def luong_scores(
    query: jax.Array,
    memory: jax.Array,
    *,
    score: LuongScore = "dot",
    w_a: ArrayLike | None = None,
    v_a: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Dispatches to the paper's score functions (see the module docstring).

    Args:
      query: ``[batch..., q_length, query_depth]``.
      memory: ``[batch..., kv_length, memory_depth]`` (for ``"dot"`` the two depths must be
        equal).
      score: ``"dot"``, ``"general"``, ``"concat"`` or ``"location"``.
      w_a: the score's matrix (see :func:`general_scores`, :func:`luong_concat_scores`,
        :func:`location_scores`).
      v_a: the ``"concat"`` score's vector (see :func:`luong_concat_scores`).
      scale: optional scalar for ``"dot"`` and ``"general"``.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    if score == "dot":
        if query.shape[-1] != memory.shape[-1]:
            raise ValueError(
                "score='dot' needs query and memory of the same depth; use score='general' "
                f"otherwise. Received: query.shape={query.shape}, memory.shape={memory.shape}"
            )
        return dot_scores(query, memory, scale=scale, precision=precision)
    if score == "general":
        return general_scores(query, memory, w_a, scale=scale, precision=precision)
    if score == "concat":
        return luong_concat_scores(query, memory, w_a, v_a, precision=precision)
    return location_scores(query, w_a, memory.shape[-2], precision=precision)


def luong_attend(
    query: ArrayLike,
    memory: ArrayLike,
    memory_mask: ArrayLike | None = None,
    *,
    score: LuongScore = "dot",
    mode: LuongMode = "global",
    window: int | None = None,
    positions: ArrayLike | None = None,
    source_lengths: ArrayLike | None = None,
    w_a: ArrayLike | None = None,
    v_a: ArrayLike | None = None,
    w_p: ArrayLike | None = None,
    v_p: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
    """Luong global or local attention of every query over the memory.

    Args:
      query: decoder states ``h_t``, ``[batch..., q_length, query_depth]``.
      memory: encoder states ``h_s``, ``[batch..., kv_length, memory_depth]``.
      memory_mask: ``[batch..., kv_length]`` (non-zero = attend) or ``None``.
      score: ``"dot"``, ``"general"``, ``"concat"`` or ``"location"``.
      mode: ``"global"``, ``"local-m"`` or ``"local-p"``.
      window: the half-width ``D`` of a local mode (``None`` for global).
      positions: local-m decoder steps ``t``, int, broadcastable to ``[batch..., q_length]``;
        default ``arange(q_length)``. Centres are clipped to ``S - 1``.
      source_lengths: ``S`` per example, int ``[batch...]``; masks positions ``>= S`` too.
        Default: the number of kept entries of ``memory_mask`` (right padding), else Tv.
      w_a: the score's matrix (see :func:`luong_scores`).
      v_a: the ``"concat"`` score's vector (see :func:`luong_scores`).
      scale: optional scalar for ``"dot"`` and ``"general"`` (see :func:`luong_scores`).
      w_p: local-p's matrix, ``[query_depth, units]``.
      v_p: local-p's vector, ``[units]``.
      precision: matmul precision.

    Returns:
      ``(context, alignment)``: ``context [batch..., q_length, memory_depth]`` and
      ``alignment [batch..., q_length, kv_length]``, in the dtype of ``query``/``memory``.
      Weights outside the window or the mask are exactly 0; local-p rows are multiplied by
      the Gaussian after the softmax and so sum to less than 1.
    """
    check_luong_config(score, mode, window)
    query = checks.as_float_array("query", query)
    memory = checks.as_float_array("memory", memory)
    batch_shape = _check_query_memory(query, memory)
    q_length, kv_length = query.shape[-2], memory.shape[-2]
    mask = as_bool_mask(checks.check_mask("memory_mask", memory_mask, batch_shape, kv_length, "Tv"))
    _check_broadcasts("source_lengths", source_lengths, batch_shape, "[batch...]")
    _check_broadcasts("positions", positions, (*batch_shape, q_length), "[batch..., Tq]")
    lengths = source_lengths_of(mask, source_lengths, kv_length)
    if source_lengths is not None:
        keep = length_mask(lengths, kv_length)
        mask = keep if mask is None else jnp.logical_and(mask, keep)
    scores = luong_scores(
        query, memory, score=score, w_a=w_a, v_a=v_a, scale=scale, precision=precision
    )
    mask = None if mask is None else mask[..., None, :]
    gaussian = None
    if mode != "global":
        if mode == "local-m":
            steps = jnp.arange(q_length) if positions is None else jnp.asarray(positions)
            centres = monotonic_positions(steps, lengths)
        else:
            centres = predictive_positions(query, w_p, v_p, lengths, precision=precision)
            gaussian = gaussian_weights(centres, kv_length, operator.index(window))
        local = window_mask(centres, kv_length, operator.index(window))
        mask = local if mask is None else jnp.logical_and(mask, local)
    weights = jax.nn.softmax(mask_scores(scores, mask), axis=-1)
    if gaussian is not None:
        weights = weights * gaussian.astype(weights.dtype)
    dtype = jnp.result_type(query, memory)
    memory = memory.astype(resolve_matmul_dtype(dtype))
    context = weighted_sum(weights, memory, precision=precision)
    return context.astype(dtype), weights.astype(dtype)


def attentional_hidden_state(
    context: jax.Array,
    hidden: jax.Array,
    w_c: ArrayLike,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
    """The attentional hidden state ``h~_t = tanh(W_c [c_t; h_t])`` (no bias, as the paper).

    Args:
      context: ``c_t``, ``[batch..., memory_depth]`` (or ``[batch..., q_length, memory_depth]``).
      hidden: ``h_t``, ``[batch..., hidden_depth]`` (same leading dims as ``context``).
      w_c: ``[memory_depth + hidden_depth, features]``.
      precision: matmul precision.

    Returns:
      ``[batch..., features]`` in the promoted dtype of the inputs.
    """
    check_param(
        "w_c", w_c, (context.shape[-1] + hidden.shape[-1], None), "the attentional hidden state"
    )
    dtype = jnp.result_type(context, hidden)
    joined = jnp.concatenate([context.astype(dtype), hidden.astype(dtype)], axis=-1)
    return jnp.tanh(jnp.einsum("...i,io->...o", joined, w_c, precision=precision))
