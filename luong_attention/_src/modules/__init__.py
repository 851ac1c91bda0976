"""Flax modules (linen ``Attention``, the Luong modules, their nnx twins) and the Keras config
conversion: parameters and calls only, the maths is in ``functional``."""
