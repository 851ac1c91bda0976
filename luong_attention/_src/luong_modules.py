"""``flax.linen`` modules for Luong et al. (2015): the attention and the decoder cell.

Thin modules over the pure functions of :mod:`luong_attention._src.luong`: they create the
parameters (named after the paper: ``w_a``, ``v_a``, ``w_p``, ``v_p``, ``w_c``, ``scale``)
and call those functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from luong_attention._src import checks
from luong_attention._src.luong import (
    LuongMode,
    LuongScore,
    attentional_hidden_state,
    check_luong_config,
    check_max_length,
    luong_attend,
)
from luong_attention._src.scores import PrecisionLike

default_kernel_init = nn.initializers.lecun_normal()
# v_a and v_p are vectors: their fan-in is their own length.
default_vector_init = nn.initializers.lecun_normal(in_axis=-1, out_axis=())


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


class LuongAttention(nn.Module):
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
      kernel_init: initializer of the matrices ``w_a``/``w_p``; vector_init: of ``v_a``/``v_p``.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from luong_attention import LuongAttention
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
    dtype: Dtype | None = None,
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
      param_dtype: dtype of ``w_c``; kernel_init: its initializer.
      precision: matmul precision of ``W_c``.

    Example usage::

      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from luong_attention import AttentionalDecoderCell, LuongAttention
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
