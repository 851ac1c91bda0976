"""The Luong decoder step and parameter layout as pure functions, shared by the linen and nnx
modules (:mod:`luong_attention._src.modules`): parameter shapes, one-step attention, the
decoder carry and one input-feeding step. Nothing here creates parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from luong_attention._src.functional.luong import luong_attend
from luong_attention._src.primitives import checks

default_kernel_init = jax.nn.initializers.lecun_normal()


# v_a and v_p are vectors: their fan-in is their own length.
default_vector_init = jax.nn.initializers.lecun_normal(in_axis=-1, out_axis=())


def luong_param_shapes(
    score: str,
    mode: str,
    query_depth: int,
    memory_depth: int,
    *,
    units: int | None = None,
    max_length: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a Luong attention (``scale`` excluded).

    ``units`` (default ``query_depth``) sizes the ``"concat"`` and ``"local-p"`` hidden layers.
    """
    units = query_depth if units is None else units
    shapes: dict[str, tuple[int, ...]] = {}
    if score == "general":
        shapes["w_a"] = (memory_depth, query_depth)
    elif score == "concat":
        shapes["w_a"] = (query_depth + memory_depth, units)
        shapes["v_a"] = (units,)
    elif score == "location":
        shapes["w_a"] = (query_depth, max_length)
    if mode == "local-p":
        shapes["w_p"] = (query_depth, units)
        shapes["v_p"] = (units,)
    return shapes


