"""The application: a date-normalisation seq2seq model with Luong attention.

Built on the public API only (:mod:`luong_attention.luong`, :mod:`luong_attention.decoding`):
``dates`` (the synthetic dataset), ``seq2seq`` (encoder, attentional decoder, training step,
checkpoints), ``train`` (``luong-attention demo``), ``translate`` (``luong-attention
translate``), ``plotting`` (attention heatmaps) and ``arguments`` (the argument checks
the commands share).
"""
