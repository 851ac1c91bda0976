"""Keras 3 users get the fast path: ``keras.layers.Attention`` computed by :func:`attention`.

``from luong_attention.keras import Attention`` (needs the ``keras`` extra:
``pip install "luong-attention[keras]"``; set ``KERAS_BACKEND=jax`` before Keras is first
imported). This is the only public module that imports Keras; without Keras, importing it
raises a ``ModuleNotFoundError`` that names the extra.
"""

try:
    from luong_attention._src.modules.keras_layer import (
        Attention,
        example_classifier,
        swap_attention,
    )
except ModuleNotFoundError as error:
    if error.name is None or error.name.partition(".")[0] != "keras":
        raise
    raise ModuleNotFoundError(
        'luong_attention.keras needs Keras 3: pip install "luong-attention[keras]"',
        name=error.name,
    ) from error

__all__ = ["Attention", "example_classifier", "swap_attention"]
