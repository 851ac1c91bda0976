"""The kernels by name: the one place outside a kernel's module that knows it exists.

A kernel's module is imported when the kernel is first asked for, so ``import
luong_attention`` does not import Pallas (about 0.1 s) unless a Pallas kernel is used.
"""

from __future__ import annotations

import importlib

from luong_attention._src.kernels.api import Kernel

# name -> (module in luong_attention._src.kernels, attribute holding the Kernel)
KERNELS: dict[str, tuple[str, str]] = {
    "blocked": ("blocked", "KERNEL"),
    "pallas_gpu": ("pallas_gpu", "KERNEL"),
    "pallas_gpu_interpret": ("pallas_gpu", "INTERPRET_KERNEL"),
    "pallas_tpu": ("pallas_tpu", "KERNEL"),
}


def get_kernel(name: str = "blocked") -> Kernel:
    """The kernel called ``name``.

    Raises:
      ValueError: for a name no kernel has.
    """
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}. Received: {name!r}")
    module, attribute = KERNELS[name]
    return getattr(importlib.import_module(f"luong_attention._src.kernels.{module}"), attribute)
