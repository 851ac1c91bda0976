"""Keras 3 interop for :class:`~luong_attention.Attention`, without importing Keras.

``from luong_attention import keras_compat``. A ``keras.layers.Attention``'s config and weights
become the Flax module and its variables (:func:`from_keras_layer`) and back
(:func:`keras_config`, :func:`keras_weights`); only plain values and arrays cross.
"""

from luong_attention._src.modules.keras_config import (
    from_keras_config,
    from_keras_layer,
    keras_config,
    keras_weight_names,
    keras_weights,
    variables_from_keras,
)

__all__ = [
    "from_keras_config",
    "from_keras_layer",
    "keras_config",
    "keras_weight_names",
    "keras_weights",
    "variables_from_keras",
]
