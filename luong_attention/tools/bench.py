"""``luong-attention bench``: time and memory of our attention against Keras 3 and jax.nn.

For every row of a table of shapes (both score modes; forward, forward+grad, and for "dot"
the forward-mode ``jvp`` and the forward-over-reverse Hessian-vector product ``hvp``) it checks
that the implementations agree, then times them in this process, interleaved (each in turn
an untimed then a timed call, repeated; the median is reported), and measures memory as the
peak RSS growth of a child process running one compiled call. It writes ``bench.json`` and two plots
(``bench_time.png``, ``bench_memory.png``) to ``--out``.

Implementations: ``ours`` (:func:`luong_attention.attention` with its automatic dispatch),
``ours-xla`` and ``ours-blocked`` (forced), ``keras`` (``keras.layers.Attention`` on the JAX
backend, jitted; Keras is imported here only), ``jax.nn`` (``dot_product_attention`` with
``scale=1.0``, "dot" only) and, when PyTorch is importable, ``torch``
(``torch.nn.functional.scaled_dot_product_attention``, its hand-written C++ flash kernel on the
CPU, "dot" only). Torch runs in a child process of its own (same inputs, same loss, its own
medians, run before the in-process timings of the row), so its thread pool and allocator never
share a process with XLA's; it is no dependency (``pip install torch==2.13.0`` for the CPU build).

Memory, "one compiled call": the child builds the inputs, compiles the jitted function
(``lower().compile()``), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs
the call once and reports ``VmHWM - VmRSS before the call``: everything the call allocates
(temporaries, residuals for the gradient, outputs), but not the inputs or the compiler.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from luong_attention import attention, select_implementation
from luong_attention.date_demo import arguments

IMPLS = ("ours", "ours-xla", "ours-blocked", "keras", "jax.nn", "torch")
# The peers of the "ours / best peer" ratio (the targets); torch gets its own ratio.
PEERS = ("keras", "jax.nn")
# Skip an implementation on a row when its dense [B, Tq, Tv(, dim)] intermediates would pass
# this many bytes (the dense paths at T=65536 would need tens of GiB).
DENSE_LIMIT_BYTES = 6 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the bench's flags."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder")
    parser.add_argument(
        "--repeats", type=arguments.positive_int, default=None, help="timed calls per impl"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes")
    parser.add_argument(
        "--only", default=None, help="run only the rows with this tag (e.g. bfloat16, causal)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)


def _rows(quick: bool) -> list[dict[str, Any]]:
    """The benchmark table: dicts with mode, batch, length, dim, kind and tags."""
    if quick:
        rows = [
            dict(mode="dot", batch=2, length=t, dim=16, kind=kind)
            for t in (64, 256)
            for kind in ("fwd", "grad")
        ]
        rows += [
            dict(mode="concat", batch=2, length=64, dim=16, kind="grad"),
            dict(mode="dot", batch=2, length=64, dim=16, kind="grad", causal=True),
            dict(mode="dot", batch=2, length=64, dim=16, kind="fwd", dtype="bfloat16"),
            dict(mode="dot", batch=2, length=64, dim=16, kind="jvp"),
            dict(mode="dot", batch=2, length=64, dim=16, kind="hvp"),
        ]
        return [
            dict(
                row,
                dtype=row.get("dtype", "float32"),
                tags=[tag for tag, on in (("causal", row.get("causal")),
                                          ("bfloat16", "dtype" in row)) if on],
                measure_memory=i == 0,
            )
            for i, row in enumerate(rows)
        ]  # fmt: skip
    rows = [
        dict(mode="dot", batch=1, length=t, dim=64, kind=kind, tags=[], measure_memory=True)
        for t in (256, 1024, 2048, 4096, 8192, 16384)
        for kind in ("fwd", "grad")
    ]
    rows += [
        dict(mode="concat", batch=1, length=t, dim=64, kind=kind, tags=[], measure_memory=True)
        for t in (128, 512, 1024, 2048)
        for kind in ("fwd", "grad")
    ]
    rows += [
        dict(mode="concat", batch=4, length=512, dim=128, kind="grad", tags=["concat-memory"]),
        dict(mode="dot", batch=1, length=4096, dim=256, kind="fwd", tags=["efficiency"]),
        dict(mode="dot", batch=1, length=65536, dim=64, kind="grad", tags=["scale"]),
    ]
    # The causal mask (top-left aligned in every implementation, Tq == Tv).
    rows += [
        dict(mode="dot", batch=1, length=t, dim=64, kind=kind, causal=True, tags=["causal"])
        for t in (4096, 8192)
        for kind in ("fwd", "grad")
    ]
    # Mixed precision: half-precision inputs (the matmul operand dtype follows the machine,
    # see resolve_matmul_dtype), against Keras under the same dtype policy and torch.
    rows += [
        dict(
            mode="dot", batch=batch, length=t, dim=64, kind=kind, dtype=dtype, tags=[dtype, "half"]
        )
        for dtype, shapes in (
            ("bfloat16", ((1, 4096), (1, 8192), (8, 512), (8, 1024))),
            ("float16", ((1, 4096),)),
        )
        for batch, t in shapes
        for kind in ("fwd", "grad")
    ]
    # Forward mode (issue 19): jax.jvp and the forward-over-reverse Hessian-vector product,
    # beside forward and gradient of the same shapes (tagged too: one --only run has them all).
    rows += [
        dict(mode="dot", batch=1, length=t, dim=64, kind=kind, tags=["forward-mode"])
        for t in (1024, 4096, 8192)
        for kind in ("jvp", "hvp")
    ]
    rows.append(
        dict(mode="dot", batch=1, length=65536, dim=64, kind="jvp", tags=["scale", "forward-mode"])
    )
    for row in rows:
        if (
            row["kind"] in ("fwd", "grad")
            and row["length"] in (1024, 4096, 8192)
            and not (row["tags"] or row["mode"] != "dot")
        ):
            row["tags"] = ["forward-mode"]
    # Batches of short and of long rows: the dispatch rule's batch clause.
    rows += [
        dict(mode=mode, batch=batch, length=t, dim=64, kind=kind, tags=["batched"])
        for mode, batch, t in (("dot", 16, 256), ("dot", 8, 1024), ("concat", 16, 256))
        for kind in ("fwd", "grad")
    ]
    for row in rows:
        row.setdefault("measure_memory", "float32" == row.setdefault("dtype", "float32"))
        if row["mode"] == "dot" and row["length"] == 8192 and row["kind"] == "grad":
            row["tags"].append("dot-memory")
    return rows


def _inputs(row: dict[str, Any], seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``query, key, value`` of shape ``[batch, length, dim]`` in the row's dtype."""
    rng = np.random.default_rng(seed)
    shape = (row["batch"], row["length"], row["dim"])
    dtype = jnp.dtype(row.get("dtype", "float32"))
    return tuple(jnp.asarray(rng.normal(size=shape) / math.sqrt(row["dim"]), dtype)
                 for _ in range(3))  # fmt: skip


