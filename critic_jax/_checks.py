"""Validators shared by the pure functions and the configs: shapes, dtypes, options, ranges.

Every check runs at trace time (free under `jax.jit`) and raises `ValueError` naming the argument
and what was received. Traced scalars pass the range checks unchecked: a sweep may `vmap` them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = "float32, bfloat16 or float16"


def as_float(name: str, x: jax.typing.ArrayLike | None) -> jax.Array:
    """`x` as float32, after checking that it holds floating-point numbers."""
    if x is None:
        raise ValueError(f"`{name}` must be a floating-point array, not None. Received: None.")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point array ({FLOAT_DTYPES}). "
            f"Received: dtype {x.dtype}, shape {x.shape}."
        )
    return x.astype(jnp.float32)


def valid(mask: jax.typing.ArrayLike) -> jax.Array:
    """Boolean validity of a bool or numeric mask: nonzero is valid."""
    if mask is None:
        raise ValueError("`mask` must be a bool or numeric array, not None. Received: None.")
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def same_shape(**arrays: jax.typing.ArrayLike | None) -> tuple[int, ...]:
    """Raises unless every non-None array has the shape of the first; returns that shape.

    The time axis is the last one, so arrays must have at least one dimension.
    """
    shapes = {k: np.shape(v) for k, v in arrays.items() if v is not None}
    if not shapes:
        names = ", ".join(f"`{k}`" for k in arrays)
        raise ValueError(f"{names} must be arrays, not None. Received: None.")
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


def mask_broadcasts(x_shape: tuple[int, ...], mask: jax.typing.ArrayLike) -> None:
    """Raises unless `mask` broadcasts to `x_shape` without growing it."""
    if mask is None:
        raise ValueError("`mask` must be a bool or numeric array, not None. Received: None.")
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


def is_concrete(x) -> bool:
    """Whether `x` has a value now (not a tracer inside jit, vmap or grad)."""
    return not isinstance(x, jax.core.Tracer)


def option(name: str, value: str, valid_options: Sequence[str]) -> None:
    """Raises unless `value` is one of `valid_options`; the message lists them."""
    if value not in valid_options:
        raise ValueError(
            f"Unknown `{name}`; valid ones are {', '.join(map(repr, valid_options))}. "
            f"Received: {value!r}."
        )


def unit_interval(name: str, x) -> None:
    """Raises if a concrete `x` (scalar or array) has an entry outside [0, 1] or NaN."""
    if x is None:
        raise ValueError(f"`{name}` must lie in [0, 1], not None. Received: None.")
    if not is_concrete(x):
        return
    arr = np.asarray(x, dtype=np.float64)
    if not np.all((arr >= 0.0) & (arr <= 1.0)):
        raise ValueError(f"`{name}` must lie in [0, 1]. Received: {name}={x}.")


def positive(name: str, value, *, allow_zero: bool = False, allow_inf: bool = False) -> None:
    """Raises if a concrete scalar `value` is NaN, not > 0 (>= 0 with allow_zero) or infinite
    (unless allow_inf). None and traced values pass."""
    if value is None or not is_concrete(value):
        return
    v = float(np.asarray(value))
    ok = (v >= 0.0 if allow_zero else v > 0.0) and (allow_inf or math.isfinite(v))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"`{name}` must be {bound}{finite}. Received: {name}={value}.")


# ----------------------------------------------------------------------------- added 2026-11-30


def required(**arrays) -> None:
    """Raises naming the first argument that is None."""
    for name, value in arrays.items():
        if value is None:
            raise ValueError(f"`{name}` must be an array, not None. Received: None.")


def finite(name: str, value) -> None:
    """Raises if a concrete scalar `value` is NaN or infinite. None and traced values pass."""
    if value is None or not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (not NaN or inf). Received: {name}={value}.")


def segment_ids(ids, shape: tuple[int, ...]) -> jax.Array:
    """`segment_ids` as an integer array of `shape` [..., T] (0 = padding)."""
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"`segment_ids` must be an integer array (0 = padding, 1..k = segments). "
            f"Received: dtype {ids.dtype}, shape {ids.shape}."
        )
    if ids.shape != tuple(shape):
        raise ValueError(
            f"Shape mismatch: `segment_ids` must have the shape of `mask` {tuple(shape)}. "
            f"Received: segment_ids={ids.shape}, mask={tuple(shape)}."
        )
    return ids


def per_row(name: str, x, lead: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """`x` as float32, a scalar or one value per row (shape `lead` = `shape[:-1]`), in [0, 1].

    Raises naming `name` on any other shape (a [T] vector never broadcasts along time) and, when
    `x` is concrete, on an entry outside [0, 1] or NaN.
    """
    unit_interval(name, x)
    x_shape = np.shape(x)
    if x_shape not in ((), tuple(lead)):
        raise ValueError(
            f"Shape mismatch: `{name}` must be a scalar or have the leading shape {tuple(lead)} "
            f"of `rewards` (one value per row). Received: {name}={x_shape}, "
            f"rewards={tuple(shape)}."
        )
    return jnp.asarray(x, jnp.float32)
