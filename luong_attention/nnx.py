"""``flax.nnx`` counterparts of the modules: ``from luong_attention import nnx as lnnx``.

:class:`Attention` is the Keras-compatible :class:`luong_attention.Attention`;
:class:`LuongAttention` and :class:`AttentionalDecoderCell` are :mod:`luong_attention.luong`'s.

Kept out of ``luong_attention/__init__`` so that importing the package does not import
``flax.nnx``. :class:`DecoderState` is the same carry as :mod:`luong_attention.luong`'s.
"""

from luong_attention._src.functional.luong_cell import DecoderState
from luong_attention._src.modules.nnx_attention import Attention
from luong_attention._src.modules.nnx_luong import AttentionalDecoderCell, LuongAttention

__all__ = ["Attention", "AttentionalDecoderCell", "DecoderState", "LuongAttention"]