def _dense_bytes(row: dict[str, Any]) -> int:
    """Bytes of one dense score tensor of the row (times ``dim`` for concat)."""
    size = row["batch"] * row["length"] ** 2 * 4
    return size * row["dim"] if row["mode"] == "concat" else size


def _available(impl: str, row: dict[str, Any]) -> bool:
    """Whether ``impl`` runs on ``row`` (jax.nn has no concat; dense paths have a size cap)."""
    if impl in ("jax.nn", "torch") and row["mode"] != "dot":
        return False
    if impl == "torch" and row["kind"] not in ("fwd", "grad"):
        return False  # forward mode through its SDPA is not what torch users run
    if impl == "jax.nn" and row["dtype"] == "float16" and jax.default_backend() == "cpu":
        return False  # its float16 einsum asks for F16_F16_F32, which XLA:CPU rejects
    if impl == "torch" and importlib.util.find_spec("torch") is None:
        return False
    if impl in ("ours-xla", "keras", "jax.nn") and 3 * _dense_bytes(row) > DENSE_LIMIT_BYTES:
        return False
    if impl in ("ours-xla", "ours-blocked") and row["length"] > 4096:
        return False  # the forced paths document the dispatch rule; it is settled by then
    return not (impl == "ours-blocked" and row["length"] < 64)


