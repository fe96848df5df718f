"""Generalised advantage estimation and TD errors with skip semantics for masked tokens.

Masked positions are transparent: the recursion jumps from a valid position straight to the next
valid one, so multi-turn observation tokens neither discount nor break it. With `segment_ids`
(packed rows) the recursion also never crosses from one segment into another.

Every function here rewrites GAE as ONE linear recurrence with one scalar carry per row and λ.
Let u(t) be the first valid position at or after t in t's segment and define, for every t,

    g_t = γ·(V_u(t) + λ·A_u(t)),      g_t = γ·bootstrap when the segment has no valid position left.

Then for a valid t:  A_t = r_t − V_t + g_{t+1}  and  returns_t = r_t + g_{t+1},  and

    g_t = e_t + c_t·g_{t+1},   (e_t, c_t) = (γ·(λ·r_t + (1 − λ)·V_t), γλ)   if t is valid,
                               (e_t, c_t) = (0, 1)                          if t is masked.

The scan computes h_t = g_{t+1} (what position t reads) directly, from the coefficients shifted by
one step: h_t = e_{t+1} + c_{t+1}·h_{t+1}, except where t is the last position of a segment (or of
the row), where h_t = γ·bootstrap and the step is a reset (c = 0). Each step is therefore one of
three kinds, stored as one uint8 per position beside e: transparent (c = 1), valid (c = γλ of the
row) and reset (c = 0). All masking happens in the elementwise passes before and after the
recurrence; the loop body is a single multiply-add. With `segment_ids`, method "scan" also
carries the id of the next segment and resets where the id changes (one select more per step);
method "associative" marks the resets up front.
"""

import jax
import jax.numpy as jnp

from critic_jax import _checks

GAE_METHODS = ("scan", "associative")

# Kinds of step of the shifted recurrence h_t = e'_t + c'_t·h_{t+1}.
_TRANSPARENT, _VALID, _RESET = 0, 1, 2


def _rows(x: jax.Array, rows: int) -> jax.Array:
    return x.reshape(rows, x.shape[-1])


def _bootstrap(
    bootstrap_value, shape: tuple[int, ...], segmented: bool
) -> tuple[jax.Array | None, bool]:
    """(bootstrap as float32 [...] or [..., T], whether it is per position)."""
    if bootstrap_value is None:
        return None, False
    boot = jax.lax.stop_gradient(_checks.as_float("bootstrap_value", bootstrap_value))
    lead = shape[:-1]
    if boot.shape == tuple(shape) and boot.ndim > len(lead):
        if not segmented:
            raise ValueError(
                "`bootstrap_value` of shape [..., T] (one value per segment, read at each "
                "segment's last position) needs `segment_ids`; without them give one value per "
                f"row, shape {lead}. Received: bootstrap_value={boot.shape}, segment_ids=None."
            )
        return boot, True
    try:
        return jnp.broadcast_to(boot, lead), False
    except ValueError:
        expected = f"{lead}" + (f" or {tuple(shape)}" if segmented else "")
        raise ValueError(
            f"Shape mismatch: `bootstrap_value` must broadcast to the leading axes of `rewards` "
            f"or have the shape {expected}. Received: bootstrap_value={boot.shape}, "
            f"rewards={tuple(shape)}."
        ) from None


def _shifted_steps(valid_rt, gamma_r, boot, per_position, ids_rt):
    """Kinds k'_t [R, T] uint8 and reset values γ·bootstrap [R, T] (None when all are 0)."""
    rows, length = valid_rt.shape
    if ids_rt is None:
        # The row's end is its only reset.
        kinds = jnp.concatenate(
            [valid_rt[:, 1:].astype(jnp.uint8), jnp.full((rows, 1), _RESET, jnp.uint8)], axis=1
        )
        if boot is None:
            return kinds, None
        at_end = jnp.arange(length) == length - 1
        return kinds, jnp.where(at_end, (gamma_r * boot.reshape(rows))[:, None], 0.0)
    # First non-padding id at or after t; padding (id 0) inside a segment stays transparent.
    upcoming = jax.lax.associative_scan(
        lambda later, earlier: jnp.where(earlier != 0, earlier, later), ids_rt, reverse=True, axis=1
    )
    next_id = jnp.concatenate([upcoming[:, 1:], jnp.zeros_like(upcoming[:, :1])], axis=1)
    reset = (ids_rt != 0) & (next_id != ids_rt)
    next_valid = jnp.concatenate([valid_rt[:, 1:], jnp.zeros_like(valid_rt[:, :1])], axis=1)
    kinds = jnp.where(reset, _RESET, next_valid.astype(jnp.uint8)).astype(jnp.uint8)
    if boot is None:
        return kinds, None
    if per_position:
        boot_rt = _rows(boot, rows)
    else:  # a row's value goes to the end of its last segment only
        boot_rt = jnp.where(next_id == 0, boot.reshape(rows)[:, None], 0.0)
    return kinds, jnp.where(reset, gamma_r[:, None] * boot_rt, 0.0)


