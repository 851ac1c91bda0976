"""Argument checks for the public entry points.

Every check runs at trace time (shapes and dtypes are static under ``jit``) and raises a
``ValueError`` or ``TypeError`` that names the argument, shows what was seen and says
what was expected, instead of letting XLA fail later or broadcasting silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

SCORE_MODES = ("dot", "concat")


def check_score_mode(score_mode: Any) -> None:
    """Raises ``ValueError`` unless ``score_mode`` is one of :data:`SCORE_MODES`."""
    if score_mode not in SCORE_MODES:
        raise ValueError(
            "Invalid value for argument score_mode. Expected one of {'dot', 'concat'}. "
            f"Received: score_mode={score_mode!r}"
        )


def check_rate(name: str, rate: Any) -> None:
    """Raises unless ``rate`` is a Python/NumPy real number in ``[0, 1)``."""
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete float in [0, 1), not a traced value; "
            f"mark it static under jit. Received: {name}={rate!r}"
        )
    try:
        rate = float(rate)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a float in [0, 1). Received: {name}={rate!r}") from err
    if math.isnan(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1). Received: {name}={rate!r}")


def as_float_array(name: str, x: Any) -> jax.Array:
    """Converts ``x`` to a floating-point array of rank >= 2, or raises."""
    try:
        x = jnp.asarray(x)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a floating-point array. Received: {name} of type {_describe(x)}"
        ) from err
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating-point dtype. Received: {name}.dtype={x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have rank >= 2, shape [batch..., length, depth]. "
            f"Received: {name}.shape={x.shape}"
        )
    return x


def check_attention_shapes(query: jax.Array, value: jax.Array, key: jax.Array) -> tuple[int, ...]:
    """Checks that query, value and key fit together; returns the broadcast batch shape.

    Expects ``query [batch..., Tq, dim]``, ``value [batch..., Tv, dim_v]`` and
    ``key [batch..., Tv, dim]``, with batch dims that broadcast against each other.
    """
    shapes = f"query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query and key must have the same depth (last dim): expected "
            f"key.shape[-1] == query.shape[-1] == {query.shape[-1]}. Received: {shapes}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same length (second to last dim): expected "
            f"key.shape[-2] == value.shape[-2] == {value.shape[-2]}. Received: {shapes}"
        )
    try:
        return jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except ValueError as err:
        raise ValueError(
            "query, key and value must have the same (or broadcastable) batch dims "
            f"[batch..., length, depth]. Received: {shapes}"
        ) from err


def check_mask(
    name: str, mask: Any, batch_shape: tuple[int, ...], length: int, length_name: str
) -> jax.Array | None:
    """Checks a ``[batch..., length]`` mask; returns it as an array (or ``None``).

    The mask's last dim must equal ``length`` exactly (a ``[batch, Tq]`` mask given where a
    ``[batch, Tv]`` one is due is an error, never a silent broadcast); its leading dims must
    broadcast to ``batch_shape`` without adding dimensions.
    """
    if mask is None:
        return None
    try:
        mask = jnp.asarray(mask)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a bool, int or float array. Received: {name} of type {_describe(mask)}"
        ) from err
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
        raise TypeError(f"{name} must be bool, int or float. Received: {name}.dtype={mask.dtype}")
    expected = (*batch_shape, length)
    fits = (
        1 <= mask.ndim <= len(expected)
        and mask.shape[-1] == length
        and _broadcasts_to(mask.shape, expected)
    )
    if not fits:
        raise ValueError(
            f"{name} must have shape [batch..., {length_name}] = {expected} (leading dims may "
            f"be 1 or left out). Received: {name}.shape={mask.shape}"
        )
    return mask


def _describe(x: Any) -> str:
    """The type of ``x``, with its dtype when it has one (e.g. a NumPy array of strings)."""
    dtype = getattr(x, "dtype", None)
    return type(x).__name__ + ("" if dtype is None else f" with dtype={dtype}")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without changing ``target``."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))


def unpack_inputs(inputs: Any) -> tuple[Any, Any, Any]:
    """Splits the module's ``[query, value]`` / ``[query, value, key]`` list."""
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(
            "Attention must be called on a list of inputs, namely [query, value] or "
            f"[query, value, key]. Received: inputs of type {type(inputs).__name__}"
        )
    if len(inputs) not in (2, 3):
        raise ValueError(
            "Attention accepts an inputs list of length 2 or 3, namely [query, value] or "
            f"[query, value, key]. Received length: {len(inputs)}"
        )
    query, value = inputs[0], inputs[1]
    key = inputs[2] if len(inputs) == 3 else None
    return query, value, key


