"""``Attention``: a thin ``flax.linen`` module over :func:`attention`, Keras-compatible."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from luong_attention._src import checks
from luong_attention._src.attention import Implementation, ScoreMode, attention
from luong_attention._src.scores import PrecisionLike

# Keras creates its weights in this order (``build``): ``layer.get_weights()`` follows it.
_KERAS_WEIGHT_ORDER = ("scale", "concat_score_weight")
_KERAS_BASE_CONFIG_KEYS = ("name", "trainable", "dtype")


class Attention(nn.Module):
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
      implementation: ``None`` (pick by problem size), ``"xla"`` or ``"blocked"``; see
        :func:`attention`. Not part of the Keras config: it changes speed and memory, not
        the numbers.

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

    def __post_init__(self) -> None:
        checks.check_score_mode(self.score_mode)
        checks.check_implementation(self.implementation)
        checks.check_rate("dropout", self.dropout)
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
        query, value, key = checks.unpack_inputs(inputs)
        query_mask, value_mask = checks.unpack_mask(mask)
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
        if self.dtype is not None:
            query, value, key = (
                None if x is None else jnp.asarray(x, self.dtype) for x in (query, value, key)
            )
        rate = self.dropout if training else 0.0
        return attention(
            query,
            value,
            key,
            query_mask=query_mask,
            value_mask=value_mask,
            use_causal_mask=use_causal_mask,
            score_mode=self.score_mode,
            scale=scale,
            concat_score_weight=concat_score_weight,
            dropout_rate=rate,
            dropout_rng=self._dropout_rng() if rate > 0.0 else None,
            return_attention_scores=return_attention_scores,
            precision=self.precision,
            implementation=self.implementation,
        )

    def _dropout_rng(self) -> jax.Array:
        """Draws the dropout key from the ``"dropout"`` stream, folding in ``seed``."""
        if not self.has_rng("dropout"):
            raise ValueError(
                f"Attention(dropout={self.dropout}) called with training=True needs the "
                "'dropout' rng stream: pass rngs={'dropout': jax.random.key(...)} to apply()."
            )
        rng = self.make_rng("dropout")
        return rng if self.seed is None else jax.random.fold_in(rng, self.seed)

    # -- Keras interop ------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """The Keras layer config of this module (``keras.layers.Attention.from_config``)."""
        config = {
            "use_scale": self.use_scale,
            "score_mode": self.score_mode,
            "dropout": self.dropout,
            "seed": self.seed,
        }
        if self.dtype is not None:
            config["dtype"] = jnp.dtype(self.dtype).name
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Attention:
        """Builds the module from a ``keras.layers.Attention`` config (``layer.get_config()``).

        Keras's base-layer keys ``name`` and ``trainable`` are ignored; ``dtype`` (a name or a
        Keras ``DTypePolicy`` dict) sets the computation dtype. The removed ``causal`` argument
        and any other unknown key raise ``ValueError``: causality is a call argument
        (``use_causal_mask``).
        """
        known = {"use_scale", "score_mode", "dropout", "seed", *_KERAS_BASE_CONFIG_KEYS}
        unknown = sorted(set(config) - known)
        if unknown:
            hint = " Pass use_causal_mask=True when calling instead." if "causal" in unknown else ""
            raise ValueError(f"Unsupported keys in Attention config: {unknown}.{hint}")
        kwargs = {
            k: config[k] for k in ("use_scale", "score_mode", "dropout", "seed") if k in config
        }
        dtype = _keras_dtype(config.get("dtype"))
        if dtype is not None:
            kwargs["dtype"], kwargs["param_dtype"] = dtype
        return cls(**kwargs)

    def param_names(self) -> tuple[str, ...]:
        """The names of this module's parameters, in Keras's weight order."""
        used = {"scale": self.use_scale, "concat_score_weight": self.score_mode == "concat"}
        return tuple(name for name in _KERAS_WEIGHT_ORDER if used[name])

    def variables_from_keras(self, weights: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
        """Flax variables from Keras weights: ``layer.get_weights()`` or a name -> array dict."""
        names = self.param_names()
        if isinstance(weights, Mapping):
            weights = [weights[name] for name in names]
        if len(weights) != len(names):
            raise ValueError(
                f"Expected {len(names)} Keras weights {names} for {self}, received {len(weights)}."
            )
        params = {
            name: jnp.asarray(np.asarray(w).reshape(()), self.param_dtype)
            for name, w in zip(names, weights, strict=True)
        }
        return {"params": params}

    def keras_weights(self, variables: Mapping[str, Any]) -> list[np.ndarray]:
        """Keras weights (for ``layer.set_weights``) from this module's variables."""
        params = variables.get("params", {})
        return [np.asarray(params[name]) for name in self.param_names()]


def from_keras_layer(layer: Any) -> tuple[Attention, dict[str, Any]]:
    """Converts a built ``keras.layers.Attention`` into ``(module, variables)``.

    Only ``layer.get_config()`` and ``layer.get_weights()`` are used, so Keras is not imported.
    """
    module = Attention.from_config(layer.get_config())
    return module, module.variables_from_keras(layer.get_weights())


def _keras_dtype(dtype: Any) -> tuple[Any, Any] | None:
    """Maps a Keras dtype config entry to ``(dtype, param_dtype)``, or ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, Mapping):
        dtype = dtype.get("config", {}).get("name")
    if dtype is None:
        return None
    if dtype.startswith("mixed_"):
        return jnp.dtype(dtype.removeprefix("mixed_")), jnp.float32
    return jnp.dtype(dtype), jnp.dtype(dtype)
