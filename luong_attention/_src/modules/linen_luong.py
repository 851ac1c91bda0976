"""``flax.linen`` modules for Luong et al. (2015): the attention and the decoder cell.

Thin modules over the pure functions of :mod:`luong_attention._src.functional.luong` and
:mod:`~luong_attention._src.functional.luong_cell`: they create the parameters (named after the
paper: ``w_a``, ``v_a``, ``w_p``, ``v_p``, ``w_c``, ``scale``) and call those functions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
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
from luong_attention._src.modules.call import check_sequence_fields
from luong_attention._src.modules.linen_sequence import SequenceParallelFields
from luong_attention._src.parallel.luong import luong_sequence_parallel
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.scores import PrecisionLike


class LuongAttention(SequenceParallelFields):
    """Luong et al. (2015) attention: the four scores, global/local-m/local-p.

    Attributes:
      score: ``"dot"``, ``"general"`` (``h_t^T W_a h_s``), ``"concat"``
        (``v_a^T tanh(W_a [h_t; h_s])``) or ``"location"`` (``softmax(W_a h_t)``).
      mode: ``"global"``, ``"local-m"`` (window centred on the decoder step) or ``"local-p"``
        (predicted centre, Gaussian factor applied after the softmax, no renormalisation).
      window: the half-width ``D`` of the local window (``None`` for global).
      units: hidden size of ``"concat"`` and of local-p's ``W_p``; default: the query depth.
      max_length: the number of source positions ``"location"`` can score.
      use_scale: a learned scalar ``scale`` (init 1.0) multiplying ``"dot"``/``"general"``
        scores, as TFA's ``scale=True``.
      dtype: computation dtype (``None``: promote the query and memory dtypes); the
        softmax runs in float32 or wider.
      param_dtype: dtype of the parameters.
      precision: matmul precision.
      kernel_init: initializer of the matrices ``w_a``/``w_p``.
      vector_init: initializer of the vectors ``v_a``/``v_p``.
      mesh: keyword-only, as the four below. With ``sequence_axis``, global
        ``"dot"``/``"general"`` attention of a query sequence runs sequence parallel over
        this mesh (:func:`luong_sequence_parallel`); the call then returns
        ``(context, None)``: the alignment ``[Tq, Tv]`` is never built.
      sequence_axis: the axis of ``mesh`` to split the sequences over.
      batch_axis: passed on as ``batch_axis`` of :func:`luong_sequence_parallel`.
      sequence_strategy: passed on as its ``strategy``.
      sequence_layout: passed on as its ``layout``.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from luong_attention.luong import LuongAttention
      >>> attn = LuongAttention(score="general", mode="local-p", window=2)
      >>> h_t, memory = jnp.ones((2, 3, 4)), jnp.ones((2, 7, 5))
      >>> variables = attn.init(jax.random.key(0), h_t, memory)
      >>> context, alignment = attn.apply(variables, h_t, memory)
      >>> context.shape, alignment.shape
      ((2, 3, 5), (2, 3, 7))
    """

    score: LuongScore = "general"
    mode: LuongMode = "global"
    window: int | None = None
    units: int | None = None
    max_length: int | None = None
    use_scale: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    vector_init: Initializer = default_vector_init

    def __post_init__(self) -> None:
        check_luong_config(self.score, self.mode, self.window, use_scale=self.use_scale)
        check_sequence_fields(self.mesh, self.sequence_axis)
        if self.sequence_axis is not None and (
            self.mode != "global" or self.score not in ("dot", "general")
        ):
            raise ValueError(
                "LuongAttention(sequence_axis=...) supports mode='global' with score='dot' or "
                f"'general'. Received: score={self.score!r}, mode={self.mode!r}"
            )
        check_max_length(self.score, self.max_length)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        memory: jax.Array,
        memory_mask: jax.Array | None = None,
        *,
        positions: jax.Array | int | None = None,
        source_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attends the query (one step or a sequence) over the memory.

        Args:
          query: ``[batch..., query_depth]`` (one decoder step, rank of ``memory`` minus 1)
            or ``[batch..., q_length, query_depth]`` (a sequence, same rank as ``memory``).
          memory: ``[batch..., kv_length, memory_depth]``.
          memory_mask: ``[batch..., kv_length]`` (non-zero = attend) or ``None``.
          positions: local-m decoder steps ``t``: for one step an int or int ``[batch...]``
            (required), for a sequence ``[batch..., q_length]`` (default ``arange(q_length)``).
          source_lengths: ``S`` per example, int ``[batch...]`` (default: the mask's count).

        Returns:
          ``(context, alignment)``: ``[batch..., memory_depth]`` and ``[batch..., kv_length]``
          for one step, ``[batch..., q_length, memory_depth]`` and ``[batch..., q_length,
          kv_length]`` for a sequence.
        """
        query, memory = jnp.asarray(query), checks.as_float_array("memory", memory)
        dtype = self.dtype or jnp.result_type(query, memory)
        params = self._params(query.shape[-1], memory.shape[-1], dtype)
        if self.sequence_axis is not None:
            context = luong_sequence_parallel(
                query.astype(dtype),
                memory.astype(dtype),
                memory_mask,
                score=self.score,
                source_lengths=source_lengths,
                mesh=self.mesh,
                axis_name=self.sequence_axis,
                batch_axis=self.batch_axis,
                strategy=self.sequence_strategy,
                layout=self.sequence_layout,
                **params,
            )
            return context, None
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

    def _params(self, query_depth: int, memory_depth: int, dtype: Dtype) -> dict[str, Any]:
        """Creates (or fetches) this configuration's parameters, cast to ``dtype``."""
        shapes = luong_param_shapes(
            self.score,
            self.mode,
            query_depth,
            memory_depth,
            units=self.units,
            max_length=self.max_length,
        )
        params = {
            name: self.param(
                name,
                self.vector_init if len(shape) == 1 else self.kernel_init,
                shape,
                self.param_dtype,
            ).astype(dtype)
            for name, shape in shapes.items()
        }
        if self.use_scale:
            params["scale"] = self.param("scale", nn.initializers.ones, (), self.param_dtype)
        return params


