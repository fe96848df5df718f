"""The masked value losses of the PPO critic (scalar MSE/Huber and the HL-Gauss histogram loss)
and their four reductions, per row or per packed segment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import log_ndtr

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
    # A traced infinite delta (concrete ones are rejected) means MSE; capping it keeps
    # optax's `delta * linear` term, and its derivative, from forming inf * 0.
    delta = jnp.minimum(jnp.asarray(huber_delta, jnp.float32), jnp.finfo(jnp.float32).max)
    return optax.huber_loss(x, delta=delta)


# ----------------------------------------------------------------------------- reductions


def _segment_counts(valid: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token size of its segment, and the batch's segment counts.

    A segment is the set of positions of one row sharing a nonzero id, contiguous or not.
    Sorting each row by id makes every segment one run, so sizes are a segment sum over run
    indices: O(T log T) per row, without an O(T²) comparison or a bound on the ids.

    Args:
      valid: [..., T] bool, already False where `ids` is 0.
      ids: [..., T] integer segment ids.

    Returns:
      (count [..., T] float32: valid tokens in the token's segment,
       segments with at least one valid token, segments (distinct nonzero ids of each row)).
    """
    length = ids.shape[-1]
    rows = math.prod(ids.shape[:-1])
    ids_rt = ids.reshape(rows, length)
    valid_rt = valid.reshape(rows, length)
    order_rt = jnp.argsort(ids_rt, axis=-1, stable=True)
    sorted_ids_rt = jnp.take_along_axis(ids_rt, order_rt, axis=-1)
    sorted_valid_rt = jnp.take_along_axis(valid_rt, order_rt, axis=-1)
    starts_rt = jnp.concatenate(
        [jnp.ones((rows, 1), bool), sorted_ids_rt[:, 1:] != sorted_ids_rt[:, :-1]], axis=-1
    )
    run_rt = jnp.cumsum(starts_rt, axis=-1) - 1 + length * jnp.arange(rows)[:, None]
    sizes = jax.ops.segment_sum(
        sorted_valid_rt.reshape(-1).astype(jnp.float32),
        run_rt.reshape(-1),
        num_segments=rows * length,
    )
    sorted_count_rt = sizes[run_rt]
    count_rt = (
        jnp.zeros((rows, length), jnp.float32)
        .at[jnp.arange(rows)[:, None], order_rt]
        .set(sorted_count_rt)
    )
    with_valid = jnp.sum(sizes > 0, dtype=jnp.float32)
    segments = jnp.sum(starts_rt & (sorted_ids_rt != 0), dtype=jnp.float32)
    return count_rt.reshape(ids.shape), with_valid, segments


def _validity(
    mask: jax.typing.ArrayLike, segment_ids: jax.typing.ArrayLike | None
) -> tuple[jax.Array, jax.Array | None]:
    valid = _checks.valid(mask)
    if segment_ids is None:
        return valid, None
    ids = _checks.segment_ids(segment_ids, valid.shape)
    return valid & (ids != 0), ids


def _reduce_parts(
    valid: jax.Array, ids: jax.Array | None, reduction: str
) -> tuple[jax.Array, jax.Array]:
    """(per-token weight before the denominator [..., T], denominator) of `reduction`."""
    if reduction == "token-mean":
        return jnp.ones(valid.shape, jnp.float32), jnp.sum(valid, dtype=jnp.float32)
    length = valid.shape[-1]
    if ids is None:  # one segment per row
        count = jnp.broadcast_to(
            jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32), valid.shape
        )
        with_valid = jnp.sum(jnp.any(valid, axis=-1), dtype=jnp.float32)
        segments = jnp.float32(math.prod(valid.shape[:-1]))
    elif length == 0:
        count = jnp.zeros(valid.shape, jnp.float32)
        with_valid = segments = jnp.float32(0.0)
    else:
        count, with_valid, segments = _segment_counts(valid, ids)
    if reduction == "seq-mean-token-mean":
        return 1.0 / jnp.maximum(count, 1.0), with_valid
    if reduction == "seq-mean-token-sum":
        return jnp.ones(valid.shape, jnp.float32), with_valid
    return jnp.ones(valid.shape, jnp.float32), jnp.float32(length) * segments


