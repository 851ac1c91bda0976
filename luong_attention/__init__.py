"""luong_attention: Keras-compatible Luong (multiplicative) attention for JAX and Flax.

The top level is the Keras-compatible core: :func:`attention` and the ``flax.linen`` module
:class:`Attention` (the same numbers as ``keras.layers.Attention``), the pure building blocks
they are made of and the memory-efficient :func:`blocked_attention_with_lse`. The rest lives
in namespaces by concept:

* :mod:`luong_attention.luong`: Luong et al. (2015) in full (four scores, local attention,
  the attentional decoder cell);
* :mod:`luong_attention.decoding`: greedy and beam-search decoding;
* :mod:`luong_attention.nnx`: the ``flax.nnx`` modules;
* :mod:`luong_attention.keras_compat`: Keras configs and weights to and from :class:`Attention`;
* :mod:`luong_attention.parallel`: the sequence split over devices (ring attention).
"""

import importlib
import warnings

from luong_attention._src.functional.attention import (
    apply_query_mask,
    apply_scores,
    attention,
    compute_scores,
    dropout_weights,
    select_implementation,
)
from luong_attention._src.functional.kernel_call import blocked_attention_with_lse
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
    "mask_scores",
    "score_mask",
    "select_implementation",
]


def __getattr__(name: str):
    """Deprecated access to the names that moved to :mod:`luong_attention.parallel`."""
    parallel = importlib.import_module("luong_attention.parallel")
    if name not in parallel.__all__:
        raise AttributeError(f"module 'luong_attention' has no attribute {name!r}")
    warnings.warn(
        f"luong_attention.{name} moved to luong_attention.parallel.{name}; "
        "the top-level name will be removed.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(parallel, name)