def _forward_fn(
    impl: str, mode: str, causal: bool, dtype: str = "float32"
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``f(query, key, value) -> output`` for one implementation (unscaled scores)."""
    if impl.startswith("ours"):
        implementation = {"ours": None, "ours-xla": "xla", "ours-blocked": "blocked"}[impl]
        return lambda q, k, v: attention(
            q, v, k, score_mode=mode, use_causal_mask=causal, implementation=implementation
        )
    if impl == "jax.nn":
        return lambda q, k, v: jax.nn.dot_product_attention(
            q[:, :, None], k[:, :, None], v[:, :, None], scale=1.0, is_causal=causal
        )[:, :, 0]
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    # Keras under the inputs' dtype policy ("bfloat16": its softmax runs in bfloat16 too).
    layer = keras.layers.Attention(score_mode=mode, dtype=dtype)
    return lambda q, k, v: layer([q, v, k], use_causal_mask=causal)


def _built_keras(forward: Callable, dim: int) -> Callable:
    """Builds the Keras layer eagerly (its weights must not be created inside a trace)."""
    tiny = jnp.zeros((1, 2, dim), jnp.float32)
    forward(tiny, tiny, tiny)
    return forward


def _compiled(impl: str, row: dict[str, Any]) -> Callable:
    """The jitted pass of ``row["kind"]`` with respect to query, key and value: ``fwd``,
    ``grad`` (forward+gradient), ``jvp`` (output and its tangent) or ``hvp`` (the gradient's
    tangent: forward over reverse)."""
    forward = _forward_fn(impl, row["mode"], row.get("causal", False), row["dtype"])
    if impl == "keras":
        forward = _built_keras(forward, row["dim"])
    if row["kind"] == "fwd":
        return jax.jit(forward)
    # A fixed non-uniform cotangent, so no implementation can shortcut the backward pass.
    grad = jax.grad(
        lambda q, k, v: (forward(q, k, v) * v[..., :1]).astype(jnp.float32).sum(), (0, 1, 2)
    )
    if row["kind"] == "grad":
        return jax.jit(grad)
    # Tangents: the inputs in another order (non-uniform, no shortcut either).
    pushed = forward if row["kind"] == "jvp" else grad
    return jax.jit(lambda q, k, v: jax.jvp(pushed, (q, k, v), (v, q, k)))


def _max_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two (tuples of) arrays."""
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(_f32(x) - _f32(y)))) for x, y in leaves)


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _errors(row: dict[str, Any], results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Max and rms error of each forward output against float64 from the rounded inputs."""
    q, k, v = (np.asarray(_f32(x), np.float64) for x in _inputs(row))
    scores = q @ np.swapaxes(k, -1, -2)
    if row.get("causal"):
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    reference = (weights / weights.sum(-1, keepdims=True)) @ v
    errors = {}
    for impl, out in results.items():
        diff = np.asarray(_f32(out), np.float64) - reference
        errors[impl] = {"max": float(np.abs(diff).max()), "rms": float(np.sqrt((diff**2).mean()))}
    return errors


def _time_row(row: dict[str, Any], impls: list[str], repeats: int) -> dict[str, Any]:
    """Agreement check, then interleaved timings (median seconds) of ``impls`` on ``row``.

    ``torch`` is timed first, in its child process (:func:`_torch_child`, nothing else running);
    its output is checked against the same reference. A failed torch child drops the column.
    """
    q, k, v = _inputs(row)
    fns = {impl: _compiled(impl, row) for impl in impls if impl != "torch"}
    results = {impl: jax.block_until_ready(fn(q, k, v)) for impl, fn in fns.items()}
    torch_run = _run_torch(row, repeats) if "torch" in impls else None
    if torch_run is not None:
        results["torch"] = torch_run.pop("result")
    reference = results["ours-xla"] if "ours-xla" in results else results["ours"]
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(reference))
    agreement = {
        impl: _max_diff(out, reference) / max(scale, 1e-30) for impl, out in results.items()
    }
    # A sanity check (the accuracy contract lives in the tests): half precision, and Keras's
    # half-precision softmax, differ from the float32 peers by up to a few percent.
    tolerance = 1e-3 if row["dtype"] == "float32" else 0.25
    bad = {impl: d for impl, d in agreement.items() if not d < tolerance}
    if bad:
        raise RuntimeError(f"implementations disagree on {row}: relative max diff {bad}")
    errors = _errors(row, results) if row["dtype"] != "float32" and row["kind"] == "fwd" else None
    del results
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(repeats):
        for impl, fn in fns.items():
            # An untimed call first: the timed one then meets the allocator as a training
            # loop's next step does, not as left by the previous implementation (which made
            # whoever came after the most memory-hungry peer look 5-10% slower).
            jax.block_until_ready(fn(q, k, v))
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[impl].append(time.perf_counter() - start)
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    if torch_run is not None:
        medians["torch"] = torch_run["time_s"]
    torch_memory = None if torch_run is None else torch_run["memory"]
    report = {"time_s": medians, "agreement": agreement, "torch_memory": torch_memory}
    return report if errors is None else dict(report, errors=errors)


def _torch_child(spec: dict[str, Any]) -> None:
    """In the child: times torch's SDPA on the row's inputs (median of ``repeats``), measures
    the peak RSS growth of one call, saves the output (or gradients) to ``spec["out"]``."""
    import torch

    dtype = getattr(torch, spec.get("dtype", "float32"))
    q, k, v = (
        torch.from_numpy(np.asarray(_f32(x))[:, None].copy()).to(dtype) for x in _inputs(spec)
    )
    grad = spec["kind"] == "grad"

    def call() -> tuple[Any, ...]:
        qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, scale=1.0, is_causal=spec.get("causal", False)
        )
        if not grad:
            return (out.detach(),)
        return torch.autograd.grad((out * vv[..., :1]).float().sum(), (qq, kk, vv))

    # Memory of the first call (as for the jitted calls: nothing of it is cached yet; later
    # calls reuse the allocator's cached blocks and show almost no growth).
    result, memory = _first_call_memory(call)
    times = []
    for _ in range(spec["repeats"]):
        call()  # untimed, as in _time_row
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    np.savez(spec["out"], *(x[:, 0].float().numpy() for x in result))
    print(json.dumps({"time_s": statistics.median(times), "memory": memory}))


def _run_torch(row: dict[str, Any], repeats: int) -> dict[str, Any] | None:
    """Runs :func:`_torch_child`; its JSON plus ``result`` (arrays), or ``None`` on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.npz"
        report = _child(dict(row, repeats=repeats, out=str(out)), "--torch-child", "torch")
        if report is None:
            return None
        with np.load(out) as saved:
            arrays = tuple(jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files)))
    return dict(report, result=arrays if row["kind"] == "grad" else arrays[0])