def unpack_mask(mask: Sequence[Any] | None) -> tuple[Any, Any]:
    """Splits the module's ``[query_mask, value_mask(, ignored)]`` list."""
    if mask is None:
        return None, None
    if not isinstance(mask, (list, tuple)):
        raise ValueError(
            "Attention mask must be a list, namely [query_mask, value_mask]. "
            f"Received: mask of type {type(mask).__name__}"
        )
    if len(mask) not in (2, 3):
        raise ValueError(
            "Attention accepts a mask list of length 2 or 3, namely [query_mask, value_mask] "
            f"(a third entry is ignored, as in Keras). Received length: {len(mask)}"
        )
    return mask[0], mask[1]


IMPLEMENTATIONS = ("xla", "blocked", "pallas")
PALLAS_PLATFORMS = ("gpu", "tpu")


def check_implementation(implementation: Any, pallas_platform: Any = None) -> None:
    """Raises ``ValueError`` unless ``implementation`` is ``None`` or in :data:`IMPLEMENTATIONS`,
    and ``pallas_platform`` is ``None`` or, with ``implementation="pallas"``, in
    :data:`PALLAS_PLATFORMS`."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            "Invalid value for argument implementation. Expected None, 'xla', 'blocked' or "
            f"'pallas'. Received: implementation={implementation!r}"
        )
    if pallas_platform is None:
        return
    if pallas_platform not in PALLAS_PLATFORMS:
        raise ValueError(
            "Invalid value for argument pallas_platform. Expected None, 'gpu' or 'tpu'. "
            f"Received: pallas_platform={pallas_platform!r}"
        )
    if implementation != "pallas":
        raise ValueError(
            "pallas_platform chooses the kernel of implementation='pallas'. Received: "
            f"pallas_platform={pallas_platform!r} with implementation={implementation!r}"
        )


def validate_attention_args(
    query: Any,
    value: Any,
    key: Any,
    query_mask: Any,
    value_mask: Any,
    *,
    score_mode: str,
    concat_score_weight: Any,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Checks every argument of ``attention`` and returns the arrays it will use.

    Returns:
      ``(query, value, key, query_mask, value_mask)`` as arrays; ``key`` is ``value`` when
      none was given.

    Raises:
      ValueError, TypeError: naming the argument, the shapes seen and what was expected.
    """
    check_score_mode(score_mode)
    check_rate("dropout_rate", dropout_rate)
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate} needs a PRNG key: pass dropout_rng=jax.random.key(...)."
        )
    if score_mode != "concat" and concat_score_weight is not None:
        raise ValueError(
            "concat_score_weight is only used with score_mode='concat'. "
            f"Received: score_mode={score_mode!r}"
        )
    query = as_float_array("query", query)
    value = as_float_array("value", value)
    key = value if key is None else as_float_array("key", key)
    batch_shape = check_attention_shapes(query, value, key)
    query_mask = check_mask("query_mask", query_mask, batch_shape, query.shape[-2], "Tq")
    value_mask = check_mask("value_mask", value_mask, batch_shape, value.shape[-2], "Tv")
    return query, value, key, query_mask, value_mask


def check_param(name: str, param: Any, shape: tuple[int | None, ...], why: str) -> int | None:
    """Raises unless ``param`` is given with ``shape`` (``None`` entries match any size).

    Returns the size of the last dim (convenient for ``units``).
    """
    seen = None if param is None else jnp.shape(param)
    fits = seen is not None and len(seen) == len(shape)
    fits = fits and all(want in (None, got) for want, got in zip(shape, seen, strict=True))
    if not fits:
        expected = tuple("any" if d is None else d for d in shape)
        raise ValueError(
            f"{why} needs {name} of shape {expected}. Received: "
            f"{name}={'None' if seen is None else f'array of shape {seen}'}"
        )
    return seen[-1] if seen else None
