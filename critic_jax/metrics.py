"""Critic diagnostics: explained variance and the statistics logged next to the value loss."""

import jax
import jax.numpy as jnp

from critic_jax import _checks
from critic_jax.masking import masked_mean, masked_var


def explained_variance(
    values: jax.typing.ArrayLike, returns: jax.typing.ArrayLike, mask: jax.typing.ArrayLike
) -> jax.Array:
    """Fraction of the variance of the returns that the values explain, over valid tokens.

    EV = 1 − Var_m[returns − values] / Var_m[returns]   (population variances over valid tokens).
    1 is a perfect critic, 0 is no better than a constant, negative is worse than a constant.
    Convention where the ratio is undefined: if the valid returns are all equal (or there are
    fewer than two valid tokens), EV = 0, since there is no variance to explain. The result is
    always finite: it is bounded below by the most negative float32.

    Args:
      values: [..., T] float32/bfloat16/float16 predictions.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts.

    Returns:
      float32 scalar.

    Raises:
      ValueError: on mismatched shapes or non-floating inputs.
    """
    _checks.same_shape(values=values, returns=returns, mask=mask)
    valid = _checks.valid(mask)
    values = jnp.where(valid, _checks.as_float("values", values), 0.0)
    returns = jnp.where(valid, _checks.as_float("returns", returns), 0.0)
    var_returns = masked_var(returns, valid, unbiased=False)
    var_residual = masked_var(returns - values, valid, unbiased=False)
    # Exact test for constant returns: a rounded variance of constant data need not be 0.
    lo = jnp.min(jnp.where(valid, returns, jnp.inf))
    hi = jnp.max(jnp.where(valid, returns, -jnp.inf))
    defined = (hi > lo) & (var_returns > 0)
    ev = 1.0 - var_residual / jnp.where(defined, var_returns, 1.0)
    ev = jnp.maximum(ev, jnp.finfo(jnp.float32).min)
    return jnp.where(defined, ev, 0.0)


def value_metrics(
    values: jax.typing.ArrayLike,
    old_values: jax.typing.ArrayLike,
    returns: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    clip_eps: float | jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Statistics of a critic update over the valid tokens, all float32 scalars.

    With e = values − returns and vc = old_values + clip(values − old_values, ±clip_eps):
      explained_variance: `explained_variance(values, returns, mask)`;
      clipfrac:     masked mean of 1[(vc − returns)² > e²], the fraction of tokens whose clipped
                    loss is the larger one (0 when clip_eps is None);
      vpred_mean:   masked mean of values;
      value_mse:    masked mean of e²;
      returns_mean: masked mean of returns;
      returns_var:  unbiased masked variance of returns (see `masked_var`).

    Args:
      values: [..., T] float32/bfloat16/float16 predictions.
      old_values: [..., T] values at rollout time.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts.
      clip_eps: the value-clipping range of the loss, or None.

    Returns:
      dict of float32 scalars with the keys above; 0 for means over an empty mask.

    Raises:
      ValueError: on mismatched shapes or non-floating inputs.
    """
    _checks.same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    valid = _checks.valid(mask)
    values = jnp.where(valid, _checks.as_float("values", values), 0.0)
    old_values = jnp.where(valid, _checks.as_float("old_values", old_values), 0.0)
    returns = jnp.where(valid, _checks.as_float("returns", returns), 0.0)
    err = values - returns
    if clip_eps is None:
        clipfrac = jnp.float32(0.0)
    else:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipfrac = masked_mean(((clipped - returns) ** 2 > err**2).astype(jnp.float32), valid)
    return {
        "explained_variance": explained_variance(values, returns, valid),
        "clipfrac": clipfrac,
        "vpred_mean": masked_mean(values, valid),
        "value_mse": masked_mean(err * err, valid),
        "returns_mean": masked_mean(returns, valid),
        "returns_var": masked_var(returns, valid),
    }