def _child_memory(row: dict[str, Any]) -> None:
    """In the child: one compiled call; prints its peak RSS growth and time as JSON."""
    impl = row["impl"]
    q, k, v = _inputs(row)
    compiled = _compiled(impl, row).lower(q, k, v).compile()
    jax.block_until_ready((q, k, v))
    _, memory = _first_call_memory(lambda: jax.block_until_ready(compiled(q, k, v)))
    print(json.dumps(memory))


def _first_call_memory(call: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Runs ``call()`` once after resetting the peak-RSS mark; its result and
    ``{"rss_growth_bytes", "seconds"}`` (peak RSS during the call minus RSS before it)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    growth = (_status_kib("VmHWM") - before) * 1024
    return result, {"rss_growth_bytes": growth, "seconds": seconds}


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(
    spec: dict[str, Any], flag: str, what: str, command: str = "bench"
) -> dict[str, Any] | None:
    """Runs ``luong-attention COMMAND FLAG SPEC`` in a fresh process; its JSON, or ``None``."""
    proc = subprocess.run(
        [sys.executable, "-m", "luong_attention.tools.cli", command, flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        check=False,
    )
    if proc.returncode != 0:
        print(f"{what} child failed for {spec}: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_memory(row: dict[str, Any], impl: str) -> dict[str, float] | None:
    """Runs :func:`_child_memory` in a fresh process; ``None`` if it failed."""
    return _child(dict(row, impl=impl), "--child", "memory")


def _matmul_gflops(repeats: int, dtype: str = "float32") -> float:
    """GFLOP/s of a plain jitted 2048 x 2048 matmul of ``dtype`` operands, accumulated in
    float32 (median of ``repeats``)."""
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.normal(size=(2048, 2048)), dtype) for _ in range(2))
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def _forward_flops(row: dict[str, Any]) -> float:
    """Matmul FLOPs of a dot forward: ``QK^T`` and ``PV``."""
    return 4.0 * row["batch"] * row["length"] ** 2 * row["dim"]


def _machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
    }


