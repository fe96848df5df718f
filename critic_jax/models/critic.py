"""The critic: a `Transformer` backbone and a value head, with the one-position shift.

`values[:, t]` is V(s_t), the value of the prefix `tokens[:, :t]` of token t's own sequence, read
from the hidden state of the previous real token of the same segment. So the first token of each
sequence gets 0, a value never sees its own token, and no caller ever shifts. Trainers take the
parameters with `graphdef, params = nnx.split(critic, nnx.Param)` and rebuild the model inside a
jitted function with `nnx.merge(graphdef, params)`.

Two heads (`ModelConfig.value_head`): "scalar", one linear layer `d_model -> 1`, and "hl-gauss",
a linear layer `d_model -> K` whose logits are a categorical distribution over K fixed bin centres
(`Critic.support`); the value is its expectation, and `Critic.logits_and_values` returns the
logits for the HL-Gauss cross-entropy loss. Both heads run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from critic_jax.models.config import VALUE_HEAD_INITS, ModelConfig
from critic_jax.models.segments import prepare_inputs, segment_ids_from, segment_layout
from critic_jax.models.transformer import Transformer, make_param, partitioned


def _gather_previous(x_bt: jax.Array, previous_bt: jax.Array) -> jax.Array:
    """x[b, previous[b, t]] (any trailing axes), 0 where previous is -1; float32."""
    x_bt = x_bt.astype(jnp.float32)
    idx_bt = jnp.maximum(previous_bt, 0).reshape(previous_bt.shape + (1,) * (x_bt.ndim - 2))
    prev_bt = jnp.take_along_axis(x_bt, idx_bt, axis=1)
    keep_bt = (previous_bt >= 0).reshape(idx_bt.shape)
    return jnp.where(keep_bt, prev_bt, 0.0)


def shift_values(
    scores_bt: jax.Array,
    attention_mask: jax.typing.ArrayLike | None = None,
    *,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Turns per-position head outputs into values aligned to token positions.

    values[b, t] = scores[b, s] with s the previous real position of t's segment (s < t,
    seg[s] == seg[t]), or 0 at each segment's first token. Without padding this is
    `values[:, t] = scores[:, t - 1]`, `values[:, 0] = 0`. A real token preceded only by left
    padding gets 0, exactly like the first token of the unpadded sequence, so padding never
    changes a value on a real position. A padding position gets the score of the last real
    position before it (finite, to be masked by the caller).

    Args:
      scores_bt: float [B, T] or [B, T, K] head output at each position (a function of
        tokens[:, :t+1]).
      attention_mask: [B, T] nonzero on real tokens (an integer mask may hold segment ids), or
        None (all real).
      segment_ids: int [B, T] ids of the packed sequences, 0 on padding.

    Returns:
      float32, the shape of `scores_bt`.
    """
    shape = scores_bt.shape[:2]
    seg_bt = segment_ids_from(shape, attention_mask, segment_ids)
    _, previous_bt = segment_layout(seg_bt, shape)
    return _gather_previous(scores_bt, previous_bt)


class ValueHead(nnx.Module):
    """Hidden states [B, T, D] -> float32 per-position scores [B, T] (one linear layer, bias)."""

    def __init__(
        self,
        d_model: int,
        *,
        init: str = "zeros",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
        outputs: int | None = None,
    ):
        if init not in VALUE_HEAD_INITS:
            raise ValueError(
                f"Unknown value head init {init!r}; valid: {', '.join(VALUE_HEAD_INITS)}. "
                f"Received: {init!r}"
            )
        if init == "zeros":
            kernel_init = nnx.initializers.zeros_init()  # V = 0 at step 0: no wild early targets.
        else:
            kernel_init = nnx.initializers.normal(1.0 / (d_model + 1))
        self.outputs = outputs
        self.proj = nnx.Linear(
            d_model,
            outputs or 1,
            dtype=jnp.float32,
            param_dtype=jnp.dtype(param_dtype),
            kernel_init=partitioned(kernel_init, ("embed", None)),
            bias_init=partitioned(nnx.initializers.zeros_init(), (None,)),
            rngs=rngs,
        )

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        out = self.proj(h_btd.astype(jnp.float32))
        return out if self.outputs else out[..., 0]


