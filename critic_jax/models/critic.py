"""The critic: a `Transformer` backbone and a linear value head, with the one-position shift.

`values[:, t]` is V(s_t), the value of the prefix `tokens[:, :t]`, read from the hidden state of
the last real token before t. So `values[:, 0] = 0`, a value never sees its own token, and no
caller ever shifts. Trainers take the parameters with `graphdef, params = nnx.split(critic,
nnx.Param)` and rebuild the model inside a jitted function with `nnx.merge(graphdef, params)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from critic_jax.models.transformer import (
    VALUE_HEAD_INITS,
    ModelConfig,
    Transformer,
    make_param,
    partitioned,
)


def shift_values(scores_bt: jax.Array, attention_mask: jax.typing.ArrayLike | None) -> jax.Array:
    """Turns per-position head outputs into values aligned to token positions.

    values[b, t] = scores[b, s] with s the last real position before t (s < t, mask[b, s] != 0),
    or 0 when there is none. Without padding this is `values[:, t] = scores[:, t - 1]`,
    `values[:, 0] = 0`. A real token preceded only by left padding gets 0, exactly like the first
    token of the unpadded sequence, so padding never changes a value on a real position.

    Args:
      scores_bt: float [B, T] head output at each position (a function of tokens[:, :t+1]).
      attention_mask: [B, T] nonzero on real tokens, or None (all real).

    Returns:
      float32 [B, T] values.
    """
    scores_bt = scores_bt.astype(jnp.float32)
    b, t = scores_bt.shape
    idx_t = jnp.arange(t, dtype=jnp.int32)
    if attention_mask is None:
        last_bt = jnp.broadcast_to(idx_t - 1, (b, t))
    else:
        real_bt = jnp.asarray(attention_mask) != 0
        last_real_bt = jax.lax.cummax(jnp.where(real_bt, idx_t, -1), axis=1)
        # Last real position strictly before t.
        last_bt = jnp.pad(last_real_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    prev_bt = jnp.take_along_axis(scores_bt, jnp.maximum(last_bt, 0), axis=1)
    return jnp.where(last_bt >= 0, prev_bt, 0.0)


class ValueHead(nnx.Module):
    """Hidden states [B, T, D] -> float32 per-position scores [B, T] (one linear layer, bias)."""

    def __init__(
        self, d_model: int, *, init: str = "zeros", param_dtype: str = "float32", rngs: nnx.Rngs
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
        self.proj = nnx.Linear(
            d_model,
            1,
            dtype=jnp.float32,
            param_dtype=jnp.dtype(param_dtype),
            kernel_init=partitioned(kernel_init, ("embed", None)),
            bias_init=partitioned(nnx.initializers.zeros_init(), (None,)),
            rngs=rngs,
        )

    def __call__(self, h_btd: jax.Array) -> jax.Array:
        return self.proj(h_btd.astype(jnp.float32))[..., 0]


class Critic(nnx.Module):
    """V(s_t) for every position: `Critic(config, rngs=...)(tokens, attention_mask) -> [B, T]`.

    Attributes:
      backbone: the `Transformer`.
      head: the `ValueHead`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Transformer(config, rngs=rngs)
        self.head = ValueHead(
            config.d_model, init=config.value_head_init, param_dtype=config.param_dtype, rngs=rngs
        )

    def __call__(
        self, tokens: jax.typing.ArrayLike, attention_mask: jax.typing.ArrayLike | None = None
    ) -> jax.Array:
        """Values aligned to token positions.

        Args:
          tokens: int [B, T] token ids.
          attention_mask: [B, T] nonzero on real tokens (any padding layout), or None.

        Returns:
          float32 [B, T]: values[:, t] = head(hidden at the last real position before t), which
          depends only on tokens[:, :t]; values[:, 0] = 0 (see `shift_values`).

        Raises:
          ValueError: on a non-integer or non-2-D `tokens`, or a mask of another shape.
        """
        h_btd = self.backbone(tokens, attention_mask)
        return shift_values(self.head(h_btd), attention_mask)


class ActorCritic(nnx.Module):
    """One trunk with an LM head and a value head: `(tokens, mask) -> (logits, values)`.

    Attributes:
      backbone: the shared `Transformer`.
      lm_head: [D, V] output projection, or None when `config.tie_embeddings`.
      head: the `ValueHead`.
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
        self.head = ValueHead(
            config.d_model, init=config.value_head_init, param_dtype=config.param_dtype, rngs=rngs
        )

    def __call__(
        self, tokens: jax.typing.ArrayLike, attention_mask: jax.typing.ArrayLike | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Next-token logits and values.

        Args:
          tokens: int [B, T] token ids.
          attention_mask: [B, T] nonzero on real tokens, or None.

        Returns:
          (logits, values): float32 [B, T, V] where logits[:, t] predicts token t + 1 (the usual
          LM alignment), and float32 [B, T] values exactly as `Critic` returns them.
        """
        h_btd = self.backbone(tokens, attention_mask)
        logits_btv = self.backbone.logits(h_btd, self.lm_head)
        h_value_btd = jax.lax.stop_gradient(h_btd) if self.stop_value_grad else h_btd
        return logits_btv, shift_values(self.head(h_value_btd), attention_mask)