def _summary(
    rows: list[dict[str, Any]], gflops: float, half_gflops: dict[str, float]
) -> dict[str, Any]:
    """The issue's targets, as ratios computed from the measured rows."""
    out: dict[str, Any] = {"matmul_gflops": gflops}
    out.update({f"{dtype}_matmul_gflops": rate for dtype, rate in half_gflops.items()})
    float32 = {_shape_key(r): r for r in rows if r["dtype"] == "float32"}
    for row in rows:
        twin = float32.get(_shape_key(row)) if row["dtype"] != "float32" else None
        if twin and "ours" in twin.get("time_s", {}) and "ours" in row.get("time_s", {}):
            row["speedup_over_float32"] = twin["time_s"]["ours"] / row["time_s"]["ours"]
        if row["dtype"] in half_gflops and row["kind"] == "fwd" and "ours" in row.get("time_s", {}):
            rate = _forward_flops(row) / row["time_s"]["ours"] / 1e9
            row["efficiency"] = rate / half_gflops[row["dtype"]]
    for row in rows:
        times, mem = row.get("time_s", {}), row.get("memory", {})
        peers = [times[p] for p in PEERS if p in times]
        if "ours" in times and peers:
            row["ratio_to_best_peer"] = times["ours"] / min(peers)
        if "ours" in times and "torch" in times:
            row["ratio_to_torch"] = times["ours"] / times["torch"]
        if "efficiency" in row["tags"] and "ours" in times:
            out["efficiency"] = _forward_flops(row) / times["ours"] / 1e9 / gflops
        for tag in ("dot-memory", "concat-memory"):
            if tag in row["tags"] and mem.get("ours") and mem.get("keras"):
                out[tag + "-keras/ours"] = mem["keras"]["rss_growth_bytes"] / max(
                    mem["ours"]["rss_growth_bytes"], 1
                )
        if "scale" in row["tags"] and mem.get("ours"):
            prefix = "scale" if row["kind"] == "grad" else f"{row['kind']}-scale"
            out[prefix + "-rss-growth-gib"] = mem["ours"]["rss_growth_bytes"] / 2**30
            out[prefix + "-seconds"] = mem["ours"]["seconds"]
    out.update(_forward_mode_ratios(rows))
    return out


def _forward_mode_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``ours`` jvp / forward and hvp / gradient time of each jvp or hvp row whose forward or
    gradient twin (same problem) was timed in the run."""
    ours = {
        (_shape_key(r)[:4], bool(r.get("causal")), r["dtype"], r["kind"]): r["time_s"]["ours"]
        for r in rows
        if "ours" in r.get("time_s", {})
    }
    ratios = {}
    for (shape, causal, dtype, kind), seconds in ours.items():
        base = {"jvp": "fwd", "hvp": "grad"}.get(kind)
        if base and (shape, causal, dtype, base) in ours:
            _, batch, length, _ = shape
            name = f"{kind}/{base} T={length}" + (f" B={batch}" if batch != 1 else "")
            ratios[name] = seconds / ours[shape, causal, dtype, base]
    return ratios


def _shape_key(row: dict[str, Any]) -> tuple:
    """The row's problem without its dtype: (mode, batch, length, dim, kind, causal)."""
    keys = ("mode", "batch", "length", "dim", "kind")
    return (*(row[key] for key in keys), bool(row.get("causal")))


