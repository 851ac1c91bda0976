"""The kernels by name: the one place outside a kernel's module that knows it exists."""

from __future__ import annotations

from luong_attention._src.kernels import blocked, pallas_gpu, pallas_tpu
from luong_attention._src.kernels.api import Kernel

KERNELS: dict[str, Kernel] = {
    kernel.name: kernel
    for kernel in (
        blocked.KERNEL,
        pallas_gpu.KERNEL,
        pallas_gpu.INTERPRET_KERNEL,
        pallas_tpu.KERNEL,
    )
}


def get_kernel(name: str = "blocked") -> Kernel:
    """The kernel called ``name``.

    Raises:
      ValueError: for a name no kernel has.
    """
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}. Received: {name!r}")
    return KERNELS[name]