def _step_coefficient(kind, gl):
    return jnp.where(kind == _VALID, gl, jnp.where(kind == _TRANSPARENT, 1.0, 0.0))


def _scan_plan(rows: int) -> tuple[int, int]:
    """(block, unroll) of the reverse scan for `rows` rows; see `_carry_in_scan`."""
    if rows >= 64:
        return 8, 1
    return 1, 4 if rows <= 8 else 1


def _carry_in_scan(e_rts, gl_rs, kinds_rt):
    """h_t for every t and each (e', γλ) pair, by one reverse lax.scan over T.

    The layout was chosen by measurement on CPU (experiments/results/bench_gae.md), where the
    transposes around the scan and the loop's per-step cost outweigh the recurrence itself:
    - each step's coefficient c_t (γλ, 1 or 0 by the step kind) is computed before the scan, and
      (e'_t, c_t) travel as the real and imaginary parts of one complex64 array: one transpose
      feeds the scan, each step reads one row and runs one multiply-add per λ;
    - time is split into blocks of 8 steps for wide batches (>= 64 rows), [T/8, R, 8], so the
      transpose moves contiguous runs; narrow batches scan one step at a time, unrolled by 4 when
      a step's vector fits one SIMD register (<= 8 rows).
    """
    rows, length = kinds_rt.shape
    block, unroll = _scan_plan(rows)
    ec_rts = tuple(
        jax.lax.complex(e, _step_coefficient(kinds_rt, gl[:, None]))
        for e, gl in zip(e_rts, gl_rs, strict=True)
    )

    def fma(h_rs, ec_rs):
        return tuple(jnp.real(ec) + jnp.imag(ec) * h for ec, h in zip(ec_rs, h_rs, strict=True))

    init = tuple(jnp.zeros((rows,), jnp.float32) for _ in e_rts)  # overwritten: c' = 0 at T-1
    if block == 1:

        def step(h_rs, ec_rs):
            h_rs = fma(h_rs, ec_rs)
            return h_rs, h_rs

        _, h_trs = jax.lax.scan(
            step, init, tuple(ec.T for ec in ec_rts), reverse=True, unroll=unroll
        )
        return tuple(h.T for h in h_trs)

    pad = -length % block
    if pad:  # identity steps (e', c) = (0, 1) past the end; their outputs are dropped
        ec_rts = tuple(jnp.pad(ec, ((0, 0), (0, pad)), constant_values=1j) for ec in ec_rts)
    ec_nrks = tuple(ec.reshape(rows, -1, block).transpose(1, 0, 2) for ec in ec_rts)

    def block_step(h_rs, ec_rks):
        out = [None] * block
        for j in reversed(range(block)):
            h_rs = fma(h_rs, tuple(ec[:, j] for ec in ec_rks))
            out[j] = h_rs
        return h_rs, tuple(jnp.stack([o[i] for o in out], axis=1) for i in range(len(h_rs)))

    _, h_nrks = jax.lax.scan(block_step, init, ec_nrks, reverse=True, unroll=unroll)
    return tuple(h.transpose(1, 0, 2).reshape(rows, -1)[:, :length] for h in h_nrks)


