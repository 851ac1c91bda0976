"""``keras.layers.Attention`` computed by :func:`attention` on Keras's JAX backend.

The only module of the library that imports Keras (an optional extra:
``pip install "luong-attention[keras]"``); nothing else imports this one. Keras picks its
backend when it is first imported: set ``KERAS_BACKEND=jax`` before that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from jax.typing import DTypeLike

from luong_attention._src.functional.attention import Implementation
from luong_attention._src.modules.call import CallSettings, call_attention
from luong_attention._src.primitives.scores import PrecisionLike

# Keras's registry key is "<package>>Attention", distinct from Keras's own "Attention".
_PACKAGE = "luong_attention"


@keras.saving.register_keras_serializable(package=_PACKAGE, name="Attention")
class Attention(keras.layers.Attention):
    """``keras.layers.Attention`` whose JAX-backend call runs :func:`luong_attention.attention`.

    A subclass with the same constructor, config, weights (``scale``, ``concat_score_weight``),
    call signature, masks (``compute_mask`` passes the query mask on) and dtype policies. On the
    JAX backend the call is one :func:`~luong_attention.attention` call, which switches to the
    blocked path (memory linear in the lengths, no ``[Tq, Tv]`` score matrix) when
    :func:`~luong_attention.select_implementation` says so (for ``"dot"``, from
    ``Tq * Tv >= 2**20`` per example) and the weights are not requested
    (``return_attention_scores`` needs the dense ``[Tq, Tv]`` weights). On any other backend
    the call is Keras's own.

    The numbers are Keras's (up to float32 rounding) with these intended differences:

    * scores and softmax run in float32 for float16/bfloat16 inputs (``mixed_bfloat16``), the
      output is in the compute dtype;
    * dropout draws its key from the layer's ``SeedGenerator`` as Keras does; the dense path
      then drops exactly the weights Keras drops, the blocked path draws its own mask per tile;
    * bad shapes raise ``ValueError`` naming the argument instead of an XLA error.

    Three constructor arguments of :func:`~luong_attention.attention` are added, keyword-only
    and, as in the Flax module, not part of ``get_config()`` (so the config stays the plain
    layer's, and ``from_config`` gives their defaults):

    * ``implementation``: ``None`` (pick as above), ``"xla"``, ``"blocked"`` or ``"pallas"``;
    * ``matmul_dtype``: operand dtype of the two attention matmuls (``None``: the compute
      dtype, or float32 for bfloat16/float16 on a CPU without matrix units for them);
    * ``precision``: matmul precision of the ``"xla"`` path.

    They are checked at construction (``ValueError``/``TypeError``).

    The class is registered as ``"luong_attention>Attention"``: a ``.keras`` file saved with
    it loads back once ``luong_attention.keras`` is imported. A model saved with the plain
    layer loads as it was saved (Keras resolves its own layers before ``custom_objects``);
    :func:`swap_attention` then puts this layer in its place.

    Example usage::

      >>> import numpy as np
      >>> from luong_attention.keras import Attention
      >>> layer = Attention(use_scale=True, name="attention")
      >>> query, value = np.ones((2, 3, 4), "float32"), np.ones((2, 5, 4), "float32")
      >>> output, weights = layer([query, value], return_attention_scores=True)
      >>> tuple(output.shape), tuple(weights.shape), [w.path for w in layer.weights]
      ((2, 3, 4), (2, 3, 5), ['attention/scale'])
    """

    def __init__(
        self,
        *args: Any,
        implementation: Implementation | None = None,
        matmul_dtype: DTypeLike | None = None,
        precision: PrecisionLike = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.implementation = implementation
        self.matmul_dtype = matmul_dtype
        self.precision = precision
        self._call_settings()  # checks them now, not at the first call

    def _call_settings(self) -> CallSettings:
        """This layer's :class:`CallSettings`: no cast (Keras autocasts the inputs) and no
        seed (it seeds ``self.seed_generator``, which the key is drawn from)."""
        return CallSettings(
            score_mode=self.score_mode,
            dropout=self.dropout,
            precision=self.precision,
            implementation=self.implementation,
            matmul_dtype=self.matmul_dtype,
        )

    def call(
        self,
        inputs: list[Any],
        mask: list[Any] | None = None,
        training: bool = False,
        return_attention_scores: bool = False,
        use_causal_mask: bool = False,
    ) -> Any:
        """As ``keras.layers.Attention.call``; see the class docstring for the differences.

        Args:
          inputs: ``[query, value]`` or ``[query, value, key]``: ``query [batch, Tq, dim]``,
            ``value [batch, Tv, dim_v]``, ``key [batch, Tv, dim]``.
          mask: ``None`` or ``[query_mask [batch, Tq], value_mask [batch, Tv]]`` (a third
            entry is ignored, as in Keras).
          training: apply dropout.
          return_attention_scores: also return the weights ``[batch, Tq, Tv]``.
          use_causal_mask: top-left aligned causal mask.

        Returns:
          ``output [batch, Tq, dim_v]`` or ``(output, weights)``, in the compute dtype.
        """
        if keras.backend.backend() != "jax":
            return super().call(
                inputs,
                mask=mask,
                training=training,
                return_attention_scores=return_attention_scores,
                use_causal_mask=use_causal_mask,
            )
        self._validate_inputs(inputs=inputs, mask=mask)  # Keras's checks and messages
        return call_attention(
            self._call_settings(),
            inputs,
            mask,
            training=training,
            return_attention_scores=return_attention_scores,
            use_causal_mask=use_causal_mask,
            scale=None if self.scale is None else self.scale.value,
            concat_score_weight=(
                None if self.concat_score_weight is None else self.concat_score_weight.value
            ),
            # Keras's own dropout draws from this generator too (its state is a variable, so
            # it advances inside a jitted ``fit`` step as well); Keras makes it for dropout only.
            draw_dropout_rng=self.seed_generator.next if self.dropout > 0 else None,
        )


def swap_attention(model: keras.Model) -> keras.Model:
    """A copy of ``model`` with :class:`Attention` in place of every ``keras.layers.Attention``.

    For a model built or loaded with the plain layer, e.g. from a ``.keras`` file:
    ``swap_attention(keras.models.load_model(path))``. The copy has the same configs and
    weights, so the same predictions; compile it again to train it. Works for functional and
    ``Sequential`` models (``keras.models.clone_model``), not for subclassed ones.

    Example usage::

      >>> import keras
      >>> from luong_attention.keras import Attention, example_classifier, swap_attention
      >>> plain = example_classifier(attention_layer=keras.layers.Attention)
      >>> type(swap_attention(plain).layers[2]) is Attention
      True
    """

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        cls = Attention if type(layer) is keras.layers.Attention else type(layer)
        return cls.from_config(layer.get_config())

    swapped = keras.models.clone_model(model, clone_function=clone)
    swapped.set_weights(model.get_weights())
    return swapped


def example_classifier(
    vocab_size: int = 1000,
    dim: int = 64,
    num_classes: int = 2,
    *,
    attention_layer: Callable[[], keras.layers.Layer] = Attention,
) -> keras.Model:
    """The README's example model: a sequence classifier with self-attention over the tokens.

    ``tokens [batch, length] (int, 0 = padding) -> Embedding(mask_zero=True) -> attention
    of every token over the whole sequence -> masked mean over the tokens -> Dense softmax
    [batch, num_classes]``. Any length works (the input is ``[batch, None]``); the padding
    mask reaches the attention as its query and value masks and the pooling through
    ``compute_mask``. ``luong-attention bench-keras`` trains it with ``attention_layer``
    ``Attention`` and ``keras.layers.Attention``.

    Args:
      vocab_size: number of token ids, 0 included.
      dim: embedding size (the attention's depth).
      num_classes: outputs of the classifier.
      attention_layer: builds the attention layer (called with no arguments).

    Returns:
      An uncompiled ``keras.Model``.

    Example usage::

      >>> import numpy as np
      >>> from luong_attention.keras import example_classifier
      >>> model = example_classifier(vocab_size=50, dim=8, num_classes=3)
      >>> tokens = np.array([[5, 7, 9, 0], [3, 0, 0, 0]])
      >>> tuple(model.predict(tokens, verbose=0).shape)
      (2, 3)
    """
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    embedded = keras.layers.Embedding(vocab_size, dim, mask_zero=True)(tokens)
    attended = attention_layer()([embedded, embedded])
    pooled = keras.layers.GlobalAveragePooling1D()(attended)
    probabilities = keras.layers.Dense(num_classes, activation="softmax")(pooled)
    return keras.Model(tokens, probabilities, name="example_classifier")
