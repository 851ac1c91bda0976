"""Keras 3 users get the fast path: ``keras.layers.Attention`` computed by :func:`attention`.

``from luong_attention.keras import Attention`` (needs the ``keras`` extra:
``pip install "luong-attention[keras]"``; set ``KERAS_BACKEND=jax`` before Keras is first
imported). This is the only public module that imports Keras.
"""

from luong_attention._src.modules.keras_layer import (
    Attention,
    example_classifier,
    swap_attention,
)

__all__ = ["Attention", "example_classifier", "swap_attention"]
