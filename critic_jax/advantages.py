"""Generalised advantage estimation and TD errors with skip semantics for masked tokens.

Masked positions are transparent: the recursion jumps from a valid position straight to the next
valid one, so multi-turn observation tokens neither discount nor break it.

Both methods rewrite GAE as ONE linear recurrence with one scalar carry per row. Let u(t) be the
first valid position at or after t and define, for every t,

    g_t = γ·(V_u(t) + λ·A_u(t)),      g_T = γ·bootstrap (also when no valid position is left).

Then for a valid t:  A_t = r_t − V_t + g_{t+1}  and  returns_t = r_t + g_{t+1},  and

    g_t = e_t + c_t·g_{t+1},   (e_t, c_t) = (γ·(λ·r_t + (1 − λ)·V_t), γλ)   if t is valid,
                               (e_t, c_t) = (0, 1)                          if t is masked,

so a masked step passes the carry through unchanged. All masking happens in the elementwise
passes before and after the recurrence; the loop body is a single multiply-add.
"""

import jax
import jax.numpy as jnp

from critic_jax import _checks

GAE_METHODS = ("scan", "associative")


def _coefficients(rewards, values, valid, gamma, lam):
    """(e, c) of the linear recurrence g_t = e_t + c_t·g_{t+1}, garbage at masked t removed."""
    e = jnp.where(valid, gamma * (lam * rewards + (1.0 - lam) * values), 0.0)
    c = jnp.where(valid, gamma * lam, 1.0)
    return e, c


def _scan_plan(rows: int) -> tuple[int, int]:
    """(block, unroll) of the reverse scan for a batch of `rows` rows; see `_carry_in_scan`."""
    if rows >= 64:
        return 8, 1
    return 1, 4 if rows <= 8 else 1


def _carry_in_scan(e_bt: jax.Array, c_bt: jax.Array, g_end_b: jax.Array) -> jax.Array:
    """g_{t+1} for every t, by a reverse lax.scan over T.

    The layout was chosen by measurement on CPU (experiments/bench_gae.md), where the transposes
    around the scan cost more than the recurrence itself:
    - the inputs are shifted by one step, with (e, c) = (g_end, 0) at the end, so the carry a step
      emits is already g_{t+1}: no copy of the carry per step and no shift afterwards;
    - e and c travel as the real and imaginary parts of ONE complex64 array, so a single
      transpose feeds the scan and each step reads one contiguous row;
    - time is split into blocks of `block` steps, [T/block, B, block]: the transpose then moves
      contiguous runs, and each scan step runs `block` multiply-adds. This pays off for wide
      batches (B >= 64); narrow batches scan one step at a time;
    - unroll=4 only when a step's vector fits one SIMD register (B <= 8) and loop overhead
      dominates; for wider batches unrolling was 1.5-2x slower.
    """
    rows, length = e_bt.shape
    block, unroll = _scan_plan(rows)
    e_bt = jnp.concatenate([e_bt[:, 1:], g_end_b[:, None]], axis=1)
    c_bt = jnp.concatenate([c_bt[:, 1:], jnp.zeros_like(c_bt[:, :1])], axis=1)
    ec_bt = jax.lax.complex(e_bt, c_bt)

    def fma(g_b, ec_b):
        return jnp.real(ec_b) + jnp.imag(ec_b) * g_b

    if block == 1:

        def step(g_b, ec_b):
            g_b = fma(g_b, ec_b)
            return g_b, g_b

        _, g_tb = jax.lax.scan(step, g_end_b, ec_bt.T, reverse=True, unroll=unroll)
        return g_tb.T

    pad = -length % block
    if pad:  # identity steps (e, c) = (0, 1) past the end; their outputs are dropped
        ec_bt = jnp.pad(ec_bt, ((0, 0), (0, pad)), constant_values=1j)
    ec_nbk = ec_bt.reshape(rows, -1, block).transpose(1, 0, 2)

    def block_step(g_b, ec_bk):
        out = [g_b] * block
        for j in reversed(range(block)):
            g_b = fma(g_b, ec_bk[:, j])
            out[j] = g_b
        return g_b, jnp.stack(out, axis=1)

    _, g_nbk = jax.lax.scan(block_step, g_end_b, ec_nbk, reverse=True, unroll=unroll)
    return g_nbk.transpose(1, 0, 2).reshape(rows, -1)[:, :length]


def _carry_in_associative(e_bt: jax.Array, c_bt: jax.Array, g_end_b: jax.Array) -> jax.Array:
    """g_{t+1} for every t, by lax.associative_scan of the affine maps g -> e_t + c_t·g."""
    # Fold the boundary value into the last step so the scan needs no extra element.
    e_bt = e_bt.at[:, -1].add(c_bt[:, -1] * g_end_b)

    def compose(later, earlier):
        # `later` holds maps for larger t; the reverse scan applies them first.
        c_l, e_l = later
        c_e, e_e = earlier
        return c_e * c_l, e_e + c_e * e_l

    _, g_bt = jax.lax.associative_scan(compose, (c_bt, e_bt), reverse=True, axis=1)
    return jnp.concatenate([g_bt[:, 1:], g_end_b[:, None]], axis=1)


