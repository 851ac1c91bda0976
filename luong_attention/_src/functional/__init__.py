"""Pure functions, JAX only: ``attention`` and its dispatch, the Luong functions and decoder
step, decoding, sequence-parallel attention."""
