"""Plain NumPy float64 references for the tests, written as loops straight from the equations.

Nothing here imports critic_jax. Each function takes arrays with the time axis last, treats a
nonzero mask entry as valid, reads nothing at masked positions and returns float64 arrays.
"""

import math

import numpy as np


def _rows(x):
    """[..., T] -> [R, T] float64 view of the rows."""
    x = np.asarray(x, np.float64)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _valid_rows(mask):
    mask = np.asarray(mask)
    return (mask != 0).reshape(math.prod(mask.shape[:-1]), mask.shape[-1])


# ----------------------------------------------------------------------------- test inputs


def mixed_mask(rng, shape):
    """A [..., T] bool mask whose rows cycle through the layouts an RLHF batch holds.

    Row kinds, in order: right padding, left padding, holes inside the response (multi-turn
    observation tokens), an empty row, a full row, a single valid token.
    """
    rows, length = math.prod(shape[:-1]), shape[-1]
    mask = np.zeros((rows, length), bool)
    for i in range(rows):
        kind = i % 6
        if kind == 0:
            mask[i, : rng.integers(1, length)] = True
        elif kind == 1:
            mask[i, rng.integers(1, length) :] = True
        elif kind == 2:
            start, stop = sorted(rng.choice(length + 1, size=2, replace=False))
            mask[i, start:stop] = rng.random(stop - start) < 0.6
        elif kind == 4:
            mask[i] = True
        elif kind == 5:
            mask[i, rng.integers(length)] = True
    return mask.reshape(shape)


def right_padded_mask(rng, shape):
    rows, length = math.prod(shape[:-1]), shape[-1]
    lengths = rng.integers(0, length + 1, size=rows)
    return (np.arange(length) < lengths[:, None]).reshape(shape)


def with_garbage(rng, x, mask):
    """`x` with NaN, +inf, -inf and huge values written at the masked positions."""
    x = np.array(x, copy=True)
    junk = np.array([np.nan, np.inf, -np.inf, 3e38], x.dtype)
    bad = np.asarray(mask) == 0
    x[bad] = junk[rng.integers(len(junk), size=int(bad.sum()))]
    return x


# ----------------------------------------------------------------------------- advantages


# ----------------------------------------------------------------------------- returns


def discounted_returns(rewards, mask, gamma):
    """[B, T] -> [B, T] Σ_k γ^k r over valid positions from t on (skip semantics); 0 off-mask."""
    out = np.zeros(rewards.shape)
    acc = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        valid = mask[:, t] != 0
        acc = np.where(valid, rewards[:, t] + gamma * acc, acc)
        out[:, t] = np.where(valid, acc, 0.0)
    return out


def next_valid_values(values, mask):
    """[B, T] -> values at the next valid position after t (0 when there is none)."""
    out = np.zeros(values.shape)
    nxt = np.zeros(values.shape[0])
    for t in range(values.shape[1] - 1, -1, -1):
        out[:, t] = nxt
        nxt = np.where(mask[:, t] != 0, values[:, t], nxt)
    return out


def _bootstrap_rows(bootstrap_value, shape):
    """The value after each row's last valid step, one per row (0 when None)."""
    if bootstrap_value is None:
        return np.zeros(math.prod(shape[:-1]))
    return np.broadcast_to(np.asarray(bootstrap_value, np.float64), shape[:-1]).reshape(-1)


def gae(rewards, values, mask, *, gamma, lam, bootstrap_value=None):
    """Skip-mask GAE: masked positions are jumped over and get A = returns = 0."""
    shape = np.shape(rewards)
    r, v, m = _rows(rewards), _rows(values), _valid_rows(mask)
    boot = _bootstrap_rows(bootstrap_value, shape)
    adv = np.zeros_like(r)
    ret = np.zeros_like(r)
    for i in range(r.shape[0]):
        next_value, next_adv = boot[i], 0.0
        for t in range(r.shape[1] - 1, -1, -1):
            if not m[i, t]:
                continue
            delta = r[i, t] + gamma * next_value - v[i, t]
            adv[i, t] = delta + gamma * lam * next_adv
            ret[i, t] = adv[i, t] + v[i, t]
            next_value, next_adv = v[i, t], adv[i, t]
    return adv.reshape(shape), ret.reshape(shape)


def td_errors(rewards, values, mask, *, gamma, bootstrap_value=None):
    shape = np.shape(rewards)
    r, v, m = _rows(rewards), _rows(values), _valid_rows(mask)
    boot = _bootstrap_rows(bootstrap_value, shape)
    out = np.zeros_like(r)
    for i in range(r.shape[0]):
        valid = [t for t in range(r.shape[1]) if m[i, t]]
        for k, t in enumerate(valid):
            next_value = v[i, valid[k + 1]] if k + 1 < len(valid) else boot[i]
            out[i, t] = r[i, t] + gamma * next_value - v[i, t]
    return out.reshape(shape)


# ----------------------------------------------------------------------------- masking


def _entries(x, mask, axis):
    """Yields (output index, list of valid float64 entries) for a reduction over `axis`."""
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(np.asarray(mask) != 0, x.shape)
    if axis is None:
        yield (), [x[idx] for idx in np.ndindex(x.shape) if m[idx]]
        return
    axis = axis % x.ndim
    xs, ms = np.moveaxis(x, axis, -1), np.moveaxis(m, axis, -1)
    for idx in np.ndindex(xs.shape[:-1]):
        yield idx, [xs[idx][k] for k in range(xs.shape[-1]) if ms[idx][k]]


