"""Plotting helpers (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.typing import ArrayLike


def plot_attention(
    weights: ArrayLike,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax=None,
):
    """Draws attention weights as a heatmap, queries on the rows and keys on the columns.

    Args:
      weights: ``[q_length, kv_length]``.
      query_tokens: ``q_length`` labels for the rows (default: indices).
      key_tokens: ``kv_length`` labels for the columns (default: indices).
      title: optional title.
      ax: optional matplotlib ``Axes`` to draw into; a new figure is made otherwise.

    Returns:
      The matplotlib ``Figure``.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2:
        raise ValueError(
            f"weights must have shape [q_length, kv_length]. Received: {weights.shape}"
        )
    q_len, kv_len = weights.shape
    query_tokens = [str(i) for i in range(q_len)] if query_tokens is None else list(query_tokens)
    key_tokens = [str(j) for j in range(kv_len)] if key_tokens is None else list(key_tokens)
    if len(query_tokens) != q_len or len(key_tokens) != kv_len:
        raise ValueError(
            f"Expected {q_len} query_tokens and {kv_len} key_tokens for weights of shape "
            f"{weights.shape}. Received: {len(query_tokens)} and {len(key_tokens)}"
        )
    if ax is None:
        fig, ax = plt.subplots(
            figsize=(max(3.0, 0.35 * kv_len + 1.5), max(2.5, 0.35 * q_len + 1.0))
        )
    else:
        fig = ax.figure
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(kv_len), key_tokens, rotation=90)
    ax.set_yticks(range(q_len), query_tokens)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
