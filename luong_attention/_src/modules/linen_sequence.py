"""The sequence-parallel fields of the ``flax.linen`` modules, declared once."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from jax.sharding import Mesh

from luong_attention._src.parallel.layout import Layout
from luong_attention._src.parallel.sequence import Strategy


class SequenceParallelFields(nn.Module):
    """Base of the linen modules that can run sequence parallel: their keyword-only fields.

    Attributes:
      mesh: with ``sequence_axis``, run sequence parallel over this mesh (both or neither,
        else a ``ValueError`` at construction; the call must then be inside ``jax.jit`` or
        eager with inputs on that mesh).
      sequence_axis: the axis of ``mesh`` to split the sequences over.
      batch_axis: an optional second mesh axis to split the first batch dim over.
      sequence_strategy: ``"ring"``, ``"replicated"`` or ``None`` (pick by the lengths).
      sequence_layout: ``"contiguous"`` or ``"zigzag"`` (ring only).
    """

    _: dataclasses.KW_ONLY
    mesh: Mesh | None = None
    sequence_axis: str | None = None
    batch_axis: str | None = None
    sequence_strategy: Strategy | None = None
    sequence_layout: Layout = "contiguous"
