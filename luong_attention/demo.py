"""``luong-attention demo``: a short worked example of the module on a masked batch."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from luong_attention import Attention
from luong_attention.plotting import plot_attention


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the demo's flags."""
    parser.add_argument(
        "--out", type=Path, default=Path("luong_attention_out"), help="output folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> None:
    """Runs the module on a small padded batch, prints output and weights, saves a heatmap."""
    batch, q_len, kv_len, dim, dim_v = 2, 4, 6, 8, 3
    k1, k2, k3 = jax.random.split(jax.random.key(args.seed), 3)
    query = jax.random.normal(k1, (batch, q_len, dim))
    value = jax.random.normal(k2, (batch, kv_len, dim_v))
    key = jax.random.normal(k3, (batch, kv_len, dim))
    # Example 0 has all 6 keys; example 1 is padded after 4 keys and after 3 queries.
    value_mask = jnp.arange(kv_len)[None, :] < jnp.array([[kv_len], [4]])
    query_mask = jnp.arange(q_len)[None, :] < jnp.array([[q_len], [3]])

    layer = Attention(use_scale=True, score_mode="dot")
    variables = layer.init(jax.random.key(1), [query, value, key])
    apply = jax.jit(
        lambda v, q, val, k, qm, vm: layer.apply(
            v, [q, val, k], mask=[qm, vm], return_attention_scores=True
        )
    )
    output, weights = apply(variables, query, value, key, query_mask, value_mask)

    np.set_printoptions(precision=3, suppress=True)
    print(f"params: {jax.tree_util.tree_map(np.asarray, variables['params'])}")
    print(f"output {output.shape} (example 1, query 3 is padded, so its row is 0):")
    print(np.asarray(output))
    print(f"weights {weights.shape} (example 1, keys 4 and 5 are padded, so they get 0):")
    print(np.asarray(weights))

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "demo_attention.png"
    fig = plot_attention(
        weights[1],
        [f"q{i}" for i in range(q_len)],
        [f"k{j}" for j in range(kv_len)],
        title="example 1: keys 4-5 padded",
    )
    fig.savefig(path, dpi=120)
    print(f"saved the attention heatmap to {path}")
