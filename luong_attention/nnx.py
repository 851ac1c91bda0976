"""``flax.nnx`` counterparts of the Luong modules: ``from luong_attention import nnx as lnnx``.

Kept out of ``luong_attention/__init__`` so that importing the package does not import
``flax.nnx``.
"""

from luong_attention._src.luong_modules import DecoderState
from luong_attention._src.nnx_modules import AttentionalDecoderCell, LuongAttention

__all__ = ["AttentionalDecoderCell", "DecoderState", "LuongAttention"]
