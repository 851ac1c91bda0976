"""Decoding a sequence-to-sequence model: teacher forcing, greedy decoding and beam search.

``from luong_attention import decoding``. Model-agnostic: every function takes a step function
``(carry, token ids) -> (carry, logits)``, so any decoder fits, the Luong cell of
:mod:`luong_attention.luong` included; everything is ``jit``-compatible.
"""

from luong_attention._src.functional.decoding import (
    BeamOutput,
    GreedyOutput,
    beam_search,
    greedy_decode,
    normalised_scores,
    teacher_forced_logits,
    tile_beams,
)

__all__ = [
    "BeamOutput",
    "GreedyOutput",
    "beam_search",
    "greedy_decode",
    "normalised_scores",
    "teacher_forced_logits",
    "tile_beams",
]
