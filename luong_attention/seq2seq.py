"""A character-level attentional encoder-decoder (Luong et al., 2015) for the date task.

Shapes: ``B`` batch, ``S`` source length (characters), ``T`` target length
(:data:`luong_attention.dates.TARGET_LENGTH`), ``H`` encoder features per direction, ``D``
decoder features.

The encoder is a bidirectional LSTM (``flax.linen.RNN`` with ``seq_lengths``, so the backward
direction starts at each example's last character). The decoder is an LSTM with input feeding:
at every step it reads the previous output character together with the previous attentional
state ``h~ = tanh(W_c [context; h])``, attends over the encoder states with the "general" score
``h^T W_a s`` (:class:`luong_attention.Attention` over keys ``W_a s``), padding masked, and
predicts the next character from ``h~``. The step runs under ``nn.scan``, both with teacher
forcing (training) and greedily (decoding).

References:
  Luong, Pham and Manning, "Effective Approaches to Attention-based Neural Machine
  Translation", EMNLP 2015.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from luong_attention._src.module import Attention
from luong_attention.dates import BOS, TARGET_CHARS, TARGET_LENGTH

# (LSTM carry, attentional state h~ [B, D], previous output token [B])
DecoderCarry = tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`DateTranslator` (JSON-serialisable)."""

    source_vocab: int
    embed: int = 32
    encoder_features: int = 64
    decoder_features: int = 128
    target_vocab: int = len(TARGET_CHARS) + 1  # the target characters and BOS
    unroll: int = 1  # time steps per loop iteration of the scans (speed only)


class Encoder(nn.Module):
    """Character embedding and a bidirectional LSTM."""

    config: ModelConfig

    @nn.compact
    def __call__(self, source: jax.Array, lengths: jax.Array) -> jax.Array:
        """Encodes padded character ids.

        Args:
          source: ``[B, S]`` int ids (padding anywhere after ``lengths``).
          lengths: ``[B]`` number of real characters.

        Returns:
          ``[B, S, 2H]`` states (forward and backward concatenated).
        """
        cfg = self.config
        x = nn.Embed(cfg.source_vocab, cfg.embed)(source)
        bi = nn.Bidirectional(
            nn.RNN(nn.OptimizedLSTMCell(cfg.encoder_features), unroll=cfg.unroll),
            nn.RNN(nn.OptimizedLSTMCell(cfg.encoder_features), unroll=cfg.unroll),
        )
        return bi(x, seq_lengths=lengths)


class DecoderStep(nn.Module):
    """One decoder step with input feeding; scanned over time by :class:`Decoder`."""

    config: ModelConfig
    greedy: bool = False

    @nn.compact
    def __call__(
        self,
        carry: DecoderCarry,
        token: jax.Array | None,
        keys: jax.Array,
        memory: jax.Array,
        memory_mask: jax.Array,
    ) -> tuple[DecoderCarry, tuple[jax.Array, jax.Array]]:
        """Advances one step.

        Args:
          carry: ``((c, h) [B, D] each, h~ [B, D], previous token [B])``.
          token: ``[B]`` input token (teacher forcing), or ``None`` when greedy (the previous
            prediction in ``carry`` is fed back).
          keys: ``[B, S, D]`` attention keys ``W_a s``; memory: ``[B, S, 2H]`` encoder states;
          memory_mask: ``[B, S]`` bool, True at real characters.

        Returns:
          ``(carry, (logits [B, V], weights [B, S]))``.
        """
        cfg = self.config
        lstm_carry, attentional, previous = carry
        token = previous if self.greedy else token
        embedded = nn.Embed(cfg.target_vocab, cfg.embed, name="target_embed")(token)
        lstm_carry, h = nn.OptimizedLSTMCell(cfg.decoder_features, name="lstm")(
            lstm_carry, jnp.concatenate([embedded, attentional], axis=-1)
        )
        context, weights = Attention(name="attention")(
            [h[:, None, :], memory, keys],
            mask=[None, memory_mask],
            return_attention_scores=True,
        )
        attentional = jnp.tanh(
            nn.Dense(cfg.decoder_features, use_bias=False, name="combine")(
                jnp.concatenate([context[:, 0], h], axis=-1)
            )
        )
        logits = nn.Dense(cfg.target_vocab, name="output")(attentional)
        prediction = jnp.argmax(logits, axis=-1).astype(previous.dtype)
        return (lstm_carry, attentional, prediction), (logits, weights[:, 0])