class AttentionalDecoderCell(nn.RNNCellBase):
    """A Luong decoder step around any Flax cell, with input feeding; fits ``nn.RNN``.

    One step: ``h_t = cell([x_t; h~_{t-1}])`` (input feeding), ``c_t, a_t = attention(h_t,
    memory)``, ``h~_t = tanh(W_c [c_t; h_t])``. The memory and its mask travel in the carry
    (:class:`DecoderState`), so build the carry with :meth:`initialize_carry` and pass it to
    ``nn.RNN(cell)(x, initial_carry=carry)`` or to ``nn.scan``.

    Attributes:
      cell: the wrapped ``nn.RNNCellBase`` (``nn.LSTMCell(H)``, ``nn.GRUCell(H)``, ...);
        its output is ``h_t``.
      attention: a :class:`LuongAttention`.
      features: size of ``h~_t``; default ``cell.features``.
      input_feeding: concatenate ``h~_{t-1}`` to the input (the paper's input feeding).
      return_alignment: output ``(h~_t, a_t)`` instead of ``h~_t``; under ``nn.RNN`` the
        alignments stack into an alignment history ``[batch..., Tq, kv_length]``.
      param_dtype: dtype of ``w_c``.
      kernel_init: initializer of ``w_c``.
      precision: matmul precision of ``W_c``.

    Example usage::

      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from luong_attention.luong import AttentionalDecoderCell, LuongAttention
      >>> cell = AttentionalDecoderCell(nn.LSTMCell(8), LuongAttention(score="general"))
      >>> x, memory = jnp.ones((2, 6, 3)), jnp.ones((2, 5, 4))
      >>> mask = jnp.arange(5) < jnp.array([[5], [3]])
      >>> carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape, memory, mask)
      >>> rnn = nn.RNN(cell)
      >>> variables = rnn.init(jax.random.key(1), x, initial_carry=carry)
      >>> rnn.apply(variables, x, initial_carry=carry).shape
      (2, 6, 8)
    """

    cell: nn.RNNCellBase
    attention: LuongAttention
    features: int | None = None
    input_feeding: bool = True
    return_alignment: bool = False
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(
        self, carry: DecoderState, inputs: jax.Array
    ) -> tuple[DecoderState, jax.Array | tuple[jax.Array, jax.Array]]:
        """One decoder step.

        Args:
          carry: a :class:`DecoderState`.
          inputs: ``[batch..., input_features]``.

        Returns:
          ``(new_carry, h~_t)`` with ``h~_t [batch..., features]``, or ``(new_carry, (h~_t,
          a_t))`` with ``a_t [batch..., kv_length]`` when ``return_alignment``.
        """

        def hidden_state(context: jax.Array, hidden: jax.Array) -> jax.Array:
            shape = (context.shape[-1] + hidden.shape[-1], self._features())
            w_c = self.param("w_c", self.kernel_init, shape, self.param_dtype)
            return attentional_hidden_state(context, hidden, w_c, precision=self.precision)

        return decoder_step(
            carry,
            inputs,
            self.cell,
            self.attention,
            hidden_state,
            input_feeding=self.input_feeding,
            return_alignment=self.return_alignment,
        )

    @nn.nowrap
    def initialize_carry(
        self,
        rng: jax.Array,
        input_shape: tuple[int, ...],
        memory: jax.Array | None = None,
        memory_mask: jax.Array | None = None,
    ) -> DecoderState:
        """The initial carry: the wrapped cell's carry, ``h~_0 = 0``, the memory and mask.

        Args:
          rng: PRNG key for the wrapped cell's ``initialize_carry``.
          input_shape: ``[batch..., input_features]``, the shape of one step's input.
          memory: ``[batch..., kv_length, memory_depth]`` (required).
          memory_mask: ``[batch..., kv_length]`` or ``None``.
        """
        if memory is None:
            raise ValueError(
                "AttentionalDecoderCell.initialize_carry needs the memory: call "
                "cell.initialize_carry(rng, input_shape, memory, memory_mask) and pass the "
                "result as nn.RNN(cell)(inputs, initial_carry=carry)."
            )
        features = self._features()
        cell_input = (*input_shape[:-1], input_shape[-1] + features * self.input_feeding)
        cell_carry = self.cell.initialize_carry(rng, cell_input)
        return init_decoder_state(cell_carry, features, memory, memory_mask)

    @nn.nowrap
    def _features(self) -> int:
        """The size of ``h~``: ``features`` or the wrapped cell's ``features``."""
        return cell_features(self.cell, self.features)

    @property
    def num_feature_axes(self) -> int:
        return 1