def _plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Time and memory against T (log-log), one panel per (mode, kind)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The B=1, dim 64 grid: untagged rows, the forward-mode rows and the T=8192 memory and
    # T=65536 scale rows.
    grid = [r for r in rows if set(r["tags"]) <= {"dot-memory", "scale", "forward-mode"}]
    if not grid:
        return []
    panels = sorted({(r["mode"], r["kind"]) for r in grid})
    # Two panels a row and one legend above them: readable at a documentation page's width.
    columns = min(2, len(panels))
    grid_rows = -(-len(panels) // columns)
    paths = []
    for metric, label in (("time_s", "median time [s]"), ("memory", "peak RSS growth [MiB]")):
        fig, axes = plt.subplots(
            grid_rows, columns, figsize=(4.4 * columns, 3.2 * grid_rows), squeeze=False
        )
        for ax in axes.flat[len(panels) :]:
            ax.set_axis_off()
        for ax, (mode, kind) in zip(axes.flat, panels, strict=False):
            table = [r for r in grid if (r["mode"], r["kind"]) == (mode, kind)]
            for impl in IMPLS:
                points = [
                    (r["length"], _metric_value(r, metric, impl))
                    for r in table
                    if _metric_value(r, metric, impl) is not None
                ]
                if points:
                    color = f"C{IMPLS.index(impl)}"  # one colour per impl in both plots
                    ax.plot(*zip(*points, strict=True), marker="o", label=impl, color=color)
            ax.set(xscale="log", yscale="log", xlabel="T = Tq = Tv", title=f"{mode} {kind}")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        _legend_above(fig, axes)
        path = out / f"bench_{'time' if metric == 'time_s' else 'memory'}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _legend_above(fig: Any, axes: Any) -> None:
    """One legend for all panels, above them, three entries a panel's width; the figure
    grows by the legend's height."""
    legend = {
        text: handle
        for ax in axes.flat
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True)
    }
    columns = 3 * axes.shape[1]
    top = 0.3 * -(-len(legend) // columns) + 0.2  # inches: the legend's rows and a margin
    fig.set_figheight(fig.get_figheight() + top)
    fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=columns)
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()))


def _metric_value(row: dict[str, Any], metric: str, impl: str) -> float | None:
    """Seconds, or MiB of RSS growth, of ``impl`` on ``row`` (``None`` if not measured)."""
    if metric == "time_s":
        return row.get("time_s", {}).get(impl)
    mem = row.get("memory", {}).get(impl)
    return None if not mem else max(mem["rss_growth_bytes"], 1) / 2**20


