"""Critic diagnostics: explained variance, the statistics logged next to the value loss, and the
error of values and advantages against known true ones (the synthetic MRP's V*, A*)."""

import math

import jax
import jax.numpy as jnp

from critic_jax import _checks
from critic_jax.masking import masked_mean, masked_var

_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _prepare(names: tuple[str, ...], arrays: tuple, mask) -> tuple[jax.Array, ...]:
    """Checks `arrays` [..., T] against `mask`; returns validity and the arrays as float32
    with invalid entries zeroed (so no garbage reaches a result or gradient)."""
    _checks.required(**dict(zip(names, arrays, strict=True)), mask=mask)
    _checks.same_shape(**dict(zip(names, arrays, strict=True)), mask=mask)
    valid = _checks.valid(mask)
    return (valid,) + tuple(
        jnp.where(valid, _checks.as_float(name, x), 0.0)
        for name, x in zip(names, arrays, strict=True)
    )


def _spread(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Whether the valid entries of `x` are not all equal (an exact test: the rounded variance
    of constant data need not be 0)."""
    lo = jnp.min(jnp.where(valid, x, jnp.inf), initial=jnp.inf)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), initial=-jnp.inf)
    return hi > lo


def explained_variance(
    values: jax.typing.ArrayLike, returns: jax.typing.ArrayLike, mask: jax.typing.ArrayLike
) -> jax.Array:
    """Fraction of the variance of the returns that the values explain, over valid tokens.

    EV = 1 − Var_m[returns − values] / Var_m[returns]   (population variances over valid tokens).
    1 is a perfect critic, 0 is no better than a constant, negative is worse than a constant.
    Convention where the ratio is undefined: if the valid returns are all equal (or there are
    fewer than two valid tokens, or T = 0), EV = 0, since there is no variance to explain. The
    result is always finite: it is bounded below by the most negative float32.

    Args:
      values: [..., T] float32/bfloat16/float16 predictions.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts.

    Returns:
      float32 scalar.

    Raises:
      ValueError: on mismatched shapes, None or non-floating inputs.
    """
    valid, values, returns = _prepare(("values", "returns"), (values, returns), mask)
    var_returns = masked_var(returns, valid, unbiased=False)
    var_residual = masked_var(returns - values, valid, unbiased=False)
    defined = _spread(returns, valid) & (var_returns > 0)
    ev = 1.0 - var_residual / jnp.where(defined, var_returns, 1.0)
    ev = jnp.maximum(ev, -_F32_MAX)
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
      clipfrac:     masked mean of 1[|values − old_values| > clip_eps and (vc − returns)² > e²],
                    the fraction of tokens really clipped (strictly outside the range, so the
                    float rounding of vc never counts) whose clipped loss is the larger one
                    (0 when clip_eps is None);
      vpred_mean:   masked mean of values;
      value_mse:    masked mean of e²;
      returns_mean: masked mean of returns;
      returns_var:  unbiased masked variance of returns (see `masked_var`).

    Args:
      values: [..., T] float32/bfloat16/float16 predictions.
      old_values: [..., T] values at rollout time.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts.
      clip_eps: the value-clipping range of the loss, >= 0 (as in `value_loss`), or None.

    Returns:
      dict of float32 scalars with the keys above; 0 for means over an empty mask or T = 0.

    Raises:
      ValueError: on mismatched shapes, None or non-floating inputs, or a negative or NaN
        concrete `clip_eps`.
    """
    _checks.positive("clip_eps", clip_eps, allow_zero=True, allow_inf=True)
    valid, values, old_values, returns = _prepare(
        ("values", "old_values", "returns"), (values, old_values, returns), mask
    )
    err = values - returns
    if clip_eps is None:
        clipfrac = jnp.float32(0.0)
    else:
        step = values - old_values
        clipped = old_values + jnp.clip(step, -clip_eps, clip_eps)
        really = jnp.abs(step) > clip_eps
        counted = really & ((clipped - returns) ** 2 > err**2)
        clipfrac = masked_mean(counted.astype(jnp.float32), valid)
    return {
        "explained_variance": explained_variance(values, returns, valid),
        "clipfrac": clipfrac,
        "vpred_mean": masked_mean(values, valid),
        "value_mse": masked_mean(err * err, valid),
        "returns_mean": masked_mean(returns, valid),
        "returns_var": masked_var(returns, valid),
    }


# ----------------------------------------------------------------------------- against the truth


def _relative_rmse(
    estimate: jax.Array, truth: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(RMSE / std(truth), RMSE, std(truth)) over valid entries; population std.

    Where std(truth) is 0 (constant truth, fewer than two valid entries, T = 0) the relative
    error falls back to the RMSE itself, which is still 0 exactly for a perfect estimate.
    """
    diff = estimate - truth
    rmse = jnp.sqrt(masked_mean(diff * diff, valid))
    std = jnp.sqrt(masked_var(truth, valid, unbiased=False))
    defined = _spread(truth, valid) & (std > 0)
    relative = jnp.where(defined, rmse / jnp.where(defined, std, 1.0), rmse)
    return jnp.minimum(relative, _F32_MAX), rmse, std


def value_error_metrics(
    values: jax.typing.ArrayLike,
    true_values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
) -> dict[str, jax.Array]:
    """How far a critic's values are from the true values V*, over valid tokens.

      value_rmse:                 sqrt(mean_m[(V − V*)²]);
      true_value_std:             population std of V* (sqrt of `masked_var(..., unbiased=False)`);
      relative_value_error:       value_rmse / true_value_std (0 is perfect, 1 is as far off as
                                  the constant mean(V*)); where true_value_std is 0 it is
                                  value_rmse itself, so it is 0 only for a perfect critic;
      explained_variance_vs_true: `explained_variance(values, true_values, mask)`.

    Args:
      values: [..., T] float32/bfloat16/float16 predictions V(s_t).
      true_values: [..., T] the true V*(s_t).
      mask: [..., T] bool or numeric, nonzero where token t counts.

    Returns:
      dict of float32 scalars with the keys above; finite, 0 for an empty mask.

    Raises:
      ValueError: on mismatched shapes, None or non-floating inputs.
    """
    valid, values, true_values = _prepare(("values", "true_values"), (values, true_values), mask)
    relative, rmse, std = _relative_rmse(values, true_values, valid)
    return {
        "relative_value_error": relative,
        "value_rmse": rmse,
        "true_value_std": std,
        "explained_variance_vs_true": explained_variance(values, true_values, valid),
    }


def _average_ranks(x_nc: jax.Array, valid_nc: jax.Array) -> jax.Array:
    """1-based ranks of each column's valid entries among themselves, ties sharing the average
    rank; 0 at invalid entries. x_nc [N, C] float32, valid_nc [N, C] bool."""
    n_c = jnp.sum(valid_nc, axis=0)
    keys_nc = jnp.sort(jnp.where(valid_nc, x_nc, jnp.inf), axis=0)

    def column(keys_n, x_n, n):
        below = jnp.searchsorted(keys_n, x_n, side="left")
        upto = jnp.minimum(jnp.searchsorted(keys_n, x_n, side="right"), n)
        return 0.5 * (below + 1 + upto).astype(jnp.float32)

    ranks_nc = jax.vmap(column, in_axes=(1, 1, 0), out_axes=1)(keys_nc, x_nc, n_c)
    return jnp.where(valid_nc, ranks_nc, 0.0)


def _column_spearman(a_nc: jax.Array, b_nc: jax.Array, valid_nc: jax.Array) -> jax.Array:
    """Mean over columns of Spearman's ρ between a and b, see `advantage_metrics`."""
    if a_nc.shape[0] == 0 or a_nc.shape[1] == 0:
        return jnp.float32(0.0)
    ra_nc = _average_ranks(a_nc, valid_nc)
    rb_nc = _average_ranks(b_nc, valid_nc)
    n_c = jnp.sum(valid_nc, axis=0, dtype=jnp.float32)
    mean_c = (n_c + 1.0) / 2.0  # the mean of average ranks is (n + 1)/2, ties or not
    da_nc = jnp.where(valid_nc, ra_nc - mean_c, 0.0)
    db_nc = jnp.where(valid_nc, rb_nc - mean_c, 0.0)
    saa_c, sbb_c = jnp.sum(da_nc * da_nc, axis=0), jnp.sum(db_nc * db_nc, axis=0)
    counted_c = (n_c >= 3) & (saa_c > 0) & (sbb_c > 0)
    denom_c = jnp.sqrt(jnp.where(counted_c, saa_c * sbb_c, 1.0))
    rho_c = jnp.clip(jnp.sum(da_nc * db_nc, axis=0) / denom_c, -1.0, 1.0)
    total = jnp.sum(jnp.where(counted_c, rho_c, 0.0))
    return total / jnp.maximum(jnp.sum(counted_c, dtype=jnp.float32), 1.0)


def advantage_metrics(
    advantages: jax.typing.ArrayLike,
    true_advantages: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    sign_threshold: float | jax.Array = 1e-3,
) -> dict[str, jax.Array]:
    """How well estimated advantages A match the true advantages A*, over valid tokens.

      advantage_rmse:             sqrt(mean_m[(A − A*)²]);
      true_advantage_std:         population std of A*;
      advantage_error_vs_true:    advantage_rmse / true_advantage_std (advantage_rmse where
                                  that std is 0);
      advantage_sign_agreement:   among valid tokens with |A*| > sign_threshold·std(A*) (a
                                  threshold relative to the scale of A*; with std(A*) = 0 it
                                  is |A*| > 0), the fraction where sign(A) = sign(A*) (A = 0
                                  disagrees); 0 if there is no such token;
      advantage_rank_correlation: Spearman's ρ between A and A* in each column t, across the
                                  rows of the batch (all leading axes flattened) and over the
                                  valid tokens of that column, ties given their average rank;
                                  averaged over the columns with at least 3 valid tokens in
                                  which neither A nor A* is constant (ρ is undefined there);
                                  0 if there is no such column. The PPO update only compares
                                  advantages within a position's batch, so this is what the
                                  policy sees.

    Args:
      advantages: [..., T] float32/bfloat16/float16 estimated advantages (e.g. GAE).
      true_advantages: [..., T] the true advantages A*(s_t, a_t).
      mask: [..., T] bool or numeric, nonzero where token t counts.
      sign_threshold: >= 0 and finite, relative to std(A*); default 1e-3. May be traced.

    Returns:
      dict of float32 scalars with the keys above; finite, 0 for an empty mask or T = 0.

    Raises:
      ValueError: on mismatched shapes, None or non-floating inputs, or a concrete
        `sign_threshold` that is negative, NaN or infinite.
    """
    _checks.positive("sign_threshold", sign_threshold, allow_zero=True)
    valid, adv, true_adv = _prepare(
        ("advantages", "true_advantages"), (advantages, true_advantages), mask
    )
    relative, rmse, std = _relative_rmse(adv, true_adv, valid)
    decisive = valid & (jnp.abs(true_adv) > jnp.asarray(sign_threshold, jnp.float32) * std)
    agree = jnp.sign(adv) == jnp.sign(true_adv)
    sign_agreement = masked_mean(agree.astype(jnp.float32), decisive)
    rows_by_columns = (math.prod(valid.shape[:-1]), valid.shape[-1])
    rank = _column_spearman(
        adv.reshape(rows_by_columns),
        true_adv.reshape(rows_by_columns),
        valid.reshape(rows_by_columns),
    )
    return {
        "advantage_error_vs_true": relative,
        "advantage_rmse": rmse,
        "true_advantage_std": std,
        "advantage_sign_agreement": sign_agreement,
        "advantage_rank_correlation": rank,
    }
