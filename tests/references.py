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


def value_batch(seed, shape, *, old_scale, new_scale, garbage=True):
    """(values, old_values, returns, mask) float32 [..., T] for the loss and metric tests: returns
    ~ N(0, 1), old values `old_scale` away from them, values `new_scale` away from the old ones,
    a `mixed_mask`, and garbage at the masked positions when `garbage`."""
    rng = np.random.default_rng(seed)
    returns = rng.normal(size=shape).astype(np.float32)
    old_values = returns + rng.normal(scale=old_scale, size=shape).astype(np.float32)
    values = old_values + rng.normal(scale=new_scale, size=shape).astype(np.float32)
    mask = mixed_mask(rng, shape)
    if garbage:
        values, old_values, returns = (
            with_garbage(rng, x, mask) for x in (values, old_values, returns)
        )
    return values, old_values, returns, mask


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


# ------------------------------------------- advantages: per-row γ/λ, packed segments, VC/VAPO λ


def _per_row(x, rows):
    """A scalar or one value per row -> [R] float64."""
    return np.broadcast_to(np.asarray(x, np.float64).reshape(-1), (rows,)).copy()


def _segment_positions(ids_row):
    """{id: positions holding it, in order} for the nonzero ids of one row."""
    out = {}
    for t, s in enumerate(ids_row):
        if s != 0:
            out.setdefault(int(s), []).append(t)
    return out


def segment_layout(segment_ids):
    """(positions, previous) int64 [B, T] by a loop: the count of earlier tokens of t's segment
    and the index of the previous one (-1 at its first token); on padding (id 0) position 0 and
    the last real index before t (-1 if none)."""
    ids = np.asarray(segment_ids)
    positions = np.zeros(ids.shape, np.int64)
    previous = np.full(ids.shape, -1, np.int64)
    for b in range(ids.shape[0]):
        last_of, last_real = {}, -1
        for t, s in enumerate(ids[b]):
            s = int(s)
            if s == 0:
                previous[b, t] = last_real
                continue
            seen = [u for u in range(t) if ids[b, u] == s]
            positions[b, t] = len(seen)
            previous[b, t] = last_of.get(s, -1)
            last_of[s], last_real = t, t
    return positions, previous


def segmented_gae(rewards, values, mask, *, gamma, lam, bootstrap_value=None, segment_ids=None):
    """Skip-mask GAE run separately on each segment of each row, γ and λ scalars or per row.

    A segment is the set of positions with one nonzero id; each is a rollout of its own: the
    loop walks its valid positions backwards, starting from its bootstrap value. Without
    `segment_ids` the whole row is one segment. `bootstrap_value` [...] goes to the segment
    holding the row's last nonzero id (0 for the others); [..., T] is read at each segment's
    last position. Padding (id 0) and masked positions get A = returns = 0.
    """
    shape = np.shape(rewards)
    r, v, m = _rows(rewards), _rows(values), _valid_rows(mask)
    rows, length = r.shape
    gammas, lams = _per_row(gamma, rows), _per_row(lam, rows)
    if segment_ids is None:
        ids = np.ones((rows, length), np.int64)
    else:
        ids = np.asarray(segment_ids).reshape(rows, length)
    per_position = bootstrap_value is not None and np.shape(bootstrap_value) == shape
    if per_position:
        boot_pos = _rows(bootstrap_value)
    else:
        boot_row = _bootstrap_rows(bootstrap_value, shape)
    adv = np.zeros_like(r)
    ret = np.zeros_like(r)
    for i in range(rows):
        g, lm = gammas[i], lams[i]
        segments = _segment_positions(ids[i])
        last_id = int(ids[i][max(t for ts in segments.values() for t in ts)]) if segments else 0
        for s, positions in segments.items():
            if per_position:
                next_value = boot_pos[i, positions[-1]]
            else:
                next_value = boot_row[i] if s == last_id else 0.0
            next_adv = 0.0
            for t in reversed(positions):
                if not m[i, t]:
                    continue
                delta = r[i, t] + g * next_value - v[i, t]
                adv[i, t] = delta + g * lm * next_adv
                ret[i, t] = adv[i, t] + v[i, t]
                next_value, next_adv = v[i, t], adv[i, t]
    return adv.reshape(shape), ret.reshape(shape)


def decoupled_gae(
    rewards, values, mask, *, gamma, value_lam, policy_lam, bootstrap_value=None,
    segment_ids=None,
):  # fmt: skip
    """(policy advantages with policy_lam, value returns with value_lam), as two GAE loops."""
    kw = dict(gamma=gamma, bootstrap_value=bootstrap_value, segment_ids=segment_ids)
    policy_adv, _ = segmented_gae(rewards, values, mask, lam=policy_lam, **kw)
    _, value_ret = segmented_gae(rewards, values, mask, lam=value_lam, **kw)
    return policy_adv, value_ret


