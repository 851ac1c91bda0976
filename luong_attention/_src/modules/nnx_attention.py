"""``Attention`` for ``flax.nnx``: the linen module's fields, parameters and call, as nnx."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype
from jax.sharding import Mesh

from luong_attention._src.functional.attention import Implementation, ScoreMode
from luong_attention._src.modules.call import CallSettings, call_attention
from luong_attention._src.parallel.layout import Layout
from luong_attention._src.parallel.sequence import Strategy
from luong_attention._src.primitives.scores import PrecisionLike

DropoutRngs = nnx.Rngs | nnx.RngStream | jax.Array


class Attention(nnx.Module):
    """``flax.nnx`` twin of :class:`luong_attention.Attention` (``keras.layers.Attention``).

    The same constructor arguments, Keras config (:func:`luong_attention.keras_compat.keras_config`;
    :func:`~luong_attention.keras_compat.from_keras_config` with ``module_type=Attention``
    builds one), parameters and numbers as the linen module. Parameters exist only when used,
    as Keras's weights: ``scale`` (``nnx.Param``, shape ``()``, 1.0) when ``use_scale``,
    ``concat_score_weight`` when ``score_mode="concat"``; otherwise the attribute is ``None``.

    Every argument but ``rngs`` is the linen module's field of that name.

    Args:
      use_scale: learn a scalar ``scale`` that multiplies the scores.
      score_mode: ``"dot"`` or ``"concat"``.
      dropout: fraction of attention weights dropped when ``training=True``.
      seed: optional integer folded into the drawn dropout key.
      dtype: computation dtype of the inputs (``None``: infer from the inputs).
      param_dtype: dtype of ``scale`` and ``concat_score_weight``.
      precision: matmul precision.
      implementation: ``None`` (pick by problem size and backend), ``"xla"``, ``"blocked"``
        or ``"pallas"``; see :func:`~luong_attention.attention`.
      matmul_dtype: operand dtype of the attention matmuls (``None``: ``dtype``'s).
      mesh: with ``sequence_axis``, run sequence parallel over this mesh.
      sequence_axis: the axis of ``mesh`` to split the sequences over.
      batch_axis: an optional second mesh axis to split the first batch dim over.
      sequence_strategy: ``"ring"``, ``"replicated"`` or ``None`` (pick by the lengths).
      sequence_layout: ``"contiguous"`` or ``"zigzag"`` (ring only).
      rngs: where dropout keys come from when a call gives none: an ``nnx.Rngs`` (its
        ``"dropout"`` stream, else ``"default"``) or an ``nnx.RngStream``, forked as
        ``nnx.Dropout`` forks it; or ``None``.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from luong_attention import nnx as lnnx
      >>> layer = lnnx.Attention(use_scale=True, dropout=0.1, rngs=nnx.Rngs(dropout=0))
      >>> q, v = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6))
      >>> out, weights = layer([q, v, q[:, :1].repeat(5, 1)], return_attention_scores=True)
      >>> out.shape, weights.shape, layer.scale.shape
      ((2, 3, 6), (2, 3, 5), ())
      >>> layer([q, v, q[:, :1].repeat(5, 1)], training=True).shape
      (2, 3, 6)
    """

    def __init__(
        self,
        use_scale: bool = False,
        score_mode: ScoreMode = "dot",
        dropout: float = 0.0,
        seed: int | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        implementation: Implementation | None = None,
        matmul_dtype: Dtype | None = None,
        *,
        mesh: Mesh | None = None,
        sequence_axis: str | None = None,
        batch_axis: str | None = None,
        sequence_strategy: Strategy | None = None,
        sequence_layout: Layout = "contiguous",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ) -> None:
        self.use_scale, self.score_mode, self.dropout, self.seed = (
            use_scale,
            score_mode,
            dropout,
            seed,
        )
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.implementation, self.matmul_dtype = implementation, matmul_dtype
        self.mesh, self.sequence_axis, self.batch_axis = mesh, sequence_axis, batch_axis
        self.sequence_strategy, self.sequence_layout = sequence_strategy, sequence_layout
        CallSettings.of(self)  # checks the arguments
        self.scale = nnx.Param(jnp.ones((), param_dtype)) if use_scale else None
        self.concat_score_weight = (
            nnx.Param(jnp.ones((), param_dtype)) if score_mode == "concat" else None
        )
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs["dropout"]
        self.rngs = nnx.data(None if rngs is None else rngs.fork())

    def __call__(
        self,
        inputs: Sequence[jax.Array],
        mask: Sequence[jax.Array | None] | None = None,
        training: bool = False,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
        *,
        rngs: DropoutRngs | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Attends ``query`` over ``value``, as :meth:`luong_attention.Attention.__call__`.

        Args:
          inputs: ``[query [batch..., Tq, dim], value [batch..., Tv, dim_v]]`` with an
            optional ``key [batch..., Tv, dim]``, as the linen module's.
          mask: ``[query_mask, value_mask]`` (either may be ``None``), as the linen module's.
          training: apply dropout, as the linen module's.
          return_attention_scores: also return the weights, as the linen module's.
          use_causal_mask: the linen module's causal mask.
          rngs: the dropout key (a key array, used as the linen module uses the key it draws
            from its ``"dropout"`` stream), or an ``nnx.Rngs``/``nnx.RngStream`` to draw it
            from; ``None``: draw from the constructor's ``rngs``.

        Returns:
          ``output [batch..., Tq, dim_v]`` or ``(output, weights [batch..., Tq, Tv])``.
        """
        return call_attention(
            CallSettings.of(self),
            inputs,
            mask,
            training=training,
            return_attention_scores=return_attention_scores,
            use_causal_mask=use_causal_mask,
            scale=None if self.scale is None else self.scale[...],
            concat_score_weight=(
                None if self.concat_score_weight is None else self.concat_score_weight[...]
            ),
            draw_dropout_rng=functools.partial(self._dropout_rng, rngs),
        )

    def _dropout_rng(self, rngs: DropoutRngs | None) -> jax.Array:
        """The dropout key from the call's ``rngs``, else from the constructor's stream."""
        source = self.rngs if rngs is None else rngs
        if source is None:
            raise ValueError(
                f"Attention(dropout={self.dropout}) called with training=True needs a dropout "
                "key: pass rngs=nnx.Rngs(dropout=...) to the constructor or to the call."
            )
        if isinstance(source, nnx.Rngs):
            return source["dropout"]()
        if isinstance(source, nnx.RngStream):
            return source()
        if isinstance(source, jax.Array):
            return source
        raise TypeError(
            "rngs must be an nnx.Rngs, an nnx.RngStream or a key array. "
            f"Received: rngs of type {type(source).__name__}"
        )
