"""``Attention``: a thin ``flax.linen`` module over :func:`attention`, Keras-compatible."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from luong_attention._src.functional.attention import Implementation, ScoreMode
from luong_attention._src.modules.call import CallSettings, call_attention
from luong_attention._src.modules.linen_sequence import SequenceParallelFields
from luong_attention._src.primitives.scores import PrecisionLike


class Attention(SequenceParallelFields):
    """Dot-product (Luong-style) attention, a drop-in for ``keras.layers.Attention``.

    Parameters are named, shaped and initialised as Keras's weights, and exist only when used:
    ``scale`` (shape ``()``, 1.0) when ``use_scale``, ``concat_score_weight`` (shape ``()``,
    1.0) when ``score_mode="concat"``.

    Attributes:
      use_scale: learn a scalar that multiplies the scores (initialised to 1.0, not
        ``1/sqrt(depth)``).
      score_mode: ``"dot"`` or ``"concat"``.
      dropout: fraction of attention weights dropped when ``training=True``, in ``[0, 1)``.
      seed: optional integer folded into the key drawn from the ``"dropout"`` rng stream, so
        that layers given different seeds draw different masks from the same stream and a
        (stream key, seed) pair always gives the same mask. It does *not* replace the
        stream: a training call with dropout still needs ``rngs={"dropout": key}``.
      dtype: computation dtype of the inputs (``None``: infer from the inputs). The softmax
        always runs in float32 or wider.
      param_dtype: dtype of ``scale`` and ``concat_score_weight``.
      precision: matmul precision.
      implementation: ``None`` (pick by problem size and backend), ``"xla"``, ``"blocked"``
        or ``"pallas"``; see :func:`attention`. Not part of the Keras config: it changes
        speed and memory, not the numbers.
      matmul_dtype: operand dtype of the attention matmuls (``None``: ``dtype``'s, or
        float32 for bfloat16/float16 on a CPU without matrix units for them); see
        :func:`attention`. Not part of the Keras config either.
      mesh: keyword-only, as the four below. With ``sequence_axis``, run
        :func:`sequence_parallel_attention` over this mesh (both or neither; the call must
        then be inside ``jax.jit`` or eager with inputs on that mesh). No dropout and no
        returned weights there (``ValueError``); ``matmul_dtype`` is not used there.
      sequence_axis: the axis of ``mesh`` to split the sequences over.
      batch_axis: an optional second mesh axis to split the first batch dim over
        (``batch_axis`` of :func:`sequence_parallel_attention`).
      sequence_strategy: ``"ring"``, ``"replicated"`` or ``None`` (pick by the lengths);
        ``strategy`` of :func:`sequence_parallel_attention`.
      sequence_layout: ``"contiguous"`` or ``"zigzag"`` (ring only); ``layout`` of
        :func:`sequence_parallel_attention`.

    Example usage::

      >>> import jax, jax.numpy as jnp
      >>> from luong_attention import Attention
      >>> layer = Attention(use_scale=True)
      >>> q, v = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))
      >>> variables = layer.init(jax.random.key(0), [q, v])
      >>> out, weights = layer.apply(variables, [q, v], return_attention_scores=True)
      >>> out.shape, weights.shape
      ((2, 3, 4), (2, 3, 5))
    """

    use_scale: bool = False
    score_mode: ScoreMode = "dot"
    dropout: float = 0.0
    seed: int | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    implementation: Implementation | None = None
    matmul_dtype: Dtype | None = None

    def __post_init__(self) -> None:
        CallSettings.of(self)  # checks the fields
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs: Sequence[jax.Array],
        mask: Sequence[jax.Array | None] | None = None,
        training: bool = False,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Attends ``query`` over ``value`` (keyed by ``key``, default ``value``).

        Args:
          inputs: ``[query, value]`` or ``[query, value, key]`` with ``query
            [batch..., Tq, dim]``, ``value [batch..., Tv, dim_v]``, ``key [batch..., Tv, dim]``.
          mask: ``None`` or ``[query_mask, value_mask]`` (a third entry is ignored, as in
            Keras); entries may be ``None``; shapes ``[batch..., Tq]`` and ``[batch..., Tv]``.
          training: apply dropout (needs the ``"dropout"`` rng stream when ``dropout > 0``).
          return_attention_scores: also return the weights ``[batch..., Tq, Tv]``.
          use_causal_mask: top-left aligned causal mask, as Keras.

        Returns:
          ``output [batch..., Tq, dim_v]`` or ``(output, weights)``.
        """
        scale = (
            self.param("scale", nn.initializers.ones, (), self.param_dtype)
            if self.use_scale
            else None
        )
        concat_score_weight = (
            self.param("concat_score_weight", nn.initializers.ones, (), self.param_dtype)
            if self.score_mode == "concat"
            else None
        )
        return call_attention(
            CallSettings.of(self),
            inputs,
            mask,
            training=training,
            return_attention_scores=return_attention_scores,
            use_causal_mask=use_causal_mask,
            scale=scale,
            concat_score_weight=concat_score_weight,
            draw_dropout_rng=self._dropout_rng,
        )

    def _dropout_rng(self) -> jax.Array:
        """Draws the dropout key from the ``"dropout"`` stream (``seed`` is folded in later)."""
        if not self.has_rng("dropout"):
            raise ValueError(
                f"Attention(dropout={self.dropout}) called with training=True needs the "
                "'dropout' rng stream: pass rngs={'dropout': jax.random.key(...)} to apply()."
            )
        return self.make_rng("dropout")
