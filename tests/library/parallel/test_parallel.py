"""Multiple devices: data parallel, sequence parallel and a two-process ``jax.distributed`` run.

The multi-device cases need several devices, which a CPU only offers when
``XLA_FLAGS=--xla_force_host_platform_device_count`` is set before JAX starts. So they run in
child processes, and the rest of the suite keeps its single device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import multihost_worker
import numpy as np
import pytest

import luong_attention as la
from luong_attention import parallel as lap

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent

TIMEOUT_S = 420


def _child_env(devices: int) -> dict[str, str]:
    """The environment of a child: CPU with ``devices`` host devices, this checkout first."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _report(what: str, output: str) -> str:
    return f"{what}\n----- child output (last 6000 chars) -----\n{output[-6000:]}"


def test_multidevice_cases_on_eight_host_devices():
    """Runs tests/library/parallel/multidevice_cases.py (data and sequence parallel) on 8 host devices."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command.append(str(HERE / "multidevice_cases.py"))
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=_child_env(8),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(_report(f"timed out after {TIMEOUT_S}s", str(err.stdout or "")))
    assert done.returncode == 0, _report(
        f"child pytest exited with {done.returncode}", done.stdout + done.stderr
    )
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(count: int, out_dir: Path) -> None:
    """Starts ``count`` workers joined over 127.0.0.1 and waits; fails with their output."""
    port = _free_port()
    script = str(HERE / "multihost_worker.py")
    workers = [
        subprocess.Popen(
            [sys.executable, script, str(index), str(count), str(port), str(out_dir)],
            cwd=ROOT,
            env=_child_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(count)
    ]
    outputs, failed = [], False
    for index, worker in enumerate(workers):
        try:
            output, _ = worker.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            output, _ = worker.communicate()
            failed = True
        failed = failed or worker.returncode != 0
        outputs.append(f"[process {index}, exit {worker.returncode}]\n{output}")
    if failed:
        pytest.fail(_report("a distributed worker failed", "\n".join(outputs)))


def test_zigzag_helpers_are_inverse_permutations_of_the_chunks():
    """Device d's slice holds natural chunks d and 2n-1-d (checked on positions)."""
    positions = np.arange(24)
    zigzag = np.asarray(lap.to_zigzag(positions, 3, axis=-1))
    chunks = positions.reshape(6, 4)
    want = np.concatenate([chunks[0], chunks[5], chunks[1], chunks[4], chunks[2], chunks[3]])
    np.testing.assert_array_equal(zigzag, want)
    np.testing.assert_array_equal(lap.from_zigzag(zigzag, 3, axis=-1), positions)


def test_ring_score_work_is_balanced_by_zigzag_and_covers_the_causal_pairs():
    """The forward's score work per device (kernel tiles): zigzag within 10% of the mean,
    contiguous not; every device computes at least its causal pairs (a NumPy count)."""
    length, devices = 8192, 4
    for layout, balanced in (("zigzag", True), ("contiguous", False)):
        work = lap.ring_score_work(length, length, devices, layout=layout).sum(axis=1)
        assert (work.max() / work.mean() <= 1.1) == balanced, (layout, work)
        positions = np.arange(length)
        if layout == "zigzag":
            positions = np.asarray(lap.to_zigzag(positions, devices, axis=-1))
        for device, rows in enumerate(positions.reshape(devices, -1)):
            assert work[device] >= np.sum(rows + 1), (layout, device)


@pytest.mark.slow
def test_two_processes_over_loopback_agree_with_one_process(tmp_path):
    """Two jax.distributed processes with 2 CPU devices each (a 4-device mesh) give the
    single-process, single-device result: outputs and gradients, both score modes with
    replicated queries, "dot" with the ring."""
    _run_processes(2, tmp_path)
    arrays = multihost_worker.inputs()
    results = [np.load(tmp_path / f"process_{index}.npz") for index in range(2)]
    for result in results:
        assert int(result["devices"]) == 4
        for strategy, score_mode in multihost_worker.RUNS:
            _check_process_result(result, strategy, score_mode, arrays)


def _check_process_result(result, strategy: str, score_mode: str, arrays) -> None:
    """One process's saved outputs and gradients of one run equal the core's."""
    loss = multihost_worker.loss(la.attention, score_mode)
    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        arrays["query"],
        arrays["key"],
        arrays["value"],
        jnp.float32(0.7),
        arrays["value_mask"],
        arrays["cotangent"],
    )
    for name, want in zip(("out", "query", "key", "value", "scale"), (out, *grads), strict=True):
        got = result[f"{strategy}_{score_mode}_{name}"]
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5, err_msg=f"{strategy} {score_mode} {name}"
        )
