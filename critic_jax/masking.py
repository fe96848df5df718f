"""Masked statistics: mean, variance and whitening over the valid entries of an array.

A mask is bool or numeric; nonzero marks a valid entry. Whatever sits at a masked position,
NaN and inf included, never reaches a result or a gradient: masked entries are replaced with
`jnp.where` before any arithmetic touches them. All arithmetic is float32.
"""

import jax
import jax.numpy as jnp

from critic_jax import _checks


def _sums(
    x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis, keepdims: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(x as float32 with masked entries zeroed, validity, sum over valid, count of valid)."""
    x = _checks.as_float("x", x)
    _checks.required(mask=mask)
    _checks.mask_broadcasts(x.shape, mask)
    valid = jnp.broadcast_to(_checks.valid(mask), x.shape)
    x = jnp.where(valid, x, 0.0)
    total = jnp.sum(x, axis=axis, keepdims=keepdims)
    count = jnp.sum(valid, axis=axis, keepdims=keepdims, dtype=jnp.float32)
    return x, valid, total, count


def masked_mean(
    x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of the valid entries of `x`.

    mean = Σ_i m_i·x_i / Σ_i m_i, with m_i = 1 where `mask` is nonzero, 0 elsewhere.

    Args:
      x: [...] float32, bfloat16 or float16 values.
      mask: bool or numeric, broadcastable to `x.shape`; nonzero marks a valid entry.
      axis: axis or axes to reduce; None reduces over all of them.

    Returns:
      float32 array of `x`'s shape without `axis`; 0 where there is no valid entry.

    Raises:
      ValueError: if `x` is not floating point or `mask` does not broadcast to `x`.
    """
    _, _, total, count = _sums(x, mask, axis)
    return total / jnp.maximum(count, 1.0)


def masked_var(
    x: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    unbiased: bool = True,
) -> jax.Array:
    """Variance of the valid entries of `x`, two-pass (centred) for accuracy.

    var = Σ_i m_i·(x_i − mean)² / (n − 1)   (unbiased, Bessel's correction; the default)
    var = Σ_i m_i·(x_i − mean)² / n         (unbiased=False)
    where n = Σ_i m_i. With fewer valid entries than the denominator needs (n < 2 unbiased,
    n < 1 biased) the variance is defined as 0: finite, never NaN, and with zero gradient.

    Args:
      x: [...] float32, bfloat16 or float16 values.
      mask: bool or numeric, broadcastable to `x.shape`; nonzero marks a valid entry.
      axis: axis or axes to reduce; None reduces over all of them.
      unbiased: divide by n − 1 instead of n.

    Returns:
      float32 array of `x`'s shape without `axis`.

    Raises:
      ValueError: if `x` is not floating point or `mask` does not broadcast to `x`.
    """
    x, valid, total, count = _sums(x, mask, axis, keepdims=True)
    mean = total / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, x - mean, 0.0)
    sq = jnp.sum(centred * centred, axis=axis)
    n = jnp.sum(valid, axis=axis, dtype=jnp.float32)
    denom = n - 1.0 if unbiased else n
    return jnp.where(denom > 0, sq / jnp.maximum(denom, 1.0), 0.0)


def masked_whiten(
    x: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """Whitens `x` to zero mean and unit variance over all its valid entries.

    y = (x − mean) / sqrt(var + eps)            (shift_mean=True)
    y = (x − mean) / sqrt(var + eps) + mean     (shift_mean=False: only rescaled)
    with mean and the unbiased var of `masked_mean` / `masked_var` over every valid entry of the
    whole array (as for advantages of a whole batch).

    If var + eps is 0 (eps = 0 and all valid entries equal, or fewer than two of them) there is
    no scale to divide by and the entries are only centred: y = x − mean (+ mean), finite.

    Args:
      x: [...] float32, bfloat16 or float16 values.
      mask: bool or numeric, broadcastable to `x.shape`; nonzero marks a valid entry.
      shift_mean: subtract the mean (True) or keep it (False).
      eps: added to the variance before the square root; >= 0 and finite; may be traced.

    Returns:
      float32 array of `x.shape`; 0 at masked positions.

    Raises:
      ValueError: if `x` is not floating point or None, `mask` does not broadcast to `x`, or a
        concrete `eps` is negative, NaN or infinite.
    """
    _checks.positive("eps", eps, allow_zero=True)
    x, valid, total, count = _sums(x, mask, None)
    mean = total / jnp.maximum(count, 1.0)
    var = masked_var(x, valid) + eps
    scale = jnp.where(var > 0, jax.lax.rsqrt(jnp.where(var > 0, var, 1.0)), 1.0)
    y = (x - mean) * scale
    if not shift_mean:
        y = y + mean
    return jnp.where(valid, y, 0.0)