def attend_query(
    query: jax.Array,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    positions: jax.Array | int | None = None,
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """:func:`luong_attend` for one decoder step or a sequence of queries.

    Args:
      query: ``[batch..., query_depth]`` (one step: rank of ``memory`` minus 1) or
        ``[batch..., q_length, query_depth]`` (a sequence: the rank of ``memory``).
      memory: ``[batch..., kv_length, memory_depth]``.
      memory_mask: ``[batch..., kv_length]`` or ``None``.
      positions: local-m steps: an int or int ``[batch...]`` for one step (required there),
        ``[batch..., q_length]`` for a sequence.
      **kwargs: the other arguments of :func:`luong_attend`.

    Returns:
      ``(context, alignment)`` without the ``q_length`` axis for one step.
    """
    if query.ndim == memory.ndim:
        return luong_attend(query, memory, memory_mask, positions=positions, **kwargs)
    if query.ndim != memory.ndim - 1:
        raise ValueError(
            "query must be [batch..., depth_q] (one step) or [batch..., Tq, depth_q] (a "
            "sequence), with the batch dims of memory [batch..., Tv, depth_m]. Received: "
            f"query.shape={query.shape}, memory.shape={memory.shape}"
        )
    if kwargs.get("mode") == "local-m" and positions is None:
        raise ValueError(
            "mode='local-m' with a single query [batch..., depth] needs its decoder step: "
            "pass positions=t (int or int [batch...])."
        )
    if positions is not None:
        positions = jnp.asarray(positions)[..., None]
    context, alignment = luong_attend(
        query[..., None, :], memory, memory_mask, positions=positions, **kwargs
    )
    return context[..., 0, :], alignment[..., 0, :]


class DecoderState(NamedTuple):
    """The carry of :class:`AttentionalDecoderCell` (a pytree, fine for ``nn.RNN``/``scan``).

    Attributes:
      cell: the wrapped cell's carry.
      h_tilde: the previous attentional hidden state ``h~_{t-1}``, ``[batch..., features]``.
      memory: the encoder states, ``[batch..., kv_length, memory_depth]``.
      memory_mask: bool ``[batch..., kv_length]`` (all ``True`` when none was given).
      step: int32 ``[batch...]``, the decoder step ``t`` (used by local-m).
    """

    cell: Any
    h_tilde: jax.Array
    memory: jax.Array
    memory_mask: jax.Array
    step: jax.Array


def init_decoder_state(
    cell_carry: Any,
    features: int,
    memory: jax.Array,
    memory_mask: jax.Array | None = None,
    *,
    dtype: DTypeLike | None = None,
) -> DecoderState:
    """The initial :class:`DecoderState`: zero ``h~_0``, step 0, and the memory and mask.

    Args:
      cell_carry: the wrapped cell's initial carry.
      features: the size of ``h~``.
      memory: ``[batch..., kv_length, memory_depth]``.
      memory_mask: ``[batch..., kv_length]`` or ``None`` (everything attended).
      dtype: dtype of ``h~_0`` (default: the memory's).
    """
    memory = checks.as_float_array("memory", memory)
    batch_shape, kv_length = memory.shape[:-2], memory.shape[-2]
    mask = checks.check_mask("memory_mask", memory_mask, batch_shape, kv_length, "Tv")
    mask = (
        jnp.ones((*batch_shape, kv_length), bool)
        if mask is None
        else jnp.broadcast_to(mask != 0, (*batch_shape, kv_length))
    )
    return DecoderState(
        cell=cell_carry,
        h_tilde=jnp.zeros((*batch_shape, features), dtype or memory.dtype),
        memory=memory,
        memory_mask=mask,
        step=jnp.zeros(batch_shape, jnp.int32),
    )


def decoder_step(
    carry: DecoderState,
    inputs: jax.Array,
    cell: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    attention: Callable[..., tuple[jax.Array, jax.Array]],
    hidden_state: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    input_feeding: bool = True,
    return_alignment: bool = False,
) -> tuple[DecoderState, jax.Array | tuple[jax.Array, jax.Array]]:
    """One Luong decoder step: ``h_t = cell([x_t; h~_{t-1}])``, ``c_t, a_t = attention(h_t)``,
    ``h~_t = hidden_state(c_t, h_t)`` (i.e. ``tanh(W_c [c_t; h_t])``).

    Args:
      carry: a :class:`DecoderState`.
      inputs: ``[batch..., input_features]``.
      cell: ``(cell_carry, x) -> (cell_carry, h_t)``.
      attention: ``(h_t, memory, memory_mask, positions=step) -> (c_t, a_t)``.
      hidden_state: ``(c_t, h_t) -> h~_t``, see :func:`attentional_hidden_state`.
      input_feeding: concatenate ``h~_{t-1}`` to ``inputs``.
      return_alignment: also output ``a_t``.

    Returns:
      ``(new_carry, h~_t)`` or ``(new_carry, (h~_t, a_t))``.
    """
    if not isinstance(carry, DecoderState):
        raise TypeError(
            "AttentionalDecoderCell's carry must be a DecoderState: build it with "
            "cell.initialize_carry(..., memory, memory_mask). Received: "
            f"{type(carry).__name__}"
        )
    x = inputs
    if input_feeding:
        x = jnp.concatenate([inputs, carry.h_tilde.astype(inputs.dtype)], axis=-1)
    cell_carry, hidden = cell(carry.cell, x)
    context, alignment = attention(hidden, carry.memory, carry.memory_mask, positions=carry.step)
    h_tilde = hidden_state(context, hidden).astype(carry.h_tilde.dtype)
    new_carry = DecoderState(cell_carry, h_tilde, carry.memory, carry.memory_mask, carry.step + 1)
    return new_carry, (h_tilde, alignment) if return_alignment else h_tilde


def cell_features(cell: Any, features: int | None = None) -> int:
    """The size of ``h~``: ``features``, else the cell's ``features`` (linen) or
    ``hidden_features`` (nnx)."""
    if features is None:
        features = getattr(cell, "features", getattr(cell, "hidden_features", None))
    if isinstance(features, bool) or not isinstance(features, int):
        raise ValueError(
            "AttentionalDecoderCell needs features (the size of h~) when the wrapped cell has "
            "no int 'features' (linen) or 'hidden_features' (nnx) attribute. Received: "
            f"features={features!r}, cell {type(cell).__name__}"
        )
    return features
