"""Masked statistics: mean, variance and whitening over the valid entries of an array.

A mask is bool or numeric; nonzero marks a valid entry. Whatever sits at a masked position,
NaN and inf included, never reaches a result or a gradient: masked entries are replaced with
`jnp.where` before any arithmetic touches them. All arithmetic is float32.
"""

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = "float32, bfloat16 or float16"


def _as_float(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """`x` as float32, after checking that it holds floating-point numbers."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point array ({_FLOAT_DTYPES}). "
            f"Received: dtype {x.dtype}, shape {x.shape}."
        )
    return x.astype(jnp.float32)


def _valid(mask: jax.typing.ArrayLike) -> jax.Array:
    """Boolean validity of a bool or numeric mask: nonzero is valid."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _check_same_shape(**arrays: jax.typing.ArrayLike | None) -> tuple[int, ...]:
    """Raises unless every non-None array has the shape of the first; returns that shape.

    The time axis is the last one, so arrays must have at least one dimension.
    """
    shapes = {k: np.shape(v) for k, v in arrays.items() if v is not None}
    first_name, first = next(iter(shapes.items()))
    if len(first) == 0:
        raise ValueError(
            f"`{first_name}` must have a time axis: shape [..., T]. Received: shape {first}."
        )
    for name, shape in shapes.items():
        if shape != first:
            listing = ", ".join(f"{k}={s}" for k, s in shapes.items())
            raise ValueError(
                f"Shape mismatch: `{name}` must have the shape of `{first_name}` {first}. "
                f"Received: {listing}."
            )
    return first


def _check_mask_broadcasts(x_shape: tuple[int, ...], mask: jax.typing.ArrayLike) -> None:
    mask_shape = np.shape(mask)
    try:
        out = np.broadcast_shapes(x_shape, mask_shape)
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"Shape mismatch: `mask` must broadcast to the shape of `x`. "
            f"Received: x={tuple(x_shape)}, mask={mask_shape}."
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_unit_interval(name: str, x) -> None:
    """Raises if a concrete `x` lies outside [0, 1]; traced values pass unchecked."""
    if x is None or not _is_concrete(x):
        return
    arr = np.asarray(x, dtype=np.float64)
    if not np.all((arr >= 0.0) & (arr <= 1.0)):
        raise ValueError(f"`{name}` must lie in [0, 1]. Received: {name}={x}.")


def _sums(
    x: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis, keepdims: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(x as float32 with masked entries zeroed, validity, sum over valid, count of valid)."""
    x = _as_float("x", x)
    _check_mask_broadcasts(x.shape, mask)
    valid = jnp.broadcast_to(_valid(mask), x.shape)
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

    Args:
      x: [...] float32, bfloat16 or float16 values.
      mask: bool or numeric, broadcastable to `x.shape`; nonzero marks a valid entry.
      shift_mean: subtract the mean (True) or keep it (False).
      eps: added to the variance before the square root.

    Returns:
      float32 array of `x.shape`; 0 at masked positions.

    Raises:
      ValueError: if `x` is not floating point or `mask` does not broadcast to `x`.
    """
    x, valid, total, count = _sums(x, mask, None)
    mean = total / jnp.maximum(count, 1.0)
    var = masked_var(x, valid)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(valid, y, 0.0)
