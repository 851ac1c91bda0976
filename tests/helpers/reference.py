"""Test helpers: an independent NumPy-loop reference of Keras attention and random inputs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

# Keras's fill for masked scores: ``scores - 1e9``, computed in float32 (its default dtype).
KERAS_PENALTY = np.float32(1.0e9)


def _score(q: np.ndarray, k: np.ndarray, score_mode: str, scale: float | None, csw: float | None):
    """One query-key score, written out from Keras's formulas (float64)."""
    if score_mode == "dot":
        s = float(np.dot(q, k))
        return s if scale is None else s * scale
    pre = q + k if scale is None else scale * (q + k)
    s = float(np.sum(np.tanh(pre)))
    return s if csw is None else csw * s


def reference_attention(
    query: Any,
    value: Any,
    key: Any = None,
    *,
    query_mask: Any = None,
    value_mask: Any = None,
    causal: bool = False,
    score_mode: str = "dot",
    scale: float | None = None,
    concat_score_weight: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keras-semantics attention with plain Python loops over batch, query and key (float64).

    Shapes: ``query [batch..., Tq, dim]``, ``value [batch..., Tv, dim_v]``,
    ``key [batch..., Tv, dim]``; masks ``[batch..., Tq]`` / ``[batch..., Tv]``, non-zero = attend.
    Leading batch dims broadcast (none allowed). Masked scores get Keras's float32
    ``score - 1e9``, so fully masked rows come out (near) uniform as in Keras.

    Returns:
      ``(output [batch..., Tq, dim_v], weights [batch..., Tq, Tv])`` as float64.
    """
    query = np.asarray(query, np.float64)
    value = np.asarray(value, np.float64)
    key = value if key is None else np.asarray(key, np.float64)
    tq, tv, dv = query.shape[-2], value.shape[-2], value.shape[-1]
    batch = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])

    def flat(x: np.ndarray, tail: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(x, (*batch, *tail)).reshape(-1, *tail)

    q = flat(query, query.shape[-2:])
    k = flat(key, key.shape[-2:])
    v = flat(value, value.shape[-2:])
    qm = (
        np.ones(q.shape[:2], bool)
        if query_mask is None
        else flat(np.asarray(query_mask) != 0, (tq,))
    )
    vm = (
        np.ones(v.shape[:2], bool)
        if value_mask is None
        else flat(np.asarray(value_mask) != 0, (tv,))
    )
    n = q.shape[0]
    out = np.zeros((n, tq, dv))
    weights = np.zeros((n, tq, tv))
    for b in range(n):
        for i in range(tq):
            row = []
            for j in range(tv):
                s = _score(q[b, i], k[b, j], score_mode, scale, concat_score_weight)
                attend = vm[b, j] and (not causal or j <= i)
                if not attend:
                    s = float(np.float32(s) - KERAS_PENALTY)
                row.append(s)
            row = np.asarray(row)
            e = np.exp(row - row.max())
            weights[b, i] = e / e.sum()
            if qm[b, i]:
                for j in range(tv):
                    out[b, i] += weights[b, i, j] * v[b, j]
    return out.reshape(*batch, tq, dv), weights.reshape(*batch, tq, tv)


def random_inputs(
    seed: int,
    batch: tuple[int, ...],
    tq: int,
    tv: int,
    dim: int,
    dim_v: int,
    *,
    with_key: bool = True,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(query, value, key)`` drawn from N(0, 1); ``key`` is ``None`` (and ``dim_v = dim``)
    when ``with_key`` is False, since the value then serves as the key."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((*batch, tq, dim)).astype(dtype)
    if not with_key:
        return query, rng.standard_normal((*batch, tv, dim)).astype(dtype), None
    value = rng.standard_normal((*batch, tv, dim_v)).astype(dtype)
    key = rng.standard_normal((*batch, tv, dim)).astype(dtype)
    return query, value, key


def random_mask(seed: int, shape: tuple[int, ...], *, fully_masked_first: bool) -> np.ndarray:
    """A bool mask ``[batch..., T]`` with about 60% True; optionally batch entry 0 all False."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[..., 0] |= ~mask.any(axis=-1)  # at least one True per row, unless forced below
    if fully_masked_first:
        mask.reshape(-1, shape[-1])[0] = False
    return mask


MASK_KINDS = ("none", "query", "value", "both")


def make_masks(
    kind: str, seed: int, batch: tuple[int, ...], tq: int, tv: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(query_mask, value_mask)`` for a mask kind of :data:`MASK_KINDS`; the value mask
    fully masks the first batch entry and the query mask masks whole first rows."""
    qm = (
        random_mask(seed, (*batch, tq), fully_masked_first=True)
        if kind in ("query", "both")
        else None
    )
    vm = (
        random_mask(seed + 1, (*batch, tv), fully_masked_first=True)
        if kind in ("value", "both")
        else None
    )
    return qm, vm


def grid(**axes: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The cartesian product of the given axes, as a list of tuples (for parametrize)."""
    return list(itertools.product(*axes.values()))
