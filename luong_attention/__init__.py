"""luong_attention: Keras-compatible Luong (multiplicative) attention for JAX and Flax."""

from luong_attention._src.attention import (
    apply_query_mask,
    apply_scores,
    attention,
    blocked_attention_with_lse,
    compute_scores,
    dropout_weights,
    select_implementation,
)
from luong_attention._src.decoding import (
    BeamOutput,
    GreedyOutput,
    beam_search,
    greedy_decode,
    normalised_scores,
    teacher_forced_logits,
    tile_beams,
)
from luong_attention._src.luong import (
    LUONG_MODES,
    LUONG_SCORES,
    attentional_hidden_state,
    check_luong_config,
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
from luong_attention._src.luong_modules import (
    AttentionalDecoderCell,
    DecoderState,
    LuongAttention,
    init_decoder_state,
    luong_param_shapes,
)
from luong_attention._src.masks import (
    MASK_PENALTY,
    as_bool_mask,
    causal_mask,
    mask_scores,
    score_mask,
)
from luong_attention._src.module import Attention, from_keras_layer
from luong_attention._src.parallel import sequence_parallel_attention
from luong_attention._src.scores import concat_scores, dot_scores, stats_dtype

__version__ = "0.1.0"

__all__ = [
    "LUONG_MODES",
    "LUONG_SCORES",
    "MASK_PENALTY",
    "Attention",
    "AttentionalDecoderCell",
    "BeamOutput",
    "DecoderState",
    "GreedyOutput",
    "LuongAttention",
    "apply_query_mask",
    "apply_scores",
    "as_bool_mask",
    "attention",
    "attentional_hidden_state",
    "beam_search",
    "blocked_attention_with_lse",
    "causal_mask",
    "check_luong_config",
    "compute_scores",
    "concat_scores",
    "dot_scores",
    "dropout_weights",
    "from_keras_layer",
    "gaussian_weights",
    "general_scores",
    "greedy_decode",
    "init_decoder_state",
    "length_mask",
    "location_scores",
    "luong_attend",
    "luong_concat_scores",
    "luong_param_shapes",
    "luong_scores",
    "mask_scores",
    "monotonic_positions",
    "normalised_scores",
    "predictive_positions",
    "score_mask",
    "select_implementation",
    "sequence_parallel_attention",
    "source_lengths_of",
    "stats_dtype",
    "teacher_forced_logits",
    "tile_beams",
    "window_mask",
]
