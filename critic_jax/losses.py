"""The masked, optionally clipped value loss of the PPO critic and its four reductions."""

import math

import jax
import jax.numpy as jnp
import optax

from critic_jax import _checks

LOSS_TYPES = ("mse", "huber")
REDUCTIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _pointwise(x: jax.Array, loss_type: str, huber_delta) -> jax.Array:
    if loss_type == "mse":
        return 0.5 * x * x
    return optax.huber_loss(x, delta=huber_delta)


def reduction_denominator(mask: jax.typing.ArrayLike, reduction: str) -> jax.Array:
    """What `reduction` divides the summed token losses of `mask` [..., T] by (before the
    guard against 0): valid tokens, the constant T * rows, or rows with a valid token.

    A trainer that splits a minibatch into micro-batches scales each micro-batch's loss by
    `denominator(micro) / denominator(minibatch)`, so the sum is the minibatch's loss exactly.
    """
    valid = _checks.valid(mask)
    if reduction == "token-mean":
        return jnp.sum(valid, dtype=jnp.float32)
    if reduction == "seq-mean-token-sum-norm":
        return jnp.float32(math.prod(valid.shape))
    return jnp.sum(jnp.any(valid, axis=-1), dtype=jnp.float32)


def _reduce(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
    """Reduces per-token `loss` [..., T] (0 at masked positions) to a scalar."""
    if reduction == "seq-mean-token-mean":
        row_count = jnp.sum(valid, axis=-1, dtype=jnp.float32)
        total = jnp.sum(jnp.sum(loss, axis=-1) / jnp.maximum(row_count, 1.0))
    else:  # empty rows add 0 to the sum and drop out of the seq-* denominators
        total = jnp.sum(loss)
    return total / jnp.maximum(reduction_denominator(valid, reduction), 1.0)


def value_loss(
    values: jax.typing.ArrayLike,
    old_values: jax.typing.ArrayLike | None,
    returns: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    clip_eps: float | jax.Array | None = None,
    loss_type: str = "mse",
    huber_delta: float | jax.Array = 1.0,
    reduction: str = "seq-mean-token-mean",
) -> jax.Array:
    """Masked critic loss, optionally clipped around the rollout's values (PPO2).

    Per token, with e = values − returns:
      clip_eps is None:  l = f(e)
      otherwise:         vc = old_values + clip(values − old_values, −clip_eps, clip_eps),
                         l = max(f(vc − returns), f(e))      (the pessimistic clipped loss)
    f(x) = ½x² for loss_type="mse" and optax.huber_loss(x, delta=huber_delta) for "huber".

    Reductions, with m the validity mask, B the number of rows (product of the leading axes) and
    T the length of the last axis:
      "token-mean":              Σ l·m / Σ m over the whole batch;
      "seq-mean-token-mean":     mean over rows with a valid token of (Σ_t l·m / Σ_t m);
      "seq-mean-token-sum":      mean over rows with a valid token of Σ_t l·m;
      "seq-mean-token-sum-norm": Σ l·m / (T·B), a constant normaliser.
    A batch without any valid token gives exactly 0 with zero gradients.

    Args:
      values: [..., T] float32/bfloat16/float16 predictions V(s_t) (differentiated).
      old_values: [..., T] values at rollout time; may be None when `clip_eps` is None.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts. Masked positions may hold
        any garbage, NaN and inf included, in the other arrays.
      clip_eps: clip range of values around `old_values`, >= 0; None disables clipping.
      loss_type: "mse" or "huber".
      huber_delta: Huber threshold, > 0.
      reduction: one of the four names above.

    Returns:
      float32 scalar.

    Raises:
      ValueError: on mismatched shapes, non-floating inputs, an unknown `loss_type` or
        `reduction`, a negative `clip_eps`, a non-positive `huber_delta`, or `old_values=None`
        with clipping on.
    """
    _checks.option("loss_type", loss_type, LOSS_TYPES)
    _checks.option("reduction", reduction, REDUCTIONS)
    _checks.positive("clip_eps", clip_eps, allow_zero=True, allow_inf=True)
    _checks.positive("huber_delta", huber_delta, allow_zero=False)
    if clip_eps is not None and old_values is None:
        raise ValueError("`old_values` is required when `clip_eps` is set. Received: None.")
    _checks.same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    valid = _checks.valid(mask)
    # Zero the masked entries first: then every later op, and its derivative, stays finite.
    values = jnp.where(valid, _checks.as_float("values", values), 0.0)
    returns = jnp.where(valid, _checks.as_float("returns", returns), 0.0)
    loss = _pointwise(values - returns, loss_type, huber_delta)
    if clip_eps is not None:
        old_values = jnp.where(valid, _checks.as_float("old_values", old_values), 0.0)
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        loss = jnp.maximum(_pointwise(clipped - returns, loss_type, huber_delta), loss)
    loss = jnp.where(valid, loss, 0.0)
    return _reduce(loss, valid, reduction)
