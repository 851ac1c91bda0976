"""Keras interop for :class:`Attention`: configs and weights to and from ``keras.layers.Attention``.

Only plain Python values and arrays cross this boundary (``layer.get_config()``,
``layer.get_weights()``), so nothing here imports Keras.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import jax.numpy as jnp
import numpy as np

from luong_attention._src.modules.linen_attention import Attention

# Keras creates its weights in this order (``build``): ``layer.get_weights()`` follows it.
_KERAS_WEIGHT_ORDER = ("scale", "concat_score_weight")
_KERAS_BASE_CONFIG_KEYS = ("name", "trainable", "dtype")
_ATTENTION_CONFIG_KEYS = ("use_scale", "score_mode", "dropout", "seed")


class AttentionFields(Protocol):
    """What the Keras config is read from: the fields of the linen and the nnx ``Attention``."""

    use_scale: bool
    score_mode: str
    dropout: float
    seed: int | None
    dtype: Any
    param_dtype: Any


M = TypeVar("M")


def keras_config(module: AttentionFields) -> dict[str, Any]:
    """The ``keras.layers.Attention`` config of ``module`` (for ``Attention.from_config``).

    ``module`` is an :class:`Attention` or a :class:`luong_attention.nnx.Attention`.
    ``implementation``, ``matmul_dtype``, ``precision`` and the sequence-parallel fields are
    not part of it: they change speed and memory, not the model.

    Example usage::

      >>> from luong_attention import Attention
      >>> from luong_attention.keras_compat import keras_config
      >>> keras_config(Attention(use_scale=True))
      {'use_scale': True, 'score_mode': 'dot', 'dropout': 0.0, 'seed': None}
    """
    config: dict[str, Any] = {key: getattr(module, key) for key in _ATTENTION_CONFIG_KEYS}
    if module.dtype is not None:
        config["dtype"] = _keras_policy_name(module.dtype, module.param_dtype)
    return config


def from_keras_config(config: Mapping[str, Any], module_type: Callable[..., M] = Attention) -> M:
    """Builds an :class:`Attention` from a ``keras.layers.Attention`` config.

    ``module_type`` is the class to build: :class:`Attention` (linen) or
    :class:`luong_attention.nnx.Attention` (give it dropout keys at the call then).

    Keras's base-layer keys ``name`` and ``trainable`` are ignored; ``dtype`` (a name or a
    Keras ``DTypePolicy`` dict) sets the computation dtype (``"mixed_bfloat16"``: bfloat16
    compute, float32 parameters). The removed ``causal`` argument and any other unknown key
    raise ``ValueError``: causality is a call argument (``use_causal_mask``).

    Example usage::

      >>> from luong_attention.keras_compat import from_keras_config
      >>> from_keras_config({"use_scale": True, "dtype": "mixed_bfloat16"}).dtype.name
      'bfloat16'
    """
    unknown = sorted(set(config) - {*_ATTENTION_CONFIG_KEYS, *_KERAS_BASE_CONFIG_KEYS})
    if unknown:
        hint = " Pass use_causal_mask=True when calling instead." if "causal" in unknown else ""
        raise ValueError(f"Unsupported keys in Attention config: {unknown}.{hint}")
    kwargs = {key: config[key] for key in _ATTENTION_CONFIG_KEYS if key in config}
    dtype = _keras_dtype(config.get("dtype"))
    if dtype is not None:
        kwargs["dtype"], kwargs["param_dtype"] = dtype
    return module_type(**kwargs)


def keras_weight_names(module: AttentionFields) -> tuple[str, ...]:
    """The names of ``module``'s parameters in Keras's weight order (``layer.get_weights()``)."""
    used = {"scale": module.use_scale, "concat_score_weight": module.score_mode == "concat"}
    return tuple(name for name in _KERAS_WEIGHT_ORDER if used[name])


def variables_from_keras(
    module: Attention, weights: Sequence[Any] | Mapping[str, Any]
) -> dict[str, Any]:
    """Flax variables for ``module`` from Keras weights.

    Args:
      module: the :class:`Attention` the weights are for.
      weights: ``layer.get_weights()`` (scalars in Keras's order, see
        :func:`keras_weight_names`) or a ``{name: scalar}`` dict.

    Returns:
      ``{"params": {name: scalar array of module.param_dtype}}``.
    """
    names = keras_weight_names(module)
    if isinstance(weights, Mapping):
        weights = [weights[name] for name in names]
    if len(weights) != len(names):
        raise ValueError(
            f"Expected {len(names)} Keras weights {names} for {module}, received {len(weights)}."
        )
    params = {
        name: jnp.asarray(np.asarray(w).reshape(()), module.param_dtype)
        for name, w in zip(names, weights, strict=True)
    }
    return {"params": params}


def keras_weights(module: Attention, variables: Mapping[str, Any]) -> list[np.ndarray]:
    """Keras weights (for ``layer.set_weights``) from ``module``'s Flax ``variables``."""
    params = variables.get("params", {})
    return [np.asarray(params[name]) for name in keras_weight_names(module)]


def from_keras_layer(layer: Any) -> tuple[Attention, dict[str, Any]]:
    """Converts a built ``keras.layers.Attention`` into ``(module, variables)``.

    Only ``layer.get_config()`` and ``layer.get_weights()`` are used, so Keras is not imported.
    """
    module = from_keras_config(layer.get_config())
    return module, variables_from_keras(module, layer.get_weights())


def _keras_policy_name(dtype: Any, param_dtype: Any) -> str:
    """The Keras dtype policy name for ``(dtype, param_dtype)``: ``"mixed_bfloat16"`` /
    ``"mixed_float16"`` for half-precision compute with float32 parameters, else the dtype name
    (Keras cannot express other mixed pairs)."""
    name = jnp.dtype(dtype).name
    mixed = name in ("float16", "bfloat16") and jnp.dtype(param_dtype) == jnp.float32
    return f"mixed_{name}" if mixed else name


def _keras_dtype(dtype: Any) -> tuple[Any, Any] | None:
    """Maps a Keras dtype config entry to ``(dtype, param_dtype)``, or ``None``."""
    if isinstance(dtype, Mapping):
        dtype = dtype.get("config", {}).get("name")
    if dtype is None:
        return None
    if dtype.startswith("mixed_"):
        return jnp.dtype(dtype.removeprefix("mixed_")), jnp.float32
    return jnp.dtype(dtype), jnp.dtype(dtype)
