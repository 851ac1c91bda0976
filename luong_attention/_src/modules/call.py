"""The one call path of every ``Attention`` module: linen, nnx and the Keras layer.

A module holds its call settings (:class:`CallSettings`) and its parameters; it hands both,
with the Keras-style ``inputs``/``mask`` lists and call arguments, to :func:`call_attention`,
which unpacks the lists and calls :func:`attention` or, with ``sequence_axis`` set,
:func:`sequence_parallel_attention`. Flax-free, so the Keras layer uses it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike, DTypeLike

from luong_attention._src.functional.attention import Implementation, ScoreMode, attention
from luong_attention._src.parallel.layout import Layout
from luong_attention._src.parallel.sequence import Strategy, sequence_parallel_attention
from luong_attention._src.primitives import checks
from luong_attention._src.primitives.scores import PrecisionLike, resolve_matmul_dtype


def check_sequence_fields(mesh: Mesh | None, sequence_axis: str | None) -> None:
    """Raises ``ValueError`` unless a module got both ``mesh`` and ``sequence_axis`` or neither."""
    if (mesh is None) != (sequence_axis is None):
        raise ValueError(
            "Sequence parallelism needs both mesh and sequence_axis (the mesh axis to split "
            f"the sequence over), or neither. Received: mesh={mesh!r}, "
            f"sequence_axis={sequence_axis!r}"
        )
    if mesh is not None and sequence_axis not in mesh.axis_names:
        raise ValueError(
            f"sequence_axis must be one of the mesh's axes {mesh.axis_names}. "
            f"Received: sequence_axis={sequence_axis!r}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallSettings:
    """The settings of an ``Attention`` module that :func:`call_attention` needs, checked.

    Attributes:
      score_mode: ``"dot"`` or ``"concat"``.
      dropout: the dropout rate, in ``[0, 1)``; applied only when ``training``.
      seed: an integer folded into the drawn dropout key (the Flax modules), or ``None``: the
        key is used as drawn (the Keras layer, whose ``SeedGenerator`` holds its seed).
      dtype: the dtype the inputs are cast to, or ``None`` (keep the inputs' dtypes).
      precision, implementation, matmul_dtype: passed on to :func:`attention`.
      mesh, sequence_axis: both set: run :func:`sequence_parallel_attention` over ``mesh``'s
        axis ``sequence_axis``. batch_axis, sequence_strategy, sequence_layout: passed on to
        it as ``batch_axis``, ``strategy`` and ``layout``.

    Raises:
      ValueError, TypeError: naming the field, at construction.
    """

    score_mode: ScoreMode = "dot"
    dropout: float = 0.0
    seed: int | None = None
    dtype: DTypeLike | None = None
    precision: PrecisionLike = None
    implementation: Implementation | None = None
    matmul_dtype: DTypeLike | None = None
    mesh: Mesh | None = None
    sequence_axis: str | None = None
    batch_axis: str | None = None
    sequence_strategy: Strategy | None = None
    sequence_layout: Layout = "contiguous"

    def __post_init__(self) -> None:
        checks.check_score_mode(self.score_mode)
        checks.check_rate("dropout", self.dropout)
        checks.check_implementation(self.implementation)
        if self.matmul_dtype is not None:  # raises TypeError unless a floating dtype
            resolve_matmul_dtype(jnp.float32, self.matmul_dtype)
        check_sequence_fields(self.mesh, self.sequence_axis)

    @classmethod
    def of(cls, module: Any) -> CallSettings:
        """The settings held in ``module``'s attributes of the same names (the Flax modules)."""
        return cls(**{field.name: getattr(module, field.name) for field in dataclasses.fields(cls)})


def call_attention(
    settings: CallSettings,
    inputs: Sequence[ArrayLike],
    mask: Sequence[ArrayLike | None] | None = None,
    *,
    training: bool = False,
    return_attention_scores: bool = False,
    use_causal_mask: bool = False,
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
    draw_dropout_rng: Callable[[], jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """A module's call: Keras's ``inputs``/``mask`` lists in, :func:`attention`'s result out.

    Args:
      settings: the module's :class:`CallSettings`.
      inputs: ``[query, value]`` or ``[query, value, key]`` with ``query
        [batch..., Tq, dim]``, ``value [batch..., Tv, dim_v]``, ``key [batch..., Tv, dim]``.
      mask: ``None`` or ``[query_mask [batch..., Tq], value_mask [batch..., Tv]]`` (a third
        entry is ignored, as in Keras); entries may be ``None``.
      training: apply dropout (at ``settings.dropout``).
      return_attention_scores: also return the weights ``[batch..., Tq, Tv]``.
      use_causal_mask: top-left aligned causal mask, as Keras.
      scale, concat_score_weight: the module's parameters (``None`` when unused).
      draw_dropout_rng: returns the dropout key; called once, only when dropout applies
        (``training`` and ``settings.dropout > 0``); ``settings.seed`` is folded into it.

    Returns:
      ``output [batch..., Tq, dim_v]`` or ``(output, weights)``.

    Raises:
      ValueError: for bad lists (see :func:`~luong_attention._src.primitives.checks.unpack_inputs`),
        or ``return_attention_scores`` with ``sequence_axis`` set.
    """
    query, value, key = checks.unpack_inputs(inputs)
    query_mask, value_mask = checks.unpack_mask(mask)
    if settings.dtype is not None:
        query, value, key = (
            None if x is None else jnp.asarray(x, settings.dtype) for x in (query, value, key)
        )
    rate = settings.dropout if training else 0.0
    common = {
        "query_mask": query_mask,
        "value_mask": value_mask,
        "use_causal_mask": use_causal_mask,
        "score_mode": settings.score_mode,
        "scale": scale,
        "concat_score_weight": concat_score_weight,
        "dropout_rate": rate,
    }
    if settings.sequence_axis is not None:
        if return_attention_scores:
            raise ValueError(
                "Attention(sequence_axis=...) never builds the [Tq, Tv] weights, so it "
                "cannot return them: call it with return_attention_scores=False."
            )
        return sequence_parallel_attention(
            query,
            value,
            key,
            mesh=settings.mesh,
            axis_name=settings.sequence_axis,
            batch_axis=settings.batch_axis,
            strategy=settings.sequence_strategy,
            layout=settings.sequence_layout,
            **common,
        )
    return attention(
        query,
        value,
        key,
        dropout_rng=_dropout_rng(settings.seed, draw_dropout_rng) if rate > 0.0 else None,
        return_attention_scores=return_attention_scores,
        precision=settings.precision,
        implementation=settings.implementation,
        matmul_dtype=settings.matmul_dtype,
        **common,
    )


def _dropout_rng(seed: int | None, draw: Callable[[], jax.Array] | None) -> jax.Array | None:
    """The drawn dropout key with ``seed`` folded in (``None`` when there is nothing to draw:
    :func:`attention` then names the missing key)."""
    if draw is None:
        return None
    rng = draw()
    return rng if seed is None else jax.random.fold_in(rng, seed)
