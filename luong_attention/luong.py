"""Luong et al. (2015), "Effective Approaches to Attention-based Neural Machine Translation".

``from luong_attention import luong``. The four scores (``"dot"``, ``"general"``, ``"concat"``,
``"location"``), global and local (``"local-m"``, ``"local-p"``) attention as pure functions,
the attentional hidden state ``h~_t = tanh(W_c [c_t; h_t])``, and the ``flax.linen`` modules
:class:`LuongAttention` and :class:`AttentionalDecoderCell` (input feeding, fits ``nn.RNN``).
The ``flax.nnx`` modules are in :mod:`luong_attention.nnx`.
"""

from luong_attention._src.functional.luong import (
    LUONG_MODES,
    LUONG_SCORES,
    attentional_hidden_state,
    gaussian_weights,
    general_scores,
    length_mask,
    location_scores,
    luong_attend,
    luong_concat_scores,
    luong_scores,
    monotonic_positions,
    predictive_positions,
    source_lengths_of,
    window_mask,
)
from luong_attention._src.functional.luong_cell import DecoderState
from luong_attention._src.modules.linen_luong import AttentionalDecoderCell, LuongAttention

__all__ = [
    "LUONG_MODES",
    "LUONG_SCORES",
    "AttentionalDecoderCell",
    "DecoderState",
    "LuongAttention",
    "attentional_hidden_state",
    "gaussian_weights",
    "general_scores",
    "length_mask",
    "location_scores",
    "luong_attend",
    "luong_concat_scores",
    "luong_scores",
    "monotonic_positions",
    "predictive_positions",
    "source_lengths_of",
    "window_mask",
]