def _carry_in_segmented_scan(e_rts, gl_rs, kinds_rt, ids_rt, ends):
    """`_carry_in_scan` for packed rows: the scan also carries the id of the next segment.

    Position t ends its segment when its id is nonzero and differs from the first nonzero id
    after t; there h_t restarts from γ·bootstrap (`ends`: None for 0, [R] for the value of each
    row's last segment, or [R, T] read at each segment's end). The kinds carry no resets but the
    row's end.
    """
    rows = kinds_rt.shape[0]
    per_position = ends is not None and ends.ndim == 2

    def step(carry, xs):
        h_rs, next_id_r = carry
        kind_r, id_r, e_rs, end_r = xs
        reset_r = (id_r != 0) & (id_r != next_id_r)
        if end_r is None:
            end_r = 0.0 if ends is None else jnp.where(next_id_r == 0, ends, 0.0)
        h_rs = tuple(
            jnp.where(reset_r, end_r, e + _step_coefficient(kind_r, gl) * h)
            for e, gl, h in zip(e_rs, gl_rs, h_rs, strict=True)
        )
        return (h_rs, jnp.where(id_r != 0, id_r, next_id_r)), h_rs

    init = (
        tuple(jnp.zeros((rows,), jnp.float32) for _ in e_rts),
        jnp.zeros((rows,), ids_rt.dtype),
    )
    xs = (kinds_rt.T, ids_rt.T, tuple(e.T for e in e_rts), ends.T if per_position else None)
    _, h_trs = jax.lax.scan(step, init, xs, reverse=True)
    return tuple(h.T for h in h_trs)


def _carry_in_associative(e_rts, gl_rs, kinds_rt):
    """h_t for every t, by lax.associative_scan of the affine maps h -> e'_t + c'_t·h."""

    def compose(later, earlier):
        # `later` holds maps for larger t; the reverse scan applies them first.
        c_l, e_l = later
        c_e, e_e = earlier
        return c_e * c_l, e_e + c_e * e_l

    out = []
    for e_rt, gl_r in zip(e_rts, gl_rs, strict=True):
        c_rt = _step_coefficient(kinds_rt, gl_r[:, None])
        # c' = 0 at each row's end, so the composed offset is h itself.
        _, h_rt = jax.lax.associative_scan(compose, (c_rt, e_rt), reverse=True, axis=1)
        out.append(h_rt)
    return tuple(out)


def _gae_carries(rewards, values, mask, gamma, lams, bootstrap_value, segment_ids, method):
    """Shared body of the public functions: validated inputs -> (valid, r, V, h per λ).

    Returns None for the h's when the time axis is empty.
    """
    shape = _checks.same_shape(rewards=rewards, values=values, mask=mask)
    lead = shape[:-1]
    gamma = _checks.per_row("gamma", gamma, lead, shape)
    lams = {name: _checks.per_row(name, lam, lead, shape) for name, lam in lams.items()}
    ids = None if segment_ids is None else _checks.segment_ids(segment_ids, shape)
    # GAE outputs are targets: nothing upstream of them is differentiated.
    rewards = jax.lax.stop_gradient(_checks.as_float("rewards", rewards))
    values = jax.lax.stop_gradient(_checks.as_float("values", values))
    valid = _checks.valid(mask)
    if ids is not None:
        valid = valid & (ids != 0)
    boot, per_position = _bootstrap(bootstrap_value, shape, ids is not None)
    length = shape[-1]
    rows = 1
    for n in lead:
        rows *= n
    if length == 0:
        return valid, rewards, values, None

    gamma_b = jnp.broadcast_to(gamma, lead)
    gamma_r = gamma_b.reshape(rows)
    valid_rt = _rows(valid, rows)
    ids_rt = None if ids is None else _rows(ids, rows)
    # The scan finds segment ends itself (it carries the id of the next segment); the
    # associative method needs them up front.
    in_scan = ids_rt is not None and method == "scan"
    kinds, resets = _shifted_steps(
        valid_rt, gamma_r, None if in_scan else boot, per_position, None if in_scan else ids_rt
    )
    e_rts, gl_rs = [], []
    for lam in lams.values():
        lam_b = jnp.broadcast_to(lam, lead)
        e = jnp.where(
            valid,
            gamma_b[..., None] * (lam_b[..., None] * rewards + (1.0 - lam_b[..., None]) * values),
            0.0,
        )
        e_rt = _rows(e, rows)
        e_rt = jnp.concatenate([e_rt[:, 1:], jnp.zeros_like(e_rt[:, :1])], axis=1)
        if resets is not None or (ids_rt is not None and not in_scan):
            # (Otherwise the only reset is the row's end, whose e' is already 0.)
            e_rt = jnp.where(kinds == _RESET, 0.0 if resets is None else resets, e_rt)
        e_rts.append(e_rt)
        gl_rs.append(gamma_r * lam_b.reshape(rows))
    if in_scan:
        if boot is None:
            ends = None
        elif per_position:
            ends = gamma_r[:, None] * _rows(boot, rows)
        else:
            ends = gamma_r * boot.reshape(rows)
        h_rts = _carry_in_segmented_scan(tuple(e_rts), tuple(gl_rs), kinds, ids_rt, ends)
    else:
        carry_in = _carry_in_scan if method == "scan" else _carry_in_associative
        h_rts = carry_in(tuple(e_rts), tuple(gl_rs), kinds)
    return valid, rewards, values, tuple(h.reshape(shape) for h in h_rts)


