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
from luong_attention._src.masks import (
    MASK_PENALTY,
    as_bool_mask,
    causal_mask,
    mask_scores,
    score_mask,
)
from luong_attention._src.module import Attention, from_keras_layer
from luong_attention._src.scores import concat_scores, dot_scores, stats_dtype

__version__ = "0.1.0"

__all__ = [
    "MASK_PENALTY",
    "Attention",
    "apply_query_mask",
    "apply_scores",
    "as_bool_mask",
    "attention",
    "blocked_attention_with_lse",
    "causal_mask",
    "compute_scores",
    "concat_scores",
    "dot_scores",
    "dropout_weights",
    "from_keras_layer",
    "mask_scores",
    "score_mask",
    "select_implementation",
    "stats_dtype",
]

# Multiple devices (issue 7).
from luong_attention._src.parallel import sequence_parallel_attention

__all__ += ["sequence_parallel_attention"]