class Decoder(nn.Module):
    """Runs :class:`DecoderStep` over the target positions with ``nn.scan``."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, memory: jax.Array, memory_mask: jax.Array, inputs: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Decodes ``T`` characters.

        Args:
          memory: ``[B, S, 2H]``; memory_mask: ``[B, S]`` bool.
          inputs: ``[B, T]`` teacher-forced input tokens (BOS then the target shifted right),
            or ``None`` for greedy decoding.

        Returns:
          ``(logits [B, T, V], weights [B, T, S])``.
        """
        cfg = self.config
        batch = memory.shape[0]
        keys = nn.Dense(cfg.decoder_features, use_bias=False, name="score_weight")(memory)
        zeros = jnp.zeros((batch, cfg.decoder_features), memory.dtype)
        carry = ((zeros, zeros), zeros, jnp.full((batch,), BOS, jnp.int32))
        scan = nn.scan(
            DecoderStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast),
            out_axes=1,
            length=TARGET_LENGTH,
            unroll=cfg.unroll,
        )
        step = scan(cfg, greedy=inputs is None, name="step")
        _, (logits, weights) = step(carry, inputs, keys, memory, memory_mask)
        return logits, weights


class DateTranslator(nn.Module):
    """Encoder, attentional decoder: source characters to ``YYYY-MM-DD``."""

    config: ModelConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def __call__(
        self, source: jax.Array, lengths: jax.Array, inputs: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(logits [B, T, V], weights [B, T, S])``; greedy when ``inputs`` is ``None``."""
        memory = self.encoder(source, lengths)
        memory_mask = jnp.arange(source.shape[1]) < lengths[:, None]
        return self.decoder(memory, memory_mask, inputs)


def teacher_inputs(targets: jax.Array) -> jax.Array:
    """``[B, T]`` decoder inputs: BOS, then ``targets [B, T]`` without its last token."""
    bos = jnp.full((targets.shape[0], 1), BOS, targets.dtype)
    return jnp.concatenate([bos, targets[:, :-1]], axis=1)


def init_params(config: ModelConfig, source_length: int, seed: int) -> Any:
    """Initial parameters for sources of ``source_length`` characters."""
    source = jnp.zeros((1, source_length), jnp.int32)
    lengths = jnp.ones((1,), jnp.int32)
    targets = jnp.zeros((1, TARGET_LENGTH), jnp.int32)
    model = DateTranslator(config)
    return model.init(jax.random.key(seed), source, lengths, teacher_inputs(targets))["params"]


def make_optimizer(
    steps: int, peak_learning_rate: float, warmup_steps: int, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """Adam with global-norm gradient clipping, linear warm-up then cosine decay to 1%."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_learning_rate,
        warmup_steps=min(warmup_steps, max(steps - 1, 1)),
        decay_steps=max(steps, 2),
        end_value=peak_learning_rate * 0.01,
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(schedule))


def loss_and_accuracy(
    params: Any, config: ModelConfig, source: jax.Array, lengths: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced cross entropy and exact-match rate.

    Args:
      source: ``[B, S]``; lengths: ``[B]``; targets: ``[B, T]`` ids.

    Returns:
      ``(mean loss per character, fraction of examples with every character right)``.
    """
    logits, _ = DateTranslator(config).apply(
        {"params": params}, source, lengths, teacher_inputs(targets)
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    exact = jnp.all(jnp.argmax(logits, axis=-1) == targets, axis=-1).mean()
    return loss, exact


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation):
    """A jitted ``(params, opt_state, source, lengths, targets) -> (params, opt_state, loss,
    accuracy)`` step."""

    @jax.jit
    def train_step(params, opt_state, source, lengths, targets):
        grad_fn = jax.value_and_grad(loss_and_accuracy, has_aux=True)
        (loss, accuracy), grads = grad_fn(params, config, source, lengths, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    return train_step


def make_greedy_decoder(config: ModelConfig):
    """A jitted ``(params, source [B, S], lengths [B]) -> (tokens [B, T], weights [B, T, S])``."""

    @jax.jit
    def decode(params, source, lengths):
        logits, weights = DateTranslator(config).apply({"params": params}, source, lengths)
        return jnp.argmax(logits, axis=-1), weights

    return decode
