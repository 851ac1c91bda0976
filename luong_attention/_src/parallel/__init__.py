"""Sequence parallelism: strategy choice and entry (``sequence``), the ring (``ring``),
replicated queries (``replicated``), the per-block work both share (``blocks``) and how a
sequence is laid out over the devices (``layout``)."""