def run(args: argparse.Namespace) -> None:
    """Runs the benchmark and writes ``bench.json`` and the plots to ``args.out``."""
    if args.child:
        _child_memory(json.loads(args.child))
        return
    if args.torch_child:
        _torch_child(json.loads(args.torch_child))
        return
    from tqdm import tqdm

    arguments.check_writable(args.out, "--out")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    rows = _rows(args.quick)
    if args.only:
        chosen = [row for row in rows if args.only in row["tags"]]
        if not chosen:
            raise argparse.ArgumentError(None, f"--only {args.only}: no row has this tag")
        # Half-precision rows bring their float32 twins: the speed-up is a same-run ratio.
        twins = {_shape_key(row) for row in chosen if row["dtype"] != "float32"}
        rows = [
            r for r in rows if r in chosen or (r["dtype"] == "float32" and _shape_key(r) in twins)
        ]
    repeats = args.repeats or (2 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    gflops = _matmul_gflops(max(repeats, 5))
    half_gflops = {
        dtype: _matmul_gflops(max(repeats, 5), dtype)
        for dtype in sorted({row["dtype"] for row in rows} - {"float32"})
    }
    for row in tqdm(rows, desc="bench", unit="row"):
        q, k, v = _inputs(row)
        row["dispatch"] = select_implementation(row["mode"], q, k, v)
        del q, k, v
        impls = [i for i in IMPLS if _available(i, row)]
        if "scale" in row["tags"]:
            impls = []  # one call only, timed in the memory child
        elif row["kind"] in ("jvp", "hvp") or (
            row["tags"] and not {"batched", "causal", "forward-mode"} & set(row["tags"])
        ):
            impls = [i for i in impls if i in ("ours", *PEERS, "torch")]
        row["impls"] = impls
        torch_memory = None
        if impls:
            # Fewer calls where one takes seconds, more where one takes about a millisecond
            # (there the machine's jitter is the size of the differences between impls).
            dense = _dense_bytes(row)
            calls = min(repeats, 2) if dense >= 256 << 20 else repeats
            row.update(_time_row(row, impls, 3 * calls if dense < 16 << 20 else calls))
            torch_memory = row.pop("torch_memory")
            row["impls"] = impls = [i for i in impls if i in row["time_s"]]
        if "efficiency" in row["tags"]:
            # Re-measure next to the row and keep the best: the ratio must not flatter us.
            gflops = max(gflops, _matmul_gflops(max(repeats, 5)))
        wants_memory = row.pop("measure_memory") and not args.no_memory
        memory_impls = ["ours", "keras", "jax.nn"] if "scale" not in row["tags"] else ["ours"]
        row["memory"] = {
            impl: _measure_memory(row, impl)
            for impl in memory_impls
            if wants_memory and (impl == "ours" or impl in impls)
        }
        if wants_memory and torch_memory is not None:
            row["memory"]["torch"] = torch_memory
        result = {"machine": _machine(), "quick": args.quick, "rows": rows}
        result["summary"] = _summary(rows, gflops, half_gflops)
        (args.out / "bench.json").write_text(json.dumps(result, indent=1))  # after every row
    paths = _plot(rows, args.out)
    _print_table(rows, result["summary"])
    print(f"wrote {args.out / 'bench.json'} and {', '.join(map(str, paths))}")


def _print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """A Markdown table of the rows (ms and MiB) and the summary ratios."""
    mem_impls = ("ours", "keras", "jax.nn", "torch")
    print("| mode | dtype | B | T | dim | pass | " + " | ".join(f"{i} ms" for i in IMPLS)
          + " | ours/best peer | ours/torch | "
          + " | ".join(f"{i} MiB" for i in mem_impls) + " |")  # fmt: skip
    print("|" + "---|" * (6 + len(IMPLS) + 2 + len(mem_impls)))
    for r in rows:
        times = [_metric_value(r, "time_s", i) for i in IMPLS]
        mems = [_metric_value(r, "memory", i) for i in mem_impls]
        cells = [f"{1000 * t:.1f}" if t is not None else "-" for t in times]
        for ratio in ("ratio_to_best_peer", "ratio_to_torch"):
            cells += [f"{r[ratio]:.2f}" if ratio in r else "-"]
        cells += [f"{m:.1f}" if m is not None else "-" for m in mems]
        mode = r["mode"] + (" causal" if r.get("causal") else "")
        print(f"| {mode} | {r['dtype']} | {r['batch']} | {r['length']} | {r['dim']} | {r['kind']} | "
              + " | ".join(cells) + " |")  # fmt: skip
    half = {
        f"{r['mode']} {r['dtype']} B={r['batch']} T={r['length']} {r['kind']}": {
            key: r[key]
            for key in ("speedup_over_float32", "ratio_to_torch", "efficiency", "errors")
            if key in r
        }
        for r in rows
        if r["dtype"] != "float32"
    }
    if half:
        print(json.dumps(half, indent=1))
    print(json.dumps(summary, indent=1))