def masked_mean(x, mask, axis=None):
    shape = np.shape(x) if axis is None else np.delete(np.shape(x), axis % np.ndim(x))
    out = np.zeros(tuple(shape) if axis is not None else ())
    for idx, vals in _entries(x, mask, axis):
        out[idx] = sum(vals) / len(vals) if vals else 0.0
    return out


def masked_var(x, mask, axis=None, unbiased=True):
    shape = () if axis is None else tuple(np.delete(np.shape(x), axis % np.ndim(x)))
    out = np.zeros(shape)
    for idx, vals in _entries(x, mask, axis):
        n = len(vals)
        denom = n - 1 if unbiased else n
        if denom <= 0:
            continue
        mean = sum(vals) / n
        out[idx] = sum((a - mean) ** 2 for a in vals) / denom
    return out


def masked_whiten(x, mask, *, shift_mean=True, eps=1e-8):
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(np.asarray(mask) != 0, x.shape)
    mean = float(masked_mean(x, m))
    std = math.sqrt(float(masked_var(x, m)) + eps)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        if m[idx]:
            out[idx] = (x[idx] - mean) / std + (0.0 if shift_mean else mean)
    return out


# ----------------------------------------------------------------------------- losses


def _huber(x, delta):
    return 0.5 * x * x if abs(x) <= delta else delta * (abs(x) - 0.5 * delta)


def token_losses(values, old_values, returns, mask, *, clip_eps, loss_type, huber_delta):
    """[R, T] per-token losses (0 at masked positions) and [R, T] validity."""
    v, r, m = _rows(values), _rows(returns), _valid_rows(mask)
    old = None if old_values is None else _rows(old_values)

    def f(x):
        return 0.5 * x * x if loss_type == "mse" else _huber(x, huber_delta)

    out = np.zeros_like(v)
    for i in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not m[i, t]:
                continue
            loss = f(v[i, t] - r[i, t])
            if clip_eps is not None:
                step = min(max(v[i, t] - old[i, t], -clip_eps), clip_eps)
                loss = max(f(old[i, t] + step - r[i, t]), loss)
            out[i, t] = loss
    return out, m


def value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    clip_eps=None,
    loss_type="mse",
    huber_delta=1.0,
    reduction="seq-mean-token-mean",
):
    losses, m = token_losses(
        values, old_values, returns, mask, clip_eps=clip_eps, loss_type=loss_type,
        huber_delta=huber_delta,
    )  # fmt: skip
    rows, length = losses.shape
    if reduction == "token-mean":
        count = m.sum()
        return losses.sum() / count if count else 0.0
    if reduction == "seq-mean-token-sum-norm":
        return losses.sum() / (rows * length)
    per_row = []
    for i in range(rows):
        n = m[i].sum()
        if n == 0:
            continue
        total = sum(losses[i, t] for t in range(length) if m[i, t])
        per_row.append(total / n if reduction == "seq-mean-token-mean" else total)
    return sum(per_row) / len(per_row) if per_row else 0.0


# ----------------------------------------------------------------------------- metrics


def explained_variance(values, returns, mask):
    v, r, m = _rows(values), _rows(returns), _valid_rows(mask)
    ys = [r[idx] for idx in np.ndindex(r.shape) if m[idx]]
    res = [r[idx] - v[idx] for idx in np.ndindex(r.shape) if m[idx]]
    if len(ys) < 2 or max(ys) == min(ys):
        return 0.0

    def pop_var(a):
        mean = sum(a) / len(a)
        return sum((x - mean) ** 2 for x in a) / len(a)

    return 1.0 - pop_var(res) / pop_var(ys)


def value_metrics(values, old_values, returns, mask, *, clip_eps=None):
    v, old, r, m = _rows(values), _rows(old_values), _rows(returns), _valid_rows(mask)
    clipped = []
    for idx in np.ndindex(v.shape):
        if m[idx] and clip_eps is not None:
            vc = old[idx] + min(max(v[idx] - old[idx], -clip_eps), clip_eps)
            clipped.append(float((vc - r[idx]) ** 2 > (v[idx] - r[idx]) ** 2))
    n = int(m.sum())
    return {
        "explained_variance": explained_variance(values, returns, mask),
        "clipfrac": sum(clipped) / n if clipped else 0.0,
        "vpred_mean": float(masked_mean(v, m)),
        "value_mse": float(masked_mean((v - r) ** 2, m)) if n else 0.0,
        "returns_mean": float(masked_mean(r, m)),
        "returns_var": float(masked_var(r, m)),
    }


# ----------------------------------------------------------------------------- rewards


def kl_penalty(logprobs, ref_logprobs, *, kind, clamp=None):
    lp, ref = np.asarray(logprobs, np.float64), np.asarray(ref_logprobs, np.float64)
    out = np.zeros_like(lp)
    for idx in np.ndindex(lp.shape):
        d = lp[idx] - ref[idx]
        if kind == "k1":
            k = d
        elif kind == "k2":
            k = 0.5 * d * d
        else:
            k = math.exp(-d) - 1.0 + d
        if clamp is not None:
            k = min(max(k, -clamp), clamp)
        out[idx] = k
    return out


def token_rewards(sequence_reward, mask, *, kl=None, kl_coef=0.0):
    shape = np.shape(mask)
    m = _valid_rows(mask)
    reward = np.asarray(sequence_reward, np.float64).reshape(-1)
    kl_rows = None if kl is None else _rows(kl)
    out = np.zeros(m.shape)
    for i in range(m.shape[0]):
        valid = [t for t in range(m.shape[1]) if m[i, t]]
        for t in valid:
            if kl_rows is not None:
                out[i, t] -= kl_coef * kl_rows[i, t]
        if valid:
            out[i, valid[-1]] += reward[i]
    return out.reshape(shape)
