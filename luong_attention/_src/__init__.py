"""The implementation behind the public modules, in four layers: ``modules`` over ``functional``
over ``kernels`` over ``primitives`` (each imports only the layers below it; ``lint-imports``)."""
