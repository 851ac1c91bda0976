"""luong_attention: Keras-compatible Luong (multiplicative) attention for JAX and Flax.

The top level is the Keras-compatible core: :func:`attention` and the ``flax.linen`` module
:class:`Attention` (the same numbers as ``keras.layers.Attention``), the pure building blocks
they are made of, the memory-efficient :func:`blocked_attention_with_lse` and the multi-device
:func:`sequence_parallel_attention` (ring or replicated queries; :func:`to_zigzag` and
:func:`from_zigzag` put a sequence into the ring's load-balanced layout and back). The rest lives in namespaces by concept:

* :mod:`luong_attention.luong`: Luong et al. (2015) in full (four scores, local attention,
  the attentional decoder cell);
* :mod:`luong_attention.decoding`: greedy and beam-search decoding;
* :mod:`luong_attention.nnx`: the ``flax.nnx`` modules;
* :mod:`luong_attention.keras_compat`: Keras configs and weights to and from :class:`Attention`.
"""

from luong_attention._src.functional.attention import (
    apply_query_mask,
    apply_scores,
    attention,
    blocked_attention_with_lse,
    compute_scores,
    dropout_weights,
    select_implementation,
)
from luong_attention._src.functional.layout import from_zigzag, to_zigzag, zigzag_order
from luong_attention._src.functional.parallel import select_strategy, sequence_parallel_attention
from luong_attention._src.functional.ring import ring_score_work
from luong_attention._src.modules.linen_attention import Attention
from luong_attention._src.primitives.masks import causal_mask, mask_scores, score_mask
from luong_attention._src.primitives.scores import concat_scores, dot_scores

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "apply_query_mask",
    "apply_scores",
    "attention",
    "blocked_attention_with_lse",
    "causal_mask",
    "compute_scores",
    "concat_scores",
    "dot_scores",
    "dropout_weights",
    "from_zigzag",
    "mask_scores",
    "ring_score_work",
    "score_mask",
    "select_implementation",
    "select_strategy",
    "sequence_parallel_attention",
    "to_zigzag",
    "zigzag_order",
]
