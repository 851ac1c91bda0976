"""Sequence parallelism: one long sequence split over the devices of a mesh axis.

``from luong_attention import parallel``. :func:`sequence_parallel_attention` is
:func:`luong_attention.attention` with the sequence split over a mesh axis, by ring attention
or with replicated queries (:func:`select_strategy` tells which one ``strategy=None`` takes).
:func:`to_zigzag`, :func:`from_zigzag` and :func:`zigzag_order` put a sequence into the
ring's load-balanced layout and back; :func:`ring_score_work` counts the ring's work per
device and step (a load-balance check that needs no devices).
"""

from luong_attention._src.parallel.layout import from_zigzag, to_zigzag, zigzag_order
from luong_attention._src.parallel.ring import ring_score_work
from luong_attention._src.parallel.sequence import select_strategy, sequence_parallel_attention

__all__ = [
    "from_zigzag",
    "ring_score_work",
    "select_strategy",
    "sequence_parallel_attention",
    "to_zigzag",
    "zigzag_order",
]