def compute_gae(
    rewards: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    gamma: float | jax.Array = 1.0,
    lam: float | jax.Array = 0.95,
    bootstrap_value: jax.typing.ArrayLike | None = None,
    method: str = "scan",
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation, skipping masked tokens.

    A_t = δ_t + γλ·A_t',  δ_t = r_t + γ·V_t' − V_t,  returns_t = A_t + V_t,
    where t' is the next valid position after t; past the last valid position V_t' is
    `bootstrap_value` and A_t' = 0. Masked positions are transparent and get A = returns = 0.
    With λ = 0, returns are the TD(0) targets r_t + γ·V_t'.

    Args:
      rewards: [..., T] float32/bfloat16/float16 reward for emitting token t.
      values: [..., T] float32/bfloat16/float16 V(s_t), the value of the state in which token t
        is chosen.
      mask: [..., T] bool or numeric, nonzero where token t is an action; other positions are
        skipped and may hold any garbage in `rewards` and `values`.
      gamma: discount in [0, 1]; may be traced (checked only when concrete).
      lam: GAE λ in [0, 1]; may be traced (checked only when concrete).
      bootstrap_value: [...] (or anything broadcastable to it) value after the last valid token
        of each row; 0 if None.
      method: "scan" (reverse lax.scan over T) or "associative" (lax.associative_scan, O(log T)
        depth). Both agree to float32 rounding.

    Returns:
      (advantages, returns), float32 [..., T], 0 at masked positions, with stop_gradient.

    Raises:
      ValueError: on mismatched shapes, non-floating rewards/values, γ or λ outside [0, 1], or an
        unknown method.
    """
    if method not in GAE_METHODS:
        raise ValueError(f"Unknown `method`; valid ones are {GAE_METHODS}. Received: {method!r}.")
    shape = _checks.same_shape(rewards=rewards, values=values, mask=mask)
    _checks.unit_interval("gamma", gamma)
    _checks.unit_interval("lam", lam)
    # GAE outputs are targets: nothing upstream of them is differentiated.
    rewards = jax.lax.stop_gradient(_checks.as_float("rewards", rewards))
    values = jax.lax.stop_gradient(_checks.as_float("values", values))
    valid = _checks.valid(mask)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    lead, length = shape[:-1], shape[-1]
    if bootstrap_value is None:
        g_end = jnp.zeros(lead, jnp.float32)
    else:
        boot = jax.lax.stop_gradient(_checks.as_float("bootstrap_value", bootstrap_value))
        try:
            boot = jnp.broadcast_to(boot, lead)
        except ValueError:
            raise ValueError(
                f"Shape mismatch: `bootstrap_value` must broadcast to the leading axes {lead} "
                f"of `rewards`. Received: bootstrap_value={boot.shape}, rewards={shape}."
            ) from None
        g_end = gamma * boot

    if length == 0:
        empty = jnp.zeros(shape, jnp.float32)
        return empty, empty
    rows = 1
    for n in lead:
        rows *= n
    e, c = _coefficients(rewards, values, valid, gamma, lam)
    e, c, g_end = e.reshape(rows, length), c.reshape(rows, length), g_end.reshape(rows)
    carry_in = _carry_in_scan if method == "scan" else _carry_in_associative
    g_next = carry_in(e, c, g_end).reshape(shape)
    returns = jnp.where(valid, rewards + g_next, 0.0)
    advantages = jnp.where(valid, returns - values, 0.0)
    return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


def td_errors(
    rewards: jax.typing.ArrayLike,
    values: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    gamma: float | jax.Array = 1.0,
    bootstrap_value: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """One-step TD errors over the valid tokens, skipping masked ones.

    δ_t = r_t + γ·V_t' − V_t, where t' is the next valid position after t (`bootstrap_value`,
    default 0, past the last one). This is GAE's advantage with λ = 0.

    Args:
      rewards: [..., T] float32/bfloat16/float16 reward for emitting token t.
      values: [..., T] float32/bfloat16/float16 V(s_t).
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      gamma: discount in [0, 1]; may be traced (checked only when concrete).
      bootstrap_value: [...] value after the last valid token of each row; 0 if None.

    Returns:
      float32 [..., T] deltas, 0 at masked positions, with stop_gradient.

    Raises:
      ValueError: on mismatched shapes, non-floating rewards/values or γ outside [0, 1].
    """
    deltas, _ = compute_gae(
        rewards, values, mask, gamma=gamma, lam=0.0, bootstrap_value=bootstrap_value
    )
    return deltas
