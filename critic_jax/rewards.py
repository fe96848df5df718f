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
    mask: jax.typing.ArrayLike | None = None,
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
      clamp: optional bound c > 0 on the absolute value of the estimate (inf: none); None for
        no clipping.
      mask: optional [..., T] bool or numeric, nonzero where token t is an action. Masked
        entries of both log-probabilities are replaced before any arithmetic and the estimate
        is 0 there, so garbage (NaN, inf) at masked positions reaches neither the result nor
        a gradient. Without a mask every position is computed.

    Returns:
      float32 [..., T]; 0 at masked positions when `mask` is given.

    Raises:
      ValueError: on mismatched shapes, non-floating or None inputs, an unknown `kind` or a
        non-positive or NaN `clamp`.
    """
    _checks.option("kind", kind, KL_KINDS)
    _checks.positive("clamp", clamp, allow_inf=True)
    _checks.required(logprobs=logprobs, ref_logprobs=ref_logprobs)
    _checks.same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    logprobs = _checks.as_float("logprobs", logprobs)
    ref_logprobs = _checks.as_float("ref_logprobs", ref_logprobs)
    if mask is not None:
        valid = _checks.valid(mask)
        logprobs = jnp.where(valid, logprobs, 0.0)
        ref_logprobs = jnp.where(valid, ref_logprobs, 0.0)
    d = logprobs - ref_logprobs
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d * d
    else:
        kl = jnp.expm1(-d) + d
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    if mask is not None:
        kl = jnp.where(valid, kl, 0.0)
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

    Garbage in `kl` at masked positions, and in `sequence_reward` of rows without a valid token,
    is replaced before any arithmetic: it reaches neither the result nor a gradient (with respect
    to `sequence_reward`, `kl` or `kl_coef`). For finite gradients through `kl_penalty` as well,
    pass it the mask too.

    Args:
      sequence_reward: [...] float32/bfloat16/float16 reward of each row (e.g. a reward model's
        score); rows without a valid token ignore it.
      mask: [..., T] bool or numeric, nonzero where token t is an action.
      kl: optional [..., T] per-token KL estimate (see `kl_penalty`); garbage at masked
        positions is ignored.
      kl_coef: β, the weight of the KL penalty; finite when concrete; may be traced.

    Returns:
      float32 [..., T], 0 at masked positions (all 0 when T = 0).

    Raises:
      ValueError: if `sequence_reward` or `mask` is None, `sequence_reward` is not
        `mask.shape[:-1]`, `kl` is not `mask.shape`, on non-floating inputs, or a concrete
        `kl_coef` that is NaN or infinite.
    """
    _checks.required(sequence_reward=sequence_reward, mask=mask)
    _checks.finite("kl_coef", kl_coef)
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
    valid = _checks.valid(mask)
    reward = _checks.as_float("sequence_reward", sequence_reward)
    reward = jnp.where(jnp.any(valid, axis=-1), reward, 0.0)
    length = mask_shape[-1]
    if length == 0:
        out = jnp.zeros(mask_shape, jnp.float32)
    else:
        # Index of the last valid position: the first valid one of the reversed row.
        last = length - 1 - jnp.argmax(valid[..., ::-1], axis=-1)
        is_last = (jnp.arange(length) == last[..., None]) & valid
        out = jnp.where(is_last, reward[..., None], 0.0)
    if kl is not None:
        kl = jnp.where(valid, _checks.as_float("kl", kl), 0.0)
        out = out - jnp.where(valid, jnp.asarray(kl_coef, jnp.float32) * kl, 0.0)
    return out