def compute_gae(
    rewards: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    gamma: float | jax.typing.ArrayLike = 1.0,
    lam: float | jax.typing.ArrayLike = 0.95,
    bootstrap_value: jax.typing.ArrayLike | None = None,
    method: str = "scan",
    segment_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation, skipping masked tokens, per packed segment.

    A_t = δ_t + γλ·A_t',  δ_t = r_t + γ·V_t' − V_t,  returns_t = A_t + V_t,
    where t' is the next valid position after t in t's segment; past the segment's last valid
    position V_t' is the segment's bootstrap value and A_t' = 0. Masked and padding positions are
    transparent and get A = returns = 0. With λ = 0, returns are the TD(0) targets r_t + γ·V_t'.

    Args:
      rewards: [..., T] float32/bfloat16/float16 reward for emitting token t.
      values: [..., T] float32/bfloat16/float16 V(s_t), the value of the state in which token t
        is chosen.
      mask: [..., T] bool or numeric, nonzero where token t is an action; other positions are
        skipped and may hold any garbage in `rewards` and `values`.
      gamma: discount in [0, 1], a scalar or one value per row (shape [...]); may be traced
        (checked only when concrete).
      lam: GAE λ in [0, 1], a scalar or one value per row (shape [...]); may be traced.
      bootstrap_value: value after the last valid token; 0 if None. Either [...] (or anything
        broadcastable to it), one value per row: without `segment_ids` it follows the row's last
        valid token; with `segment_ids` it follows the row's LAST segment only (the one a packing
        window may cut), and every earlier segment bootstraps from 0. Or, with `segment_ids`
        only, [..., T], one value per segment, read at each segment's last position (the last
        position holding its id, valid or not); the other entries are ignored.
      method: "scan" (reverse lax.scan over T) or "associative" (lax.associative_scan, O(log T)
        depth). Both agree to float32 rounding.
      segment_ids: optional [..., T] integer ids of packed rollouts: 0 is padding (treated like a
        masked position), 1..k are the rollouts of a row. Each segment is a contiguous run of one
        id (padding may sit inside it and is skipped); a run of an id that follows a different
        nonzero id starts a new rollout. The recursion never crosses from one segment into
        another, so a packed row gives exactly the GAE of each rollout computed alone.

    Returns:
      (advantages, returns), float32 [..., T], 0 at masked and padding positions, with
      stop_gradient.

    Raises:
      ValueError: on mismatched shapes, non-floating rewards/values, non-integer segment_ids,
        γ or λ not a scalar or of shape [...], concrete γ or λ outside [0, 1] or NaN, or an
        unknown method.
    """
    _checks.option("method", method, GAE_METHODS)
    valid, rewards, values, h = _gae_carries(
        rewards, values, mask, gamma, {"lam": lam}, bootstrap_value, segment_ids, method
    )
    if h is None:
        empty = jnp.zeros(rewards.shape, jnp.float32)
        return empty, empty
    returns = jnp.where(valid, rewards + h[0], 0.0)
    advantages = jnp.where(valid, returns - values, 0.0)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def td_errors(
    rewards: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    gamma: float | jax.typing.ArrayLike = 1.0,
    bootstrap_value: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """One-step TD errors over the valid tokens, skipping masked ones.

    δ_t = r_t + γ·V_t' − V_t, where t' is the next valid position after t in t's segment (the
    segment's bootstrap value past its last one). This is GAE's advantage with λ = 0.

    Args:
      rewards: [..., T] float32/bfloat16/float16 reward for emitting token t.
      values: [..., T] float32/bfloat16/float16 V(s_t).
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      gamma: discount in [0, 1], a scalar or one value per row (shape [...]); may be traced.
      bootstrap_value: [...] or, with `segment_ids`, [..., T]; as in `compute_gae`. 0 if None.
      segment_ids: optional [..., T] integer ids of packed rollouts (0 = padding); as in
        `compute_gae`.

    Returns:
      float32 [..., T] deltas, 0 at masked and padding positions, with stop_gradient.

    Raises:
      ValueError: on mismatched shapes, non-floating rewards/values, non-integer segment_ids,
        γ not a scalar or of shape [...], or a concrete γ outside [0, 1] or NaN.
    """
    deltas, _ = compute_gae(
        rewards,
        values,
        mask,
        gamma=gamma,
        lam=0.0,
        bootstrap_value=bootstrap_value,
        segment_ids=segment_ids,
    )
    return deltas


def decoupled_gae(
    rewards: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    gamma: float | jax.typing.ArrayLike = 1.0,
    value_lam: float | jax.typing.ArrayLike = 1.0,
    policy_lam: float | jax.typing.ArrayLike = 0.95,
    bootstrap_value: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """GAE with one λ for the policy's advantages and another for the critic's targets (VC-PPO).

    policy_advantages = A^(γ, policy_lam),  value_returns = A^(γ, value_lam) + V,
    with A^(γ, λ) the skip-mask GAE of `compute_gae`. VC-PPO trains the critic on λ = 1
    (unbiased Monte-Carlo targets) while the policy uses λ ≈ 0.95. Both recurrences run in the
    same reverse scan over T, so this costs one pass, not two.

    Args:
      rewards: [..., T] float32/bfloat16/float16 reward for emitting token t.
      values: [..., T] float32/bfloat16/float16 V(s_t).
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      gamma: discount in [0, 1], a scalar or one value per row (shape [...]); may be traced.
      value_lam: λ of the critic's targets in [0, 1], scalar or per row; may be traced.
      policy_lam: λ of the policy's advantages in [0, 1], scalar or per row; may be traced.
      bootstrap_value: [...] or, with `segment_ids`, [..., T]; as in `compute_gae`. 0 if None.
      segment_ids: optional [..., T] integer ids of packed rollouts (0 = padding); as in
        `compute_gae`.

    Returns:
      (policy_advantages, value_returns), float32 [..., T], 0 at masked and padding positions,
      with stop_gradient; equal to `compute_gae(..., lam=policy_lam)[0]` and
      `compute_gae(..., lam=value_lam)[1]`.

    Raises:
      ValueError: on mismatched shapes, non-floating rewards/values, non-integer segment_ids,
        γ or a λ not a scalar or of shape [...], or a concrete one outside [0, 1] or NaN.
    """
    lams = {"policy_lam": policy_lam, "value_lam": value_lam}
    valid, rewards, values, h = _gae_carries(
        rewards, values, mask, gamma, lams, bootstrap_value, segment_ids, "scan"
    )
    if h is None:
        empty = jnp.zeros(rewards.shape, jnp.float32)
        return empty, empty
    h_policy, h_value = h
    advantages = jnp.where(valid, rewards + h_policy - values, 0.0)
    returns = jnp.where(valid, rewards + h_value, 0.0)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def length_adaptive_lam(
    mask: jax.typing.ArrayLike, *, alpha: float | jax.Array = 0.05
) -> jax.Array:
    """Length-adaptive GAE λ of VAPO: one λ per row from its number of valid tokens.

    λ = clip(1 − 1 / (α·n), 0, 1),  n = number of valid tokens of the row;  λ = 0 if n = 0.
    Long responses get λ near 1 (less bias where the reward is far away), short ones less.
    Pass the result as `lam` (or `policy_lam`) of `compute_gae` / `decoupled_gae`.

    Args:
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      alpha: α > 0 (VAPO uses 0.05); may be traced (checked only when concrete).

    Returns:
      float32 [...] λ per row.

    Raises:
      ValueError: if `mask` has no time axis or a concrete α is not > 0 and finite.
    """
    _checks.positive("alpha", alpha)
    if jnp.ndim(mask) == 0:
        raise ValueError(
            f"`mask` must have a time axis: shape [..., T]. Received: shape {jnp.shape(mask)}."
        )
    n = jnp.sum(_checks.valid(mask), axis=-1, dtype=jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    lam = 1.0 - 1.0 / (alpha * jnp.maximum(n, 1.0))
    return jnp.where(n > 0, jnp.clip(lam, 0.0, 1.0), 0.0)
