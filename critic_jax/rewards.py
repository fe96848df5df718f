"""Token-level reward shaping: KL penalty estimators and the sequence-reward placement."""

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax import _checks

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: jax.typing.ArrayLike,
    ref_logprobs: jax.typing.ArrayLike,
    *,
    kind: str = "k1",
    clamp: float | jax.Array | None = None,
) -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from sampled-token log-probabilities.

    With d = logprobs − ref_logprobs (Schulman's estimators):
      k1 = d,   k2 = ½·d²,   k3 = exp(−d) − 1 + d   (unbiased, non-negative).
    With `clamp = c` the estimate is clipped to [−c, c], as RLHF frameworks do against
    the blow-up of exp(−d) for very unlikely reference tokens.

    Args:
      logprobs: [..., T] float32/bfloat16/float16 log π(token_t) of the current policy.
      ref_logprobs: [..., T] log π_ref(token_t) of the reference policy.
      kind: "k1", "k2" or "k3".
      clamp: optional bound c > 0 on the absolute value of the estimate; None for no clipping.

    Returns:
      float32 [..., T]. No mask is applied: `token_rewards` ignores masked positions.

    Raises:
      ValueError: on mismatched shapes, non-floating inputs, an unknown `kind` or a
        non-positive `clamp`.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"Unknown `kind`; valid ones are {KL_KINDS}. Received: {kind!r}.")
    if clamp is not None and _checks.is_concrete(clamp) and not float(clamp) > 0:
        raise ValueError(f"`clamp` must be > 0 or None. Received: clamp={clamp}.")
    _checks.same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = _checks.as_float("logprobs", logprobs) - _checks.as_float("ref_logprobs", ref_logprobs)
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d * d
    else:
        kl = jnp.expm1(-d) + d
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def token_rewards(
    sequence_reward: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    kl: jax.typing.ArrayLike | None = None,
    kl_coef: float | jax.Array = 0.0,
) -> jax.Array:
    """Token-level rewards from one scalar reward per sequence and an optional KL penalty.

    r_t = 1[t = last valid position of the row]·R − β·kl_t   for valid t,   r_t = 0 otherwise,
    with R = `sequence_reward` and β = `kl_coef`.

    Args:
      sequence_reward: [...] float32/bfloat16/float16 reward of each row (e.g. a reward model's
        score); rows without a valid token ignore it.
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      kl: optional [..., T] per-token KL estimate (see `kl_penalty`); garbage at masked
        positions is ignored.
      kl_coef: β, the weight of the KL penalty; may be traced.

    Returns:
      float32 [..., T], 0 at masked positions.

    Raises:
      ValueError: if `sequence_reward` is not `mask.shape[:-1]`, if `kl` is not `mask.shape`,
        or on non-floating inputs.
    """
    mask_shape = np.shape(mask)
    if len(mask_shape) == 0:
        raise ValueError(
            f"`mask` must have a time axis: shape [..., T]. Received: shape {mask_shape}."
        )
    if np.shape(sequence_reward) != mask_shape[:-1]:
        raise ValueError(
            f"Shape mismatch: `sequence_reward` must have shape mask.shape[:-1] = "
            f"{mask_shape[:-1]}. Received: sequence_reward={np.shape(sequence_reward)}, "
            f"mask={mask_shape}."
        )
    if kl is not None:
        _checks.same_shape(mask=mask, kl=kl)
    reward = _checks.as_float("sequence_reward", sequence_reward)
    valid = _checks.valid(mask)
    length = mask_shape[-1]
    # Index of the last valid position: the first valid one of the reversed row.
    last = length - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
    is_last = (jnp.arange(length) == last[..., None]) & valid
    out = jnp.where(is_last, reward[..., None], 0.0)
    if kl is not None:
        kl = _checks.as_float("kl", kl)
        out = out - jnp.where(valid, jnp.asarray(kl_coef, jnp.float32) * kl, 0.0)
    return out
