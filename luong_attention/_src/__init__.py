"""The implementation behind the public modules, in five layers: ``modules`` over ``parallel``
over ``functional`` over ``kernels`` over ``primitives`` (each imports only the layers below it;
``lint-imports``). Kernels are reached through ``kernels.api`` and ``kernels.registry``."""
