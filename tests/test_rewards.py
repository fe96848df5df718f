"""kl_penalty and token_rewards against the NumPy loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

import critic_jax

SHAPE = (2, 3, 10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("use_jit", [False, True])
def test_kl_penalty_matches_reference(kind, clamp, use_jit):
    rng = np.random.default_rng(0)
    logprobs = -rng.exponential(size=SHAPE).astype(np.float32)
    ref_logprobs = logprobs + rng.normal(scale=1.0, size=SHAPE).astype(np.float32)
    fn = functools.partial(critic_jax.kl_penalty, kind=kind, clamp=clamp)
    got = (jax.jit(fn) if use_jit else fn)(logprobs, ref_logprobs)
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    want = references.kl_penalty(logprobs, ref_logprobs, kind=kind, clamp=clamp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if clamp is not None:
        assert np.any(np.abs(references.kl_penalty(logprobs, ref_logprobs, kind=kind)) > clamp)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kl_penalty_low_precision(dtype):
    rng = np.random.default_rng(1)
    logprobs = jnp.asarray(-rng.exponential(size=SHAPE), dtype)
    ref_logprobs = jnp.asarray(-rng.exponential(size=SHAPE), dtype)
    got = critic_jax.kl_penalty(logprobs, ref_logprobs, kind="k3")
    assert got.dtype == jnp.float32
    want = references.kl_penalty(
        np.asarray(logprobs.astype(jnp.float32)),
        np.asarray(ref_logprobs.astype(jnp.float32)),
        kind="k3",
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_token_rewards_match_reference(with_kl, use_jit):
    rng = np.random.default_rng(2)
    mask = references.mixed_mask(rng, SHAPE)
    reward = rng.normal(size=SHAPE[:-1]).astype(np.float32)
    kl = references.with_garbage(rng, rng.normal(size=SHAPE).astype(np.float32), mask)
    kl = kl if with_kl else None
    fn = functools.partial(critic_jax.token_rewards, kl=kl)
    if use_jit:  # kl_coef traced
        got = jax.jit(lambda r, m, c: critic_jax.token_rewards(r, m, kl=kl, kl_coef=c))(
            reward, mask, jnp.float32(0.1)
        )
    else:
        got = fn(reward, mask, kl_coef=0.1)
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    want = references.token_rewards(reward, mask, kl=kl, kl_coef=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_token_rewards_numeric_mask_and_low_precision():
    rng = np.random.default_rng(3)
    mask = references.mixed_mask(rng, SHAPE)
    reward = jnp.asarray(rng.normal(size=SHAPE[:-1]), jnp.bfloat16)
    kl = jnp.asarray(rng.normal(size=SHAPE), jnp.float16)
    got = critic_jax.token_rewards(reward, mask.astype(np.float32) * 2, kl=kl, kl_coef=0.5)
    want = references.token_rewards(
        np.asarray(reward.astype(jnp.float32)),
        mask,
        kl=np.asarray(kl.astype(jnp.float32)),
        kl_coef=0.5,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_errors():
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`ref_logprobs`.*Received"):
        critic_jax.kl_penalty(x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"'k1', 'k2', 'k3'.*'k4'"):
        critic_jax.kl_penalty(x, x, kind="k4")
    with pytest.raises(ValueError, match=r"`clamp`"):
        critic_jax.kl_penalty(x, x, clamp=0.0)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`sequence_reward`.*\(2,\)"):
        critic_jax.token_rewards(jnp.zeros(3), x)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`kl`"):
        critic_jax.token_rewards(jnp.zeros(2), x, kl=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"`sequence_reward`.*floating"):
        critic_jax.token_rewards(jnp.zeros(2, jnp.int32), x)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 2.0])
def test_garbage_at_masked_positions_never_reaches_the_gradient(kind, clamp):
    rng = np.random.default_rng(5)
    mask = references.mixed_mask(rng, SHAPE)
    logprobs = -rng.exponential(size=SHAPE).astype(np.float32)
    ref_logprobs = logprobs + rng.normal(scale=0.5, size=SHAPE).astype(np.float32)
    logprobs, ref_logprobs = (
        references.with_garbage(rng, x, mask) for x in (logprobs, ref_logprobs)
    )
    reward = rng.normal(size=SHAPE[:-1]).astype(np.float32)
    reward[~mask.any(-1)] = np.nan  # rows without a valid token: their reward is ignored

    def total(logprobs, ref_logprobs, reward, coef):
        kl = critic_jax.kl_penalty(logprobs, ref_logprobs, kind=kind, clamp=clamp, mask=mask)
        rewards = critic_jax.token_rewards(reward, mask, kl=kl, kl_coef=coef)
        return jnp.sum(rewards * jnp.arange(SHAPE[-1])), rewards

    grads, rewards = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3), has_aux=True))(
        logprobs, ref_logprobs, reward, jnp.float32(0.1)
    )
    for g in grads:
        assert np.all(np.isfinite(g))
    for g in grads[:2]:
        np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2])[~mask.any(-1)], 0.0)
    kl = critic_jax.kl_penalty(logprobs, ref_logprobs, kind=kind, clamp=clamp, mask=mask)
    np.testing.assert_array_equal(np.asarray(kl)[~mask], 0.0)
    clean = [np.where(mask, x, 0.0) for x in (logprobs, ref_logprobs)]
    want_kl = references.kl_penalty(*clean, kind=kind, clamp=clamp)
    np.testing.assert_allclose(kl, np.where(mask, want_kl, 0.0), rtol=1e-5, atol=1e-6)
    want = references.token_rewards(np.nan_to_num(reward), mask, kl=want_kl, kl_coef=0.1)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)


def test_token_rewards_gradients_ignore_its_own_garbage():
    rng = np.random.default_rng(6)
    mask = references.mixed_mask(rng, SHAPE)
    kl = references.with_garbage(rng, rng.normal(size=SHAPE).astype(np.float32), mask)
    reward = np.where(mask.any(-1), rng.normal(size=SHAPE[:-1]), np.nan).astype(np.float32)

    def total(reward, kl, coef):
        return jnp.sum(critic_jax.token_rewards(reward, mask, kl=kl, kl_coef=coef))

    value, grads = jax.value_and_grad(total, argnums=(0, 1, 2))(reward, kl, 0.3)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_allclose(grads[2], -np.sum(np.where(mask, kl, 0.0)), rtol=1e-5)


def test_empty_time_axis_and_none_arrays():
    mask = np.ones((2, 3, 0), bool)
    got = jax.jit(critic_jax.token_rewards)(jnp.ones((2, 3)), mask, kl=jnp.zeros((2, 3, 0)))
    assert got.shape == (2, 3, 0) and got.dtype == jnp.float32
    got = critic_jax.kl_penalty(jnp.zeros((2, 0)), jnp.zeros((2, 0)), kind="k3", mask=mask[0, :2])
    assert got.shape == (2, 0)
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=r"`logprobs`.*None"):
        critic_jax.kl_penalty(None, x)
    with pytest.raises(ValueError, match=r"`ref_logprobs`.*None"):
        critic_jax.kl_penalty(x, None)
    with pytest.raises(ValueError, match=r"`sequence_reward`.*None"):
        critic_jax.token_rewards(None, x)
    with pytest.raises(ValueError, match=r"`mask`.*None"):
        critic_jax.token_rewards(jnp.zeros(2), None)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`"):
        critic_jax.kl_penalty(x, x, mask=jnp.ones((2, 4)))


def test_nan_hyperparameters_are_rejected():
    x, reward = jnp.zeros((2, 5)), jnp.zeros(2)
    for clamp in (float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"`clamp`"):
            critic_jax.kl_penalty(x, x, clamp=clamp)
    for coef in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`kl_coef`"):
            critic_jax.token_rewards(reward, x, kl=x, kl_coef=coef)


# ----------------------------------------------------------------------------- properties

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from properties import DENSITY, DTYPES, PROPERTY, SEEDS, SHAPES  # noqa: E402


@PROPERTY
@given(
    shape=SHAPES,
    density=DENSITY,
    empty_row=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
    kind=st.sampled_from(["k1", "k2", "k3"]),
    clamp=st.sampled_from([None, 1.0]),
)
def test_property_kl_penalty_and_token_rewards(shape, density, empty_row, dtype, seed, kind,
                                               clamp):  # fmt: skip
    mask, low, up = references.property_case(
        seed, shape, density, empty_row, dtype, ("logprobs", "ref_logprobs")
    )
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=shape[:-1]).astype(np.float32)
    reward[~mask.any(-1)] = np.nan

    def total(logprobs, ref_logprobs, reward, coef):
        kl = critic_jax.kl_penalty(logprobs, ref_logprobs, kind=kind, clamp=clamp, mask=mask)
        rewards = critic_jax.token_rewards(reward, mask, kl=kl, kl_coef=coef)
        return jnp.sum(rewards), (kl, rewards)

    grads, (kl, rewards) = jax.grad(total, argnums=(0, 1, 2, 3), has_aux=True)(
        low["logprobs"], low["ref_logprobs"], reward, jnp.float32(0.2)
    )
    assert kl.dtype == rewards.dtype == jnp.float32
    clean = [np.where(mask, up[k], 0.0) for k in ("logprobs", "ref_logprobs")]
    want_kl = np.where(mask, references.kl_penalty(*clean, kind=kind, clamp=clamp), 0.0)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
    want = references.token_rewards(np.nan_to_num(reward), mask, kl=want_kl, kl_coef=0.2)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    for g in grads[:2]:
        np.testing.assert_array_equal(np.asarray(g, np.float32)[~mask], 0.0)