class HLGaussHead(ValueHead):
    """Hidden states [B, T, D] -> float32 logits [B, T, bins] over the value support."""

    def __init__(
        self,
        d_model: int,
        *,
        bins: int,
        init: str = "zeros",
        param_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        super().__init__(d_model, init=init, param_dtype=param_dtype, rngs=rngs, outputs=bins)


def make_value_head(config: ModelConfig, rngs: nnx.Rngs) -> ValueHead:
    """The head `config.value_head` names, initialised by `config.value_head_init`."""
    kwargs = dict(init=config.value_head_init, param_dtype=config.param_dtype, rngs=rngs)
    if config.value_head == "hl-gauss":
        return HLGaussHead(config.d_model, bins=config.value_bins, **kwargs)
    return ValueHead(config.d_model, **kwargs)


def _head_outputs(
    config: ModelConfig, head: ValueHead, h_btd: jax.Array, seg_bt: jax.Array | None
) -> tuple[jax.Array | None, jax.Array]:
    """(shifted logits [B, T, K] or None, shifted values [B, T]) from final hidden states."""
    _, previous_bt = segment_layout(seg_bt, h_btd.shape[:2])
    if config.value_head == "scalar":
        return None, _gather_previous(head(h_btd), previous_bt)
    logits_btk = head(h_btd)
    expected_bt = jax.nn.softmax(logits_btk, axis=-1) @ jnp.asarray(config.value_support)
    return _gather_previous(logits_btk, previous_bt), _gather_previous(expected_bt, previous_bt)


class Critic(nnx.Module):
    """V(s_t) for every position: `Critic(config, rngs=...)(tokens, attention_mask) -> [B, T]`.

    Attributes:
      backbone: the `Transformer`.
      head: the `ValueHead` (or `HLGaussHead` when `config.value_head == "hl-gauss"`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Transformer(config, rngs=rngs)
        self.head = make_value_head(config, rngs)

    def __call__(
        self,
        tokens: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike | None = None,
        *,
        segment_ids: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Values aligned to token positions.

        Args:
          tokens: int [B, T] token ids.
          attention_mask: [B, T] nonzero on real tokens (any padding layout; an integer mask may
            hold segment ids), or None.
          segment_ids: int [B, T] ids of the sequences packed in each row, 0 on padding.

        Returns:
          float32 [B, T]: values[:, t] = value read at the previous real position of t's
          sequence, which depends only on that sequence's tokens before t; 0 at each sequence's
          first token (see `shift_values`). With "hl-gauss", the expectation over `support`.

        Raises:
          ValueError: on a non-integer or non-2-D `tokens`, or a mask of another shape.
        """
        tokens_bt, seg_bt = prepare_inputs(tokens, attention_mask, segment_ids)
        h_btd = self.backbone.hidden(tokens_bt, seg_bt)
        return _head_outputs(self.config, self.head, h_btd, seg_bt)[1]

    def logits_and_values(
        self,
        tokens: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike | None = None,
        *,
        segment_ids: jax.typing.ArrayLike | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """The "hl-gauss" head's logits and the values, both aligned to token positions.

        Returns:
          (logits, values): float32 [B, T, K] logits shifted like the values (0 at each
          sequence's first token), and float32 [B, T] values = softmax(logits) @ support (0 at
          each sequence's first token).

        Raises:
          ValueError: if the head is not "hl-gauss", and as `__call__`.
        """
        if self.config.value_head != "hl-gauss":
            raise ValueError(
                "logits_and_values needs model.value_head='hl-gauss'. "
                f"Received: {self.config.value_head!r}"
            )
        tokens_bt, seg_bt = prepare_inputs(tokens, attention_mask, segment_ids)
        h_btd = self.backbone.hidden(tokens_bt, seg_bt)
        return _head_outputs(self.config, self.head, h_btd, seg_bt)  # type: ignore[return-value]

    @property
    def support(self) -> jax.Array:
        """float32 [K] bin centres of the "hl-gauss" head: linspace(value_min, value_max, K)."""
        return jnp.asarray(self.config.value_support)

    @property
    def sigma(self) -> float:
        """The HL-Gauss target's std: `value_sigma_ratio` times the bin width."""
        return self.config.value_sigma


class ActorCritic(nnx.Module):
    """One trunk with an LM head and a value head: `(tokens, mask) -> (logits, values)`.

    Attributes:
      backbone: the shared `Transformer`.
      lm_head: [D, V] output projection, or None when `config.tie_embeddings`.
      head: the value head.
      stop_value_grad: if True the value head's gradient stops at the trunk (the value loss then
        trains only the head).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stop_value_grad: bool = False):
        self.config = config
        self.stop_value_grad = stop_value_grad
        self.backbone = Transformer(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_embeddings
            else make_param(
                rngs,
                nnx.initializers.normal(config.init_std),
                (config.d_model, config.vocab_size),
                ("embed", "vocab"),
                config.storage_dtype,
            )
        )
        self.head = make_value_head(config, rngs)

    def __call__(
        self,
        tokens: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike | None = None,
        *,
        segment_ids: jax.typing.ArrayLike | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Next-token logits and values.

        Args:
          tokens: int [B, T] token ids.
          attention_mask: [B, T] nonzero on real tokens (or segment ids), or None.
          segment_ids: int [B, T] ids of the packed sequences, 0 on padding.

        Returns:
          (logits, values): float32 [B, T, V] where logits[:, t] predicts token t + 1 (the usual
          LM alignment), and float32 [B, T] values exactly as `Critic` returns them.
        """
        tokens_bt, seg_bt = prepare_inputs(tokens, attention_mask, segment_ids)
        h_btd = self.backbone.hidden(tokens_bt, seg_bt)
        logits_btv = self.backbone.logits(h_btd, self.lm_head)
        h_value_btd = jax.lax.stop_gradient(h_btd) if self.stop_value_grad else h_btd
        return logits_btv, _head_outputs(self.config, self.head, h_value_btd, seg_bt)[1]