def reduction_denominator(
    mask: jax.typing.ArrayLike,
    reduction: str,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """What `reduction` divides the (weighted) summed token losses of `mask` [..., T] by,
    before the guard against 0.

    Without `segment_ids`: the valid tokens ("token-mean"), the rows with a valid token
    ("seq-mean-token-mean", "seq-mean-token-sum") or the constant T·rows
    ("seq-mean-token-sum-norm"). With `segment_ids` the rows are replaced by segments (the
    rollouts packed into the rows): segments with a valid token, or T·segments, where the
    segments are the distinct nonzero ids of each row, valid tokens or not.

    A trainer that splits a minibatch into micro-batches (whole rows) scales each micro-batch's
    loss by `denominator(micro) / denominator(minibatch)`, so the sum is the minibatch's loss
    exactly, with or without segments.

    Args:
      mask: [..., T] bool or numeric, nonzero where token t counts.
      reduction: one of `REDUCTIONS`.
      segment_ids: optional [..., T] integer segment ids, 0 = padding (never valid).

    Returns:
      float32 scalar, >= 0.

    Raises:
      ValueError: on an unknown `reduction`, a None `mask`, or `segment_ids` that are not an
        integer array of the mask's shape.
    """
    _checks.option("reduction", reduction, REDUCTIONS)
    _checks.required(mask=mask)
    valid, ids = _validity(mask, segment_ids)
    return _reduce_parts(valid, ids, reduction)[1]


def _reduce(loss: jax.Array, valid: jax.Array, ids: jax.Array | None, reduction: str) -> jax.Array:
    """Reduces per-token `loss` [..., T] (0 at invalid positions) to a scalar."""
    weight, denominator = _reduce_parts(valid, ids, reduction)
    return jnp.sum(loss * weight) / jnp.maximum(denominator, 1.0)


_REDUCTION_DOC = """
    Reductions, with m the validity mask, B the number of rows (product of the leading axes) and
    T the length of the last axis:
      "token-mean":              Σ l·m / Σ m over the whole batch;
      "seq-mean-token-mean":     mean over rows with a valid token of (Σ_t l·m / Σ_t m);
      "seq-mean-token-sum":      mean over rows with a valid token of Σ_t l·m;
      "seq-mean-token-sum-norm": Σ l·m / (T·B), a constant normaliser.
    With `segment_ids` (packed rows) a "sequence" is a segment, the positions of one row that
    share a nonzero id; id 0 is padding and never valid. The seq-mean reductions average over
    segments with a valid token, and "seq-mean-token-sum-norm" divides by T·S, S the number of
    segments (distinct nonzero ids per row, valid tokens or not): exactly what the unpacked batch,
    one rollout per row of length T, divides by (T·B with B = S, empty rows included). Dividing
    by T·(packed rows) instead would change the loss with how tightly the rows are packed. So a
    packed batch has the loss and gradient of its unpacked layout under every reduction; a row
    of padding only holds no segment and counts for nothing.
    A batch without any valid token gives exactly 0 with zero gradients.
"""


# ----------------------------------------------------------------------------- scalar value loss


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
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Masked critic loss, optionally clipped around the rollout's values (PPO2).

    Per token, with e = values − returns:
      clip_eps is None:  l = f(e)
      otherwise:         vc = old_values + clip(values − old_values, −clip_eps, clip_eps),
                         l = max(f(vc − returns), f(e))      (the pessimistic clipped loss)
    f(x) = ½x² for loss_type="mse" and optax.huber_loss(x, delta=huber_delta) for "huber".
    vc is taken as `values` itself wherever |values − old_values| <= clip_eps, so the float
    rounding of old + (values − old) never picks the clipped branch.
    {reductions}
    Args:
      values: [..., T] float32/bfloat16/float16 predictions V(s_t) (differentiated).
      old_values: [..., T] values at rollout time; may be None when `clip_eps` is None.
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts. Masked positions may hold
        any garbage, NaN and inf included, in the other arrays.
      clip_eps: clip range of values around `old_values`, >= 0 (inf: no clipping); None
        disables clipping.
      loss_type: "mse" or "huber".
      huber_delta: Huber threshold, > 0 and finite when concrete (a traced inf gives MSE).
      reduction: one of the four names above.
      segment_ids: optional [..., T] integer ids of the rollouts packed in each row, 0 = padding.

    Returns:
      float32 scalar; 0 when T = 0.

    Raises:
      ValueError: on mismatched shapes, non-floating inputs, a None array, an unknown
        `loss_type` or `reduction`, a negative or NaN `clip_eps`, a non-positive, NaN or
        infinite `huber_delta`, `old_values=None` with clipping on, or non-integer
        `segment_ids`.
    """
    _checks.option("loss_type", loss_type, LOSS_TYPES)
    _checks.option("reduction", reduction, REDUCTIONS)
    _checks.positive("clip_eps", clip_eps, allow_zero=True, allow_inf=True)
    _checks.positive("huber_delta", huber_delta, allow_zero=False)
    _checks.required(values=values, returns=returns, mask=mask)
    if clip_eps is not None and old_values is None:
        raise ValueError("`old_values` is required when `clip_eps` is set. Received: None.")
    _checks.same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    valid, ids = _validity(mask, segment_ids)
    # Zero the invalid entries first: then every later op, and its derivative, stays finite.
    values = jnp.where(valid, _checks.as_float("values", values), 0.0)
    returns = jnp.where(valid, _checks.as_float("returns", returns), 0.0)
    loss = _pointwise(values - returns, loss_type, huber_delta)
    if clip_eps is not None:
        old_values = jnp.where(valid, _checks.as_float("old_values", old_values), 0.0)
        clipped = _clipped_values(values, old_values, clip_eps)
        loss = jnp.maximum(_pointwise(clipped - returns, loss_type, huber_delta), loss)
    loss = jnp.where(valid, loss, 0.0)
    return _reduce(loss, valid, ids, reduction)


if value_loss.__doc__:  # None under python -OO
    value_loss.__doc__ = value_loss.__doc__.format(reductions=_REDUCTION_DOC)


def _clipped_values(values: jax.Array, old_values: jax.Array, clip_eps) -> jax.Array:
    """old + clip(values − old, ±clip_eps), and exactly `values` where nothing is clipped."""
    step = values - old_values
    clipped = old_values + jnp.clip(step, -clip_eps, clip_eps)
    return jnp.where(jnp.abs(step) > clip_eps, clipped, values)


# ----------------------------------------------------------------------------- HL-Gauss


def _support(support: jax.typing.ArrayLike) -> jax.Array:
    """The bin centres as float32 [K], checked: 1-D, K >= 2, increasing (when concrete)."""
    if support is None:
        raise ValueError("`support` must be a 1-D array of bin centres, not None. Received: None.")
    shape = np.shape(support)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(
            f"`support` must be a 1-D array of at least 2 increasing bin centres. "
            f"Received: shape {shape}."
        )
    if _checks.is_concrete(support):
        arr = np.asarray(support, np.float32)
        if not np.all(np.isfinite(arr)) or not np.all(np.diff(arr) > 0):
            raise ValueError(
                f"`support` must hold finite, strictly increasing bin centres (in float32). "
                f"Received: support={np.asarray(support)}."
            )
    return jnp.asarray(support, jnp.float32)


def _log_bin_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """log(Φ(hi) − Φ(lo)) for lo < hi (standardised edges), accurate in both tails.

    In the upper tail Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi) is evaluated instead, so the difference is
    always taken between two log-CDFs of the lower tail, log Φ(b) + log(1 − Φ(a)/Φ(b)), and
    never cancels to 0 for a target far from the support. Where that fraction is small (a bin
    narrow against σ) float32 cannot resolve it, and the midpoint rule with its second-order
    correction, w·φ(m)·(1 + w²(m² − 1)/24), is used instead (error O(w⁴) relative).
    """
    upper = lo > 0
    a = jnp.where(upper, -hi, lo)
    b = jnp.where(upper, -lo, hi)
    log_b = log_ndtr(b)
    fraction = -jnp.expm1(log_ndtr(a) - log_b)
    direct = fraction > 0.1
    # Both branches are kept finite (and so are their derivatives) before `where` picks one.
    log_direct = log_b + jnp.log(jnp.where(direct, fraction, 1.0))
    width = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny)
    mid = 0.5 * (lo + hi)
    small_mid = jnp.where(direct, 0.0, mid)
    log_midpoint = (
        jnp.log(width)
        - 0.5 * small_mid * small_mid
        - 0.5 * math.log(2 * math.pi)
        + jnp.log1p(width * width * (small_mid * small_mid - 1.0) / 24.0)
    )
    return jnp.where(direct, log_direct, log_midpoint)


def hl_gauss_probs(
    x: jax.typing.ArrayLike,
    *,
    support: jax.typing.ArrayLike,
    sigma: float | jax.Array,
) -> jax.Array:
    """HL-Gauss target distribution of scalars `x` over a histogram (Imani & White 2018;
    Farebrother et al. 2024, "Stop Regressing", arXiv 2403.03950).

    With bin centres c_0 < … < c_{K−1} (`support`), edges e_0 = c_0 − (c_1 − c_0)/2,
    e_k = (c_{k−1} + c_k)/2 for 0 < k < K, e_K = c_{K−1} + (c_{K−1} − c_{K−2})/2 (for an evenly
    spaced support: half a bin width beyond the outer centres), and Φ the standard normal CDF:

      p_k(x) = [Φ((e_{k+1} − x)/σ) − Φ((e_k − x)/σ)] / [Φ((e_K − x)/σ) − Φ((e_0 − x)/σ)],

    the mass of N(x, σ²) in bin k, renormalised over the bins (mass beyond the outer edges is
    dropped). Computed in log space: a target outside the support keeps a valid distribution
    that tends to a one-hot on the nearest outer bin, never 0/0. The paper's default is
    σ = 0.75 × bin width.

    Args:
      x: [...] float32/bfloat16/float16 targets (e.g. returns).
      support: [K] bin centres, K >= 2, strictly increasing (evenly spaced in the paper).
      sigma: σ > 0, the width of the Gaussian; may be traced.

    Returns:
      float32 [..., K], non-negative, summing to 1 over the last axis.

    Raises:
      ValueError: if `x` is not floating point or None, `support` is not 1-D with at least 2
        strictly increasing finite entries, or a concrete `sigma` is not > 0 and finite.
    """
    _checks.positive("sigma", sigma)
    if sigma is None:
        raise ValueError("`sigma` must be > 0 and finite, not None. Received: None.")
    x = _checks.as_float("x", x)
    centres = _support(support)
    mids = 0.5 * (centres[1:] + centres[:-1])
    edges = jnp.concatenate(
        [
            centres[:1] - 0.5 * (centres[1] - centres[0]),
            mids,
            centres[-1:] + 0.5 * (centres[-1] - centres[-2]),
        ]
    )
    sigma = jnp.asarray(sigma, jnp.float32)
    # 10⁴σ beyond the outer edges the distribution is a one-hot in float32 (unless σ is over
    # 100 bins wide); clipping there keeps z² finite for any finite target.
    x = jnp.clip(x, edges[0] - 1e4 * sigma, edges[-1] + 1e4 * sigma)
    z = (edges - x[..., None]) / sigma  # [..., K + 1]
    return jax.nn.softmax(_log_bin_mass(z[..., :-1], z[..., 1:]), axis=-1)


def hl_gauss_loss(
    logits: jax.typing.ArrayLike,
    returns: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    support: jax.typing.ArrayLike,
    sigma: float | jax.Array,
    reduction: str = "token-mean",
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Masked HL-Gauss cross-entropy of a histogram value head ("Stop Regressing").

    Per token, l_t = −Σ_k p_k(returns_t) · log softmax(logits_t)_k with p = `hl_gauss_probs`
    of the returns (a fixed target: no gradient flows into `returns`). The value the head
    predicts is Σ_k softmax(logits)_k · c_k.
    {reductions}
    Args:
      logits: [..., T, K] float32/bfloat16/float16 logits of the value head (differentiated).
      returns: [..., T] targets.
      mask: [..., T] bool or numeric, nonzero where token t counts. Masked positions may hold
        any garbage, NaN and inf included, in `logits` and `returns`.
      support: [K] bin centres (see `hl_gauss_probs`).
      sigma: σ > 0; may be traced.
      reduction: one of the four names above.
      segment_ids: optional [..., T] integer ids of the rollouts packed in each row, 0 = padding.

    Returns:
      float32 scalar; 0 when T = 0 or no token is valid.

    Raises:
      ValueError: on mismatched shapes (`logits` must be returns.shape + (K,)), non-floating or
        None inputs, an unknown `reduction`, a bad `support` or `sigma`, or non-integer
        `segment_ids`.
    """
    _checks.option("reduction", reduction, REDUCTIONS)
    _checks.required(logits=logits, returns=returns, mask=mask)
    _checks.same_shape(returns=returns, mask=mask)
    centres = _support(support)
    want = (*np.shape(returns), centres.shape[0])
    if np.shape(logits) != want:
        raise ValueError(
            f"Shape mismatch: `logits` must have shape returns.shape + (K,) = {want}, K the "
            f"number of `support` bins. Received: logits={np.shape(logits)}, "
            f"returns={np.shape(returns)}, support={np.shape(support)}."
        )
    valid, ids = _validity(mask, segment_ids)
    logits = jnp.where(valid[..., None], _checks.as_float("logits", logits), 0.0)
    returns = jnp.where(valid, _checks.as_float("returns", returns), 0.0)
    target = jax.lax.stop_gradient(hl_gauss_probs(returns, support=centres, sigma=sigma))
    log_q = jax.nn.log_softmax(logits, axis=-1)
    # A target bin of mass 0 contributes 0, even where log q = −inf.
    loss = -jnp.sum(jnp.where(target > 0, target * log_q, 0.0), axis=-1)
    loss = jnp.where(valid, loss, 0.0)
    return _reduce(loss, valid, ids, reduction)


if hl_gauss_loss.__doc__:  # None under python -OO
    hl_gauss_loss.__doc__ = hl_gauss_loss.__doc__.format(reductions=_REDUCTION_DOC)
