"""Score functions: how strongly each query matches each key.

Shape legend used throughout the package:

* ``batch...``: any number of leading batch dimensions, including none.
* ``q_length`` (Tq): number of queries; ``kv_length`` (Tv): number of keys/values.
* ``depth`` (dim): query/key feature size; ``value_depth`` (dim_v): value feature size.

Scores are always returned in ``stats_dtype(dtype)`` (at least float32), because the
softmax that follows must not run in half precision.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from luong_attention._src.primitives.linear import Linear, linear_call

PrecisionLike = jax.lax.Precision | str | None
ScoreMode = Literal["dot", "concat"]

# CPU flags of matrix units that multiply each half-precision type natively (x86: AMX and
# AVX-512 extensions). Without them XLA:CPU converts the operands itself, and a bfloat16
# matmul ran 1.5-3x slower than the same float32 matmul (AMD EPYC, AVX2).
_NATIVE_CPU_FLAGS = {
    "bfloat16": frozenset({"amx_bf16", "avx512_bf16"}),
    "float16": frozenset({"amx_fp16", "avx512_fp16"}),
}


def stats_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Returns the dtype for scores and softmax statistics: ``dtype`` promoted to float32.

    float16/bfloat16 become float32; float32 stays; float64 (with x64 on) stays float64.
    """
    return jnp.promote_types(dtype, jnp.float32)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_matmul_dtype(dtype: DTypeLike, requested: DTypeLike | None = None) -> jnp.dtype:
    """The operand dtype of the attention matmuls for inputs of ``dtype``.

    ``requested`` wins when given. Otherwise float32 and wider multiply in their own dtype,
    and bfloat16/float16 do too (with float32 accumulation) where the hardware has matrix
    units for them: GPUs, TPUs, and CPUs with AMX or the AVX-512 bf16/fp16 extensions. On
    other CPUs they multiply in float32, which is exact for their values and measured faster
    there (see :data:`_NATIVE_CPU_FLAGS`).

    Example usage::

      >>> import jax.numpy as jnp
      >>> resolve_matmul_dtype(jnp.float32), resolve_matmul_dtype(jnp.bfloat16, jnp.bfloat16)
      (dtype('float32'), dtype(bfloat16))
    """
    if requested is not None:
        requested = jnp.dtype(requested)
        if not jnp.issubdtype(requested, jnp.floating):
            raise TypeError(f"matmul_dtype must be a floating dtype or None. Received: {requested}")
        return requested
    dtype = jnp.dtype(dtype)
    flags = _NATIVE_CPU_FLAGS.get(dtype.name)
    if flags is None or jax.default_backend() != "cpu" or flags & _cpu_flags():
        return dtype
    return jnp.dtype(jnp.float32)


# Einsum specs of the two attention products and of their operands' gradients, each
# gradient written as ``einsum(spec, cotangent, other operand)``.
_SCORE_SPECS = ("...qd,...kd->...qk", "...qk,...kd->...qd", "...qk,...qd->...kd")
_VALUE_SPECS = ("...qk,...kv->...qv", "...qv,...kv->...qk", "...qv,...qk->...kv")


def narrower_dtype(a: jax.Array, b: jax.Array) -> jnp.dtype:
    """The narrower of two float dtypes: the one the product's operands take."""
    return a.dtype if jnp.finfo(a.dtype).bits <= jnp.finfo(b.dtype).bits else b.dtype


def _low_einsum(spec: str, a: jax.Array, b: jax.Array, out: jnp.dtype, precision) -> jax.Array:
    """``einsum(spec, a, b)`` on operands rounded to the narrower dtype, summed in ``out``."""
    low = narrower_dtype(a, b)
    return jnp.einsum(
        spec, a.astype(low), b.astype(low), precision=precision, preferred_element_type=out
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3, 4))
def _mixed_product(
    specs: tuple[str, str, str], a: jax.Array, b: jax.Array, out: jnp.dtype, precision
) -> jax.Array:
    """``einsum(specs[0], a, b)`` on operands rounded to the narrower dtype, summed in
    ``out``; its tangent and the backward's two products take the same low-precision
    operands (plain autodiff would meet the float32 cotangent with the half operand and
    multiply in float32). ``a`` and ``b`` have the same batch dims."""
    return _low_einsum(specs[0], a, b, out, precision)