def length_adaptive_lam(mask, *, alpha):
    """VAPO: λ = clip(1 − 1/(α·n), 0, 1) per row, n its number of valid tokens; 0 if n = 0."""
    m = _valid_rows(mask)
    out = np.zeros(m.shape[0])
    for i in range(m.shape[0]):
        n = int(m[i].sum())
        if n:
            out[i] = min(max(1.0 - 1.0 / (alpha * n), 0.0), 1.0)
    return out.reshape(np.shape(mask)[:-1])


def packed_mask_and_ids(rng, rows, length, max_segments=4):
    """[rows, T] (mask, segment_ids) of packed rows: contiguous runs of ids 1..k, padding (0)
    at the end, runs of id 0 between segments, holes inside segments, and some empty segments
    (all positions masked)."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), bool)
    for i in range(rows):
        t, s = 0, 0
        while t < length and s < max_segments:
            t += int(rng.integers(0, 2)) * int(rng.integers(1, 3))  # a gap of padding
            n = int(rng.integers(1, max(2, length // 2)))
            stop = min(length, t + n)
            if t >= stop:
                break
            s += 1
            ids[i, t:stop] = s
            kind = rng.integers(4)
            if kind == 0:  # empty segment
                pass
            elif kind == 1:  # full segment
                mask[i, t:stop] = True
            else:  # holes
                mask[i, t:stop] = rng.random(stop - t) < 0.7
            t = stop
    return mask, ids


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
            # Only tokens strictly outside the clip range count: rounding of vc never does.
            vc = old[idx] + min(max(v[idx] - old[idx], -clip_eps), clip_eps)
            really = abs(v[idx] - old[idx]) > clip_eps
            clipped.append(float(really and (vc - r[idx]) ** 2 > (v[idx] - r[idx]) ** 2))
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


# ----------------------------------------------------------------------------- packing, HL-Gauss
# ----------------------------------------------------------------------------- and true-value
# ----------------------------------------------------------------------------- metrics (2026-11-30)


def sequences(mask, segment_ids=None):
    """The "sequences" of a reduction: lists of (row, t) of every row (no segment ids) or of
    every distinct nonzero id of a row, with a flag per position saying whether it is valid."""
    m = _valid_rows(mask)
    ids = None if segment_ids is None else np.asarray(segment_ids).reshape(m.shape)
    out = []
    for i in range(m.shape[0]):
        if ids is None:
            out.append([(i, t, bool(m[i, t])) for t in range(m.shape[1])])
            continue
        for seg in sorted({int(a) for a in ids[i] if a != 0}):
            out.append([(i, t, bool(m[i, t])) for t in range(m.shape[1]) if ids[i, t] == seg])
    return out


def reduce_tokens(losses, mask, reduction, segment_ids=None):
    """Reduces [..., T] per-token losses by the loop definitions, a sequence being a row or,
    with `segment_ids`, a segment (positions of a row sharing a nonzero id)."""
    length = np.shape(mask)[-1]
    loss = _rows(losses)
    seqs = sequences(mask, segment_ids)
    valid = [(i, t) for seq in seqs for (i, t, ok) in seq if ok]
    if reduction == "token-mean":
        return sum(loss[i, t] for i, t in valid) / len(valid) if valid else 0.0
    if reduction == "seq-mean-token-sum-norm":
        total = sum(loss[i, t] for i, t in valid)
        return total / (length * len(seqs)) if seqs and length else 0.0
    per_seq = []
    for seq in seqs:
        vals = [loss[i, t] for (i, t, ok) in seq if ok]
        if vals:
            per_seq.append(
                sum(vals) / len(vals) if reduction == "seq-mean-token-mean" else sum(vals)
            )
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def packed_value_loss(
    values, old_values, returns, mask, *, segment_ids=None, clip_eps=None, loss_type="mse",
    huber_delta=1.0, reduction="seq-mean-token-mean",
):  # fmt: skip
    """`value_loss` with optional segment ids (id 0 is never valid)."""
    valid = np.asarray(mask) != 0
    if segment_ids is not None:
        valid = valid & (np.asarray(segment_ids) != 0)
    losses, _ = token_losses(
        values, old_values, returns, valid, clip_eps=clip_eps, loss_type=loss_type,
        huber_delta=huber_delta,
    )  # fmt: skip
    return reduce_tokens(losses.reshape(np.shape(mask)), valid, reduction, segment_ids)


def _std_normal_cdf_diff(lo, hi):
    """Φ(hi) − Φ(lo) for lo < hi, taking the difference in the tail where it is accurate."""
    if lo > 0:
        return 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))
    return 0.5 * (math.erfc(-hi / math.sqrt(2)) - math.erfc(-lo / math.sqrt(2)))


def hl_gauss_probs(x, *, support, sigma):
    """[..., K] Gaussian bin masses over the edges around the centres `support`, renormalised."""
    c = [float(a) for a in np.asarray(support, np.float64)]
    k = len(c)
    edges = [c[0] - (c[1] - c[0]) / 2]
    edges += [(c[j] + c[j + 1]) / 2 for j in range(k - 1)]
    edges += [c[-1] + (c[-1] - c[-2]) / 2]
    x = np.asarray(x, np.float64)
    out = np.zeros(x.shape + (k,))
    for idx in np.ndindex(x.shape):
        z = [(e - x[idx]) / sigma for e in edges]
        mass = [_std_normal_cdf_diff(z[j], z[j + 1]) for j in range(k)]
        total = sum(mass)
        out[idx] = [a / total for a in mass]
    return out


def hl_gauss_loss(
    logits, returns, mask, *, support, sigma, reduction="token-mean", segment_ids=None
):
    valid = np.asarray(mask) != 0
    if segment_ids is not None:
        valid = valid & (np.asarray(segment_ids) != 0)
    logits = np.asarray(logits, np.float64)
    returns = np.asarray(returns, np.float64)
    losses = np.zeros(returns.shape)
    for idx in np.ndindex(returns.shape):
        if not valid[idx]:
            continue
        z = logits[idx]
        top = max(z)
        log_norm = top + math.log(sum(math.exp(a - top) for a in z))
        target = hl_gauss_probs(returns[idx], support=support, sigma=sigma)
        losses[idx] = -sum(p * (a - log_norm) for p, a in zip(target, z, strict=True) if p > 0)
    return reduce_tokens(losses, valid, reduction, segment_ids)


def _pop_std(vals):
    if not vals:
        return 0.0
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((a - mean) ** 2 for a in vals) / len(vals))


def _relative_rmse(est, truth, mask):
    e, y, m = _rows(est), _rows(truth), _valid_rows(mask)
    pairs = [(e[idx], y[idx]) for idx in np.ndindex(m.shape) if m[idx]]
    rmse = math.sqrt(sum((a - b) ** 2 for a, b in pairs) / len(pairs)) if pairs else 0.0
    ys = [b for _, b in pairs]
    std = _pop_std(ys)
    relative = rmse / std if ys and max(ys) > min(ys) else rmse
    return relative, rmse, std


def value_error_metrics(values, true_values, mask):
    relative, rmse, std = _relative_rmse(values, true_values, mask)
    return {
        "relative_value_error": relative,
        "value_rmse": rmse,
        "true_value_std": std,
        "explained_variance_vs_true": explained_variance(values, true_values, mask),
    }


def average_ranks(vals):
    """1-based ranks, ties sharing the mean of the ranks they span."""
    return [sum(1 for b in vals if b < a) + (sum(1 for b in vals if b == a) + 1) / 2 for a in vals]


def spearman(a, b):
    """Pearson correlation of average ranks; None when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    saa = sum((x - ma) ** 2 for x in ra)
    sbb = sum((y - mb) ** 2 for y in rb)
    if saa == 0 or sbb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True)) / math.sqrt(saa * sbb)


