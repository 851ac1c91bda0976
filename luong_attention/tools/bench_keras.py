"""``luong-attention bench-keras``: one Keras training step with our layer against the plain one.

The model is :func:`luong_attention.keras.example_classifier` (embedding, self-attention over
the whole sequence, masked mean, softmax classifier), built twice with the same weights: once
with :class:`luong_attention.keras.Attention`, once with ``keras.layers.Attention``. The last
tenth of every row is padding (token 0), so the attention runs with its padding masks.

One training step is Keras's JAX training step written out: ``model.stateless_call`` in
training mode, the loss, ``jax.value_and_grad``, ``optimizer.stateless_apply`` (Adam), jitted.
For each sequence length:

* memory: peak RSS growth of a child process running one compiled step (the child builds the
  model and data, compiles, resets the peak mark, runs the step once; see
  :mod:`luong_attention.tools.bench`), with the step's loss, which must agree between the two;
* time: median seconds per step of both, timed in this process, interleaved (each in turn an
  untimed then a timed step), from the same state.

The plain layer is skipped where its dense ``[batch, T, T]`` float32 scores would pass the
bench's dense limit (at T=32768 they alone need 4 GiB per example); its step is not timed
where it is not run, ours is then timed in its memory child (one step). Writes
``bench_keras.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from luong_attention.date_demo import arguments
from luong_attention.tools import bench

IMPLS = ("ours", "keras")
VOCAB, CLASSES = 1000, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the benchmark's flags."""
    parser.add_argument("--lengths", type=arguments.positive_int, nargs="+", default=[8192, 32768])
    parser.add_argument(
        "--batch", type=arguments.positive_int, default=1, help="sequences per step"
    )
    parser.add_argument(
        "--dim", type=arguments.positive_int, default=64, help="embedding size (attention depth)"
    )
    parser.add_argument(
        "--repeats", type=arguments.positive_int, default=5, help="timed steps per impl"
    )
    parser.add_argument("--quick", action="store_true", help="T=1024, dim 16, 2 repeats")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def _setup(spec: dict[str, Any]) -> tuple[Callable, tuple[Any, ...]]:
    """The jitted training step of ``spec["impl"]``'s model and its first arguments
    ``(trainable, non_trainable, optimizer_variables, tokens, labels)``.

    The weights come from a fixed Keras seed, so both impls start from the same ones.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    from luong_attention.keras import Attention, example_classifier

    layer = {"ours": Attention, "keras": keras.layers.Attention}[spec["impl"]]
    keras.utils.set_random_seed(0)
    model = example_classifier(VOCAB, spec["dim"], CLASSES, attention_layer=layer)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def step(trainable, non_trainable, optimizer_variables, tokens, labels):
        def loss(trainable):
            probabilities, new_non_trainable = model.stateless_call(
                trainable, non_trainable, tokens, training=True
            )
            return loss_fn(labels, probabilities), new_non_trainable

        (value, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )
        return value, trainable, non_trainable, optimizer_variables

    rng = np.random.default_rng(1)
    batch, length = spec["batch"], spec["length"]
    tokens = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    tokens[:, length - length // 10 :] = 0  # padding: the masks are in play
    labels = np.arange(batch, dtype=np.int32) % CLASSES
    args = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
        jax.numpy.asarray(tokens),
        jax.numpy.asarray(labels),
    )
    return jax.jit(step), args


def _child_step(spec: dict[str, Any]) -> None:
    """In the child: one compiled step; prints its loss, RSS growth and seconds as JSON."""
    import jax

    step, args = _setup(spec)
    compiled = step.lower(*args).compile()
    jax.block_until_ready(args)
    result, memory = bench._first_call_memory(lambda: jax.block_until_ready(compiled(*args)))
    print(json.dumps({"loss": float(result[0]), **memory}))


def _time_steps(specs: dict[str, dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each impl, interleaved, every step from the same state."""
    import jax

    steps = {impl: _setup(spec) for impl, spec in specs.items()}
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for step, args in steps.values():
        jax.block_until_ready(step(*args))  # compile
    for _ in range(repeats):
        for impl, (step, args) in steps.items():
            jax.block_until_ready(step(*args))  # untimed, as in bench._time_row
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


def _plain_runs(row: dict[str, Any]) -> bool:
    """Whether the plain layer's dense scores fit the bench's limit (see :mod:`bench`)."""
    return 3 * bench._dense_bytes(dict(row, mode="dot")) <= bench.DENSE_LIMIT_BYTES


def measure(length: int, batch: int, dim: int, repeats: int) -> dict[str, Any]:
    """One row: memory (children) and time (here) of both impls at ``length``."""
    row: dict[str, Any] = dict(length=length, batch=batch, dim=dim)
    row["scores_gib_per_example"] = length**2 * 4 / 2**30
    impls = [impl for impl in IMPLS if impl == "ours" or _plain_runs(row)]
    row["memory"] = {
        impl: bench._child(dict(row, impl=impl), "--child", "memory", command="bench-keras")
        for impl in impls
    }
    losses = [m["loss"] for m in row["memory"].values() if m]
    row["loss_agreement"] = max(losses) - min(losses) if len(losses) == len(IMPLS) else None
    if len(impls) == len(IMPLS):
        row["time_s"] = _time_steps({impl: dict(row, impl=impl) for impl in impls}, repeats)
    elif row["memory"]["ours"]:
        row["time_s"] = {"ours": row["memory"]["ours"]["seconds"]}  # one step, in the child
    memory, times = row["memory"], row.get("time_s", {})
    if memory.get("ours") and memory.get("keras"):
        row["memory_keras_over_ours"] = memory["keras"]["rss_growth_bytes"] / max(
            memory["ours"]["rss_growth_bytes"], 1
        )
    if len(times) == len(IMPLS):
        row["time_ours_over_keras"] = times["ours"] / times["keras"]
    return row


def run(args: argparse.Namespace) -> None:
    """Runs the rows and writes ``bench_keras.json``; prints a Markdown table."""
    if args.child:
        _child_step(json.loads(args.child))
        return
    arguments.check_writable(args.out, "--out")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    lengths, dim, repeats = args.lengths, args.dim, args.repeats
    if args.quick:
        lengths, dim, repeats = [1024], 16, 2
    rows = []
    for length in lengths:
        rows.append(measure(length, args.batch, dim, repeats))
        report = {"machine": bench._machine(), "quick": args.quick, "rows": rows}
        (args.out / "bench_keras.json").write_text(json.dumps(report, indent=1))
    print(format_table(rows))
    print(f"wrote {args.out / 'bench_keras.json'}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: per length, MiB of RSS growth and ms per step of both, and ratios."""
    lines = [
        "| T | B | dim | ours MiB | keras MiB | keras/ours memory | ours ms | keras ms "
        "| ours/keras time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = [r["memory"].get(impl) for impl in IMPLS]
        cells = [f"{m['rss_growth_bytes'] / 2**20:.0f}" if m else "-" for m in mem]
        ratio = r.get("memory_keras_over_ours")
        cells.append(f"{ratio:.1f}x" if ratio else "-")
        cells += [
            f"{1000 * r['time_s'][i]:.0f}" if i in r.get("time_s", {}) else "-" for i in IMPLS
        ]
        ratio = r.get("time_ours_over_keras")
        cells.append(f"{ratio:.2f}" if ratio else "-")
        lines.append(f"| {r['length']} | {r['batch']} | {r['dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