@_mixed_product.defjvp
def _mixed_product_jvp(specs, out, precision, primals, tangents):
    a, b = primals
    fn = _mixed_linear(specs, out, precision, a.dtype, b.dtype)
    return _mixed_product(specs, a, b, out, precision), linear_call(fn, (a, b), tangents)


def _mixed_linear(specs, out, precision, a_dtype, b_dtype) -> Linear:
    """The product's tangent ``(da, db) -> da b + a db`` and its transpose, both on
    low-precision operands with ``out`` accumulation (plain ``einsum`` code, which JAX
    differentiates further)."""

    def tangent(res, lin):
        (a, b), (da, db) = res, lin
        return _low_einsum(specs[0], da, b, out, precision) + _low_einsum(
            specs[0], a, db, out, precision
        )

    def transpose(res, ct):
        a, b = res
        ct = ct.astype(narrower_dtype(a, b))
        da = _low_einsum(specs[1], ct, b, out, precision)
        db = _low_einsum(specs[2], ct, a, out, precision)
        return da.astype(a_dtype), db.astype(b_dtype)

    return Linear(tangent, transpose, tangent, transpose)


def product(
    specs: tuple[str, str, str],
    a: jax.Array,
    b: jax.Array,
    out: jnp.dtype,
    precision: PrecisionLike = None,
) -> jax.Array:
    """``einsum(specs[0], a, b)`` accumulated in ``out``; see :func:`_mixed_product`.

    Operands of float32 or wider multiply as they are (plain ``jnp.einsum``, plain
    autodiff); a bfloat16/float16 operand makes both forward and backward products take
    low-precision operands with float32 accumulation. Leading batch dims broadcast.
    """
    if jnp.finfo(narrower_dtype(a, b)).bits >= 32:
        return jnp.einsum(specs[0], a, b, precision=precision, preferred_element_type=out)
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a, (*batch, *a.shape[-2:]))
    b = jnp.broadcast_to(b, (*batch, *b.shape[-2:]))
    return _mixed_product(specs, a, b, jnp.dtype(out), precision)


def weighted_sum(
    weights: jax.Array, value: jax.Array, *, precision: PrecisionLike = None
) -> jax.Array:
    """``weights @ value`` accumulated in ``weights``' dtype (float32 or wider).

    When ``value`` is narrower (bfloat16/float16 operands, see :func:`resolve_matmul_dtype`) the
    weights are rounded to it for the product, as FlashAttention does; the sum stays float32.

    Args:
      weights: ``[batch..., q_length, kv_length]``.
      value: ``[batch..., kv_length, value_depth]``.
      precision: matmul precision passed to ``jnp.einsum``.

    Returns:
      ``[batch..., q_length, value_depth]`` in ``weights``' dtype.
    """
    return product(_VALUE_SPECS, weights, value, weights.dtype, precision)


def _scalar(x: ArrayLike | None, dtype: jnp.dtype) -> jax.Array | None:
    """Casts an optional scalar parameter to ``dtype`` (keeps it differentiable)."""
    return None if x is None else jnp.asarray(x).astype(dtype)