def advantage_metrics(advantages, true_advantages, mask, *, sign_threshold=1e-3):
    a, y, m = _rows(advantages), _rows(true_advantages), _valid_rows(mask)
    relative, rmse, std = _relative_rmse(a, y, m)
    decisive = [idx for idx in np.ndindex(m.shape) if m[idx] and abs(y[idx]) > sign_threshold * std]
    agree = [float(np.sign(a[idx]) == np.sign(y[idx])) for idx in decisive]
    rhos = []
    for t in range(m.shape[1]):
        rows = [i for i in range(m.shape[0]) if m[i, t]]
        if len(rows) >= 3:
            rho = spearman([a[i, t] for i in rows], [y[i, t] for i in rows])
            if rho is not None:
                rhos.append(rho)
    return {
        "advantage_error_vs_true": relative,
        "advantage_rmse": rmse,
        "true_advantage_std": std,
        "advantage_sign_agreement": sum(agree) / len(agree) if agree else 0.0,
        "advantage_rank_correlation": sum(rhos) / len(rhos) if rhos else 0.0,
    }


def property_case(seed, shape, density, empty_row, dtype, names):
    """Inputs of a property test: a mask of `density` (row 0 emptied when `empty_row`) and
    float32 normal arrays named `names`, cast to `dtype` (a name) after garbage is written at
    masked positions. Returns (mask, {name: low-precision array}, {name: float32 upcast})."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    if empty_row and mask.ndim and mask.shape[0]:
        mask[0] = False
    low, up = {}, {}
    for name in names:
        x = with_garbage(rng, rng.normal(size=shape).astype(np.float32), mask)
        with np.errstate(over="ignore"):
            low[name] = x.astype(np.dtype(getattr(ml_dtypes, dtype, dtype)))
        up[name] = low[name].astype(np.float32)
    return mask, low, up
