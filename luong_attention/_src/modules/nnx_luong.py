"""Thin ``flax.nnx`` counterparts of :class:`LuongAttention` and :class:`AttentionalDecoderCell`.

Same pure functions, same parameter names and shapes as the ``flax.linen`` modules (so a
linen parameter tree copies over one to one); ``nnx`` needs the input sizes up front.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from luong_attention._src.functional.luong import (
    LuongMode,
    LuongScore,
    attentional_hidden_state,
    check_luong_config,
    check_max_length,
)
from luong_attention._src.functional.luong_cell import (
    DecoderState,
    attend_query,
    cell_features,
    decoder_step,
    default_kernel_init,
    default_vector_init,
    init_decoder_state,
    luong_param_shapes,
)
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.scores import PrecisionLike


class LuongAttention(nnx.Module):
    """``flax.nnx`` Luong attention; see :class:`luong_attention.luong.LuongAttention`.

    Args:
      query_features: the query depth ``dq``.
      memory_features: the memory depth ``dm``.
      rngs: an ``nnx.Rngs`` with a ``params`` stream.

    ``score``, ``mode``, ``window``, ``units``, ``max_length``, ``use_scale``, ``dtype``,
    ``param_dtype``, ``precision``, ``kernel_init`` and ``vector_init`` are those of the linen
    module.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from luong_attention import nnx as lnnx
      >>> attn = lnnx.LuongAttention(4, 5, score="concat", rngs=nnx.Rngs(0))
      >>> context, alignment = attn(jnp.ones((2, 4)), jnp.ones((2, 7, 5)))
      >>> context.shape, alignment.shape
      ((2, 5), (2, 7))
    """

    def __init__(
        self,
        query_features: int,
        memory_features: int,
        *,
        score: LuongScore = "general",
        mode: LuongMode = "global",
        window: int | None = None,
        units: int | None = None,
        max_length: int | None = None,
        use_scale: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        vector_init: Initializer = default_vector_init,
        rngs: nnx.Rngs,
    ) -> None:
        check_luong_config(score, mode, window, use_scale=use_scale)
        check_max_length(score, max_length)
        self.query_features, self.memory_features = query_features, memory_features
        self.score, self.mode, self.window = score, mode, window
        self.dtype, self.precision = dtype, precision
        shapes = luong_param_shapes(
            score, mode, query_features, memory_features, units=units, max_length=max_length
        )
        self.param_names = tuple(shapes)
        for name, shape in shapes.items():
            init = vector_init if len(shape) == 1 else kernel_init
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))
        self.scale = nnx.Param(jnp.ones((), param_dtype)) if use_scale else None

    def __call__(
        self,
        query: jax.Array,
        memory: jax.Array,
        memory_mask: jax.Array | None = None,
        *,
        positions: jax.Array | int | None = None,
        source_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """As :meth:`luong_attention.luong.LuongAttention.__call__`."""
        query, memory = jnp.asarray(query), checks.as_float_array("memory", memory)
        dtype = self.dtype or jnp.result_type(query, memory)
        params: dict[str, Any] = {
            name: getattr(self, name)[...].astype(dtype) for name in self.param_names
        }
        if self.scale is not None:
            params["scale"] = self.scale[...]
        return attend_query(
            query.astype(dtype),
            memory.astype(dtype),
            memory_mask,
            positions=positions,
            source_lengths=source_lengths,
            score=self.score,
            mode=self.mode,
            window=self.window,
            precision=self.precision,
            **params,
        )


class AttentionalDecoderCell(nnx.RNNCellBase):
    """``flax.nnx`` Luong decoder cell with input feeding; fits ``nnx.RNN``.

    See :class:`luong_attention.luong.AttentionalDecoderCell`. Build the carry with
    :meth:`initialize_carry` and pass it as ``nnx.RNN(cell)(x, initial_carry=carry)``.

    Args:
      cell: an ``nnx.RNNCellBase`` whose input size is ``input_features + features`` with
        input feeding (``input_features`` without).
      attention: an nnx :class:`LuongAttention` with ``query_features`` = the cell's output.
      features: size of ``h~``; default the cell's ``hidden_features``.
      input_feeding: concatenate ``h~_{t-1}`` to the input, as in linen.
      return_alignment: output ``(h~_t, a_t)`` instead of ``h~_t``, as in linen.
      param_dtype: dtype of ``w_c``.
      precision: matmul precision of ``W_c``.
      kernel_init: initializer of ``w_c``.
      rngs: an ``nnx.Rngs`` with a ``params`` stream.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from luong_attention import nnx as lnnx
      >>> rngs = nnx.Rngs(0)
      >>> attn = lnnx.LuongAttention(8, 4, score="general", rngs=rngs)
      >>> cell = lnnx.AttentionalDecoderCell(nnx.LSTMCell(3 + 8, 8, rngs=rngs), attn, rngs=rngs)
      >>> x, memory = jnp.ones((2, 6, 3)), jnp.ones((2, 5, 4))
      >>> carry = cell.initialize_carry(x[:, 0].shape, memory=memory)
      >>> nnx.RNN(cell)(x, initial_carry=carry).shape
      (2, 6, 8)
    """

    def __init__(
        self,
        cell: nnx.RNNCellBase,
        attention: LuongAttention,
        *,
        features: int | None = None,
        input_feeding: bool = True,
        return_alignment: bool = False,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ) -> None:
        self.cell, self.attention = cell, attention
        self.features = cell_features(cell, features)
        self.input_feeding, self.return_alignment = input_feeding, return_alignment
        self.precision = precision
        shape = (attention.memory_features + attention.query_features, self.features)
        self.w_c = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))

    def __call__(
        self, carry: DecoderState, inputs: jax.Array
    ) -> tuple[DecoderState, jax.Array | tuple[jax.Array, jax.Array]]:
        """One decoder step, as the linen cell's."""

        def hidden_state(context: jax.Array, hidden: jax.Array) -> jax.Array:
            return attentional_hidden_state(
                context, hidden, self.w_c[...], precision=self.precision
            )

        return decoder_step(
            carry,
            inputs,
            self.cell,
            self.attention,
            hidden_state,
            input_feeding=self.input_feeding,
            return_alignment=self.return_alignment,
        )

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: nnx.Rngs | None = None,
        *,
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
    ) -> DecoderState:
        """The initial :class:`DecoderState` (see the linen cell's ``initialize_carry``).

        ``nnx.RNNCellBase`` puts ``rngs`` second, so the memory and mask are keywords here.

        Args:
          input_shape: ``[batch..., input_features]``.
          rngs: passed on to the wrapped cell's ``initialize_carry``; default
            ``nnx.Rngs(carry=0)`` (the default zero carries do not use it).
          memory: ``[batch..., kv_length, memory_depth]`` (required).
          memory_mask: ``[batch..., kv_length]`` or ``None``.
        """
        if memory is None:
            raise ValueError(
                "AttentionalDecoderCell.initialize_carry needs the memory: call "
                "cell.initialize_carry(input_shape, memory=memory, memory_mask=mask) and pass it "
                "as nnx.RNN(cell)(inputs, initial_carry=carry)."
            )
        cell_input = (*input_shape[:-1], input_shape[-1] + self.features * self.input_feeding)
        rngs = nnx.Rngs(carry=0) if rngs is None else rngs
        cell_carry = self.cell.initialize_carry(cell_input, rngs)
        return init_decoder_state(cell_carry, self.features, memory, memory_mask)

    @property
    def num_feature_axes(self) -> int:
        return 1