def dot_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    scale: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Luong "dot" scores, as Keras's ``score_mode="dot"``: ``scale * query @ key^T``.

    Args:
      query: ``[batch..., q_length, depth]``.
      key: ``[batch..., kv_length, depth]``; batch dims broadcast against ``query``'s.
      scale: optional scalar multiplying the scores; ``None`` means no scaling (it is *not*
        ``1/sqrt(depth)``: Keras's learned scale starts at 1.0).
      precision: matmul precision passed to ``jnp.einsum``.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    out_dtype = stats_dtype(jnp.result_type(query, key))
    scores = product(_SCORE_SPECS, query, key, out_dtype, precision)
    scale = _scalar(scale, out_dtype)
    return scores if scale is None else scores * scale


def concat_scores(
    query: jax.Array,
    key: jax.Array,
    *,
    scale: ArrayLike | None = None,
    concat_score_weight: ArrayLike | None = None,
) -> jax.Array:
    """Keras's ``score_mode="concat"``: ``w * sum(tanh(scale * (query + key)), axis=-1)``.

    Despite the name this is no concatenation: Keras adds every query to every key,
    applies ``tanh`` and sums over the features, with a learned scalar ``w``
    (``concat_score_weight``) and an optional scalar ``scale`` inside the ``tanh``.
    It builds a ``[batch..., q_length, kv_length, depth]`` intermediate.

    Args:
      query: ``[batch..., q_length, depth]``.
      key: ``[batch..., kv_length, depth]``; batch dims broadcast against ``query``'s.
      scale: optional scalar inside the ``tanh``; ``None`` means 1.
      concat_score_weight: optional scalar outside the sum; ``None`` means 1.

    Returns:
      ``[batch..., q_length, kv_length]`` in ``stats_dtype`` of the inputs.
    """
    out_dtype = stats_dtype(jnp.result_type(query, key))
    # [batch..., q, 1, d] + [batch..., 1, k, d] -> [batch..., q, k, d], in float32.
    pre = query.astype(out_dtype)[..., :, None, :] + key.astype(out_dtype)[..., None, :, :]
    scale = _scalar(scale, out_dtype)
    if scale is not None:
        pre = scale * pre
    scores = jnp.sum(jnp.tanh(pre), axis=-1)
    weight = _scalar(concat_score_weight, out_dtype)
    return scores if weight is None else weight * scores


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["scale", "weight"], meta_fields=["mode"]
)
@dataclasses.dataclass(frozen=True)
class ScoreParams:
    """The score function of one call, as one value from the public functions to the kernels.

    A pytree: ``mode`` is static, ``scale`` and ``weight`` are leaves (``None`` or scalars,
    differentiable), so the value crosses ``jit``, ``shard_map`` and ``custom_vjp`` whole.

    Attributes:
      mode: ``"dot"`` or ``"concat"``.
      scale: ``None`` (no scaling) or the scalar Keras calls ``scale``.
      weight: ``concat_score_weight`` (``None``: 1.0); ``None`` for ``"dot"``.
    """

    mode: ScoreMode = "dot"
    scale: ArrayLike | None = None
    weight: ArrayLike | None = None

    def scores(
        self, query: jax.Array, key: jax.Array, precision: PrecisionLike = None
    ) -> jax.Array:
        """``[batch..., q_length, kv_length]`` scores of ``query`` against ``key``."""
        if self.mode == "dot":
            return dot_scores(query, key, scale=self.scale, precision=precision)
        return concat_scores(query, key, scale=self.scale, concat_score_weight=self.weight)

    def fold(
        self, query: jax.Array, key: jax.Array, dtype: jnp.dtype
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The kernels' form: ``scale`` folded into the operands, the weight as an array.

        ``scale`` multiplies the query (and the key for ``"concat"``, where it sits inside
        the ``tanh`` of their sum) in ``dtype`` (float32 or wider), rounded back to the
        operands' dtype: one rounding, as the inputs' own.

        Args:
          query: ``[..., q_length, depth]``; key: ``[..., kv_length, depth]``.
          dtype: the statistics dtype (see :func:`stats_dtype`).

        Returns:
          ``(query, key, weight)``: ``weight`` is ``concat_score_weight`` (1 when ``None``)
          for ``"concat"`` and an unused 0 for ``"dot"``, a ``dtype`` scalar.
        """
        if self.scale is not None:
            scale = jnp.asarray(self.scale).astype(dtype)
            query = (query.astype(dtype) * scale).astype(query.dtype)
            if self.mode == "concat":
                key = (key.astype(dtype) * scale).astype(key.dtype)
        if self.mode != "concat":
            return query, key, jnp.zeros((), dtype)
        weight = 1.0 if self.weight is None else self.weight
        return query, key, jnp.asarray(weight).astype(dtype)
