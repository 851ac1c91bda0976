"""A character-level attentional encoder-decoder (Luong et al., 2015) for the date task.

Shapes: ``B`` batch, ``S`` source length (characters), ``T`` target length
(:data:`luong_attention.date_demo.dates.TARGET_LENGTH`), ``H`` encoder features per direction, ``D``
decoder features.

The encoder is a bidirectional LSTM (``flax.linen.RNN`` with ``seq_lengths``, so the backward
direction starts at each example's last character). The decoder is an LSTM with input feeding:
at every step it reads the previous output character together with the previous attentional
state ``h~ = tanh(W_c [context; h])``, attends over the encoder states with the "general" score
``h^T W_a s``, padding masked (:class:`luong_attention.luong.AttentionalDecoderCell` with
:class:`luong_attention.luong.LuongAttention`), and predicts the next character from ``h~``. The step runs under ``nn.scan``, both with teacher
forcing (training) and greedily (decoding).

References:
  Luong, Pham and Manning, "Effective Approaches to Attention-based Neural Machine
  Translation", EMNLP 2015.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import serialization

from luong_attention.date_demo.dates import BOS, TARGET_CHARS, TARGET_LENGTH
from luong_attention.luong import AttentionalDecoderCell, DecoderState, LuongAttention

# (the decoder cell's state, the previous prediction [B])
DecoderCarry = tuple[DecoderState, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`DateTranslator` (JSON-serialisable).

    ``max_source_length`` is the longest text the model was trained to read (the training
    sources' padded length); the model runs on longer ones but answers them at random.
    """

    source_vocab: int
    embed: int = 32
    encoder_features: int = 32
    decoder_features: int = 64
    target_vocab: int = len(TARGET_CHARS) + 1  # the target characters and BOS
    max_source_length: int = 40


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
            nn.RNN(nn.OptimizedLSTMCell(cfg.encoder_features)),
            nn.RNN(nn.OptimizedLSTMCell(cfg.encoder_features)),
        )
        return bi(x, seq_lengths=lengths)


class DecoderStep(nn.Module):
    """One decoder step: embed a character, :class:`AttentionalDecoderCell`, predict.

    Scanned over time by :class:`Decoder`.
    """

    config: ModelConfig
    greedy: bool = False

    @nn.compact
    def __call__(
        self, carry: DecoderCarry, token: jax.Array | None
    ) -> tuple[DecoderCarry, tuple[jax.Array, jax.Array]]:
        """Advances one step.

        Args:
          carry: ``(DecoderState, previous prediction [B])``.
          token: ``[B]`` input token (teacher forcing), or ``None`` when greedy (the previous
            prediction in ``carry`` is fed back).

        Returns:
          ``(carry, (logits [B, V], alignment [B, S]))``.
        """
        cfg = self.config
        state, previous = carry
        token = previous if self.greedy else token
        embedded = nn.Embed(cfg.target_vocab, cfg.embed, name="target_embed")(token)
        cell = AttentionalDecoderCell(
            nn.OptimizedLSTMCell(cfg.decoder_features),
            LuongAttention(score="general"),
            return_alignment=True,
            name="cell",
        )
        state, (h_tilde, alignment) = cell(state, embedded)
        logits = nn.Dense(cfg.target_vocab, name="output")(h_tilde)
        prediction = jnp.argmax(logits, axis=-1).astype(previous.dtype)
        return (state, prediction), (logits, alignment)


class Decoder(nn.Module):
    """Runs :class:`DecoderStep` over the ``T`` target positions with ``nn.scan``."""

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
          ``(logits [B, T, V], alignment [B, T, S])``.
        """
        cfg = self.config
        batch = memory.shape[0]
        zeros = jnp.zeros((batch, cfg.decoder_features), memory.dtype)
        # The LSTM carry (c, h), h~_0 = 0 and step 0, with the memory the steps attend over.
        steps = jnp.zeros((batch,), jnp.int32)
        state = DecoderState((zeros, zeros), zeros, memory, memory_mask, steps)
        scan = nn.scan(
            DecoderStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
            length=TARGET_LENGTH,
        )
        step = scan(cfg, greedy=inputs is None, name="step")
        bos = jnp.full((batch,), BOS, jnp.int32)
        _, (logits, alignment) = step((state, bos), inputs)
        return logits, alignment


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
    """A jitted ``(params, source [B, S], lengths [B]) -> (tokens [B, T], log_probs [B, T],
    weights [B, T, S])``.

    ``log_probs`` is the log-probability the model gave each chosen token (its confidence).
    """

    @jax.jit
    def decode(params, source, lengths):
        logits, weights = DateTranslator(config).apply({"params": params}, source, lengths)
        tokens = jnp.argmax(logits, axis=-1)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return tokens, jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0], weights

    return decode


# -- Checkpoints and inference ------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.msgpack"
CONFIG_FILE = "config.json"


def save_checkpoint(
    directory: Path, params: Any, config: ModelConfig, alphabet: str, **metadata: Any
) -> tuple[Path, Path]:
    """Writes the parameters (flax msgpack) and a JSON of the config, alphabet and metadata.

    Returns:
      ``(checkpoint path, config path)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / CHECKPOINT_FILE
    checkpoint.write_bytes(serialization.to_bytes(params))
    meta = directory / CONFIG_FILE
    payload = {"model": dataclasses.asdict(config), "alphabet": alphabet, **metadata}
    meta.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return checkpoint, meta


class CheckpointError(ValueError):
    """A checkpoint folder whose files exist but cannot be read as a model."""


def load_config(directory: Path) -> tuple[ModelConfig, str]:
    """Reads the config and alphabet that :func:`save_checkpoint` wrote, without the weights.

    Raises:
      FileNotFoundError: naming the missing file and how to make it.
      CheckpointError: naming the file when it is unreadable or malformed.
    """
    checkpoint, meta = directory / CHECKPOINT_FILE, directory / CONFIG_FILE
    for path in (checkpoint, meta):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: train a model first with `luong-attention demo --out "
                f"{directory}`."
            )
    try:
        payload = json.loads(meta.read_text(encoding="utf-8"))
        return ModelConfig(**payload["model"]), str(payload["alphabet"])
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{meta} is not a readable model config ({error!r})") from error


def load_checkpoint(directory: Path) -> tuple[Any, ModelConfig, str]:
    """Reads what :func:`save_checkpoint` wrote: ``(params, config, alphabet)``.

    Raises:
      FileNotFoundError: naming the missing file and how to make it.
      CheckpointError: naming the file that is unreadable, malformed or of another model.
    """
    config, alphabet = load_config(directory)
    checkpoint = directory / CHECKPOINT_FILE
    # The parameters' structure and shapes, traced without running the model's init.
    template = jax.eval_shape(lambda: init_params(config, source_length=1, seed=0))
    try:
        params = serialization.from_bytes(template, checkpoint.read_bytes())
    except Exception as error:  # msgpack and flax raise many types for a damaged file
        raise CheckpointError(f"{checkpoint} is not a readable checkpoint ({error!r})") from error
    if jax.tree.structure(params) != jax.tree.structure(template) or any(
        jnp.shape(loaded) != wanted.shape
        for loaded, wanted in zip(jax.tree.leaves(params), jax.tree.leaves(template), strict=True)
    ):
        raise CheckpointError(
            f"{checkpoint} does not hold the model that {directory / CONFIG_FILE} describes"
        )
    return params, config, alphabet
