"""compute_gae and td_errors against the NumPy loops, rlax and the OpenRLHF/TRL loop."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
import rlax

import critic_jax

SHAPE = (2, 3, 11)  # extra leading axis; six rows cover every row kind of `mixed_mask`


def _batch(seed, shape=SHAPE, garbage=True):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=shape).astype(np.float32)
    values = rng.normal(size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    if garbage:
        rewards = references.with_garbage(rng, rewards, mask)
        values = references.with_garbage(rng, values, mask)
    boot = rng.normal(size=shape[:-1]).astype(np.float32)
    return rewards, values, mask, boot


@pytest.mark.parametrize("method", ["scan", "associative"])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("use_jit", [False, True])
def test_gae_matches_reference(method, lam, use_jit):
    rewards, values, mask, boot = _batch(int(lam * 100))
    for bootstrap in (None, boot):
        fn = functools.partial(
            critic_jax.compute_gae, gamma=0.9, lam=lam, method=method, bootstrap_value=bootstrap
        )
        fn = jax.jit(fn) if use_jit else fn
        adv, ret = fn(rewards, values, mask)
        want_adv, want_ret = references.gae(
            rewards, values, mask, gamma=0.9, lam=lam, bootstrap_value=bootstrap
        )
        assert adv.dtype == ret.dtype == jnp.float32
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 13), (5, 13, 21), (64, 8)])
def test_gae_scan_layouts_for_every_batch_width(shape):
    # The scan picks its layout from the number of rows (see `_scan_plan`): cover each choice,
    # including a length that is not a multiple of the time block.
    rewards, values, mask, boot = _batch(20, shape=shape)
    for method in ("scan", "associative"):
        fn = functools.partial(
            critic_jax.compute_gae, gamma=0.95, lam=0.9, bootstrap_value=boot, method=method
        )
        adv, ret = jax.jit(fn)(rewards, values, mask)
        want_adv, want_ret = references.gae(
            rewards, values, mask, gamma=0.95, lam=0.9, bootstrap_value=boot
        )
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_td_errors_match_reference(use_jit):
    rewards, values, mask, boot = _batch(1)
    fn = functools.partial(critic_jax.td_errors, gamma=0.8, bootstrap_value=boot)
    fn = jax.jit(fn) if use_jit else fn
    want = references.td_errors(rewards, values, mask, gamma=0.8, bootstrap_value=boot)
    np.testing.assert_allclose(fn(rewards, values, mask), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mask_dtype", [np.float32, np.int32, np.uint8])
def test_gae_low_precision_inputs_and_numeric_masks(dtype, mask_dtype):
    rewards, values, mask, _ = _batch(2)
    rewards, values = jnp.asarray(rewards, dtype), jnp.asarray(values, dtype)
    numeric_mask = mask.astype(mask_dtype) * 3  # any nonzero value is valid
    adv, ret = jax.jit(critic_jax.compute_gae)(rewards, values, numeric_mask)
    assert adv.dtype == ret.dtype == jnp.float32
    # Reference on the values the function actually received.
    want_adv, want_ret = references.gae(
        np.asarray(rewards.astype(jnp.float32)),
        np.asarray(values.astype(jnp.float32)),
        mask,
        gamma=1.0,
        lam=0.95,
    )
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_garbage_at_masked_positions_changes_nothing():
    rewards, values, mask, _ = _batch(3, garbage=False)
    clean = critic_jax.compute_gae(rewards, values, mask, gamma=0.9)
    rng = np.random.default_rng(0)
    dirty = critic_jax.compute_gae(
        references.with_garbage(rng, rewards, mask),
        references.with_garbage(rng, values, mask),
        mask,
        gamma=0.9,
    )
    chex.assert_trees_all_equal(clean, dirty)
    assert np.all(np.asarray(dirty[0])[~mask] == 0) and np.all(np.asarray(dirty[1])[~mask] == 0)


def test_gae_traced_gamma_lam_and_vmap_over_gamma():
    rewards, values, mask, _ = _batch(4)

    @jax.jit
    def gae(gamma, lam):
        return critic_jax.compute_gae(rewards, values, mask, gamma=gamma, lam=lam)

    adv, ret = gae(jnp.float32(0.7), jnp.float32(0.6))
    want_adv, want_ret = references.gae(rewards, values, mask, gamma=0.7, lam=0.6)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)

    gammas = jnp.array([0.0, 0.5, 1.0], jnp.float32)
    advs, _ = jax.jit(jax.vmap(lambda g: gae(g, jnp.float32(0.9))))(gammas)
    for g, adv in zip(np.asarray(gammas), advs, strict=True):
        want, _ = references.gae(rewards, values, mask, gamma=float(g), lam=0.9)
        np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_gae_outputs_carry_no_gradient(method):
    rewards, values, mask, boot = _batch(5)

    def loss(rewards, values, boot):
        adv, ret = critic_jax.compute_gae(
            rewards, values, mask, gamma=0.9, bootstrap_value=boot, method=method
        )
        deltas = critic_jax.td_errors(rewards, values, mask, gamma=0.9)
        return jnp.sum(adv) + jnp.sum(ret) + jnp.sum(deltas)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(rewards, values, boot)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_gae_all_empty_mask_gives_zeros():
    rewards, values, _, boot = _batch(6)
    mask = np.zeros(SHAPE, bool)
    for method in ("scan", "associative"):
        adv, ret = critic_jax.compute_gae(
            rewards, values, mask, bootstrap_value=boot, method=method
        )
        np.testing.assert_array_equal(adv, np.zeros(SHAPE))
        np.testing.assert_array_equal(ret, np.zeros(SHAPE))


@pytest.mark.parametrize("shape", [(64, 0), (3, 1), (0, 5)])
def test_gae_degenerate_lengths(shape):
    rng = np.random.default_rng(21)
    rewards, values = rng.normal(size=(2, *shape)).astype(np.float32)
    mask = rng.random(shape) < 0.5
    boot = rng.normal(size=shape[:-1]).astype(np.float32)
    for method in ("scan", "associative"):
        adv, ret = critic_jax.compute_gae(
            rewards, values, mask, bootstrap_value=boot, method=method, gamma=0.9
        )
        want_adv, want_ret = references.gae(
            rewards, values, mask, gamma=0.9, lam=0.95, bootstrap_value=boot
        )
        assert adv.shape == ret.shape == shape
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_scan_and_associative_agree_on_long_sequences():
    rng = np.random.default_rng(7)
    shape = (3, 16384)
    rewards = rng.normal(size=shape).astype(np.float32)
    values = rng.normal(size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    fn = jax.jit(critic_jax.compute_gae, static_argnames="method")
    scan = fn(rewards, values, mask, method="scan")
    assoc = fn(rewards, values, mask, method="associative")
    chex.assert_trees_all_close(scan, assoc, rtol=1e-4, atol=1e-4)
    # And both are right, not merely equal: spot-check a row with holes against the loop.
    want_adv, _ = references.gae(rewards[2], values[2], mask[2], gamma=1.0, lam=0.95)
    np.testing.assert_allclose(scan[0][2], want_adv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_parity_with_rlax_on_full_masks(method):
    rng = np.random.default_rng(8)
    shape = (4, 37)
    rewards = rng.normal(size=shape).astype(np.float32)
    values = rng.normal(size=shape).astype(np.float32)
    boot = rng.normal(size=shape[:1]).astype(np.float32)
    gamma, lam = 0.97, 0.9
    # rlax: r_t and discount_t of length T, values of length T + 1 (the bootstrap last).
    rlax_gae = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(0, 0, None, 0))
    want = rlax_gae(
        rewards, jnp.full(shape, gamma), lam, jnp.concatenate([values, boot[:, None]], axis=1)
    )
    adv, ret = jax.jit(
        functools.partial(critic_jax.compute_gae, gamma=gamma, lam=lam, method=method)
    )(rewards, values, np.ones(shape, bool), bootstrap_value=boot)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want + values, rtol=1e-5, atol=1e-5)


def _openrlhf_loop(rewards, values, mask, gamma, lam):
    """The OpenRLHF/TRL loop: zero the masked entries, walk back, next value 0 past the end."""
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[-1]
    last = np.zeros(rewards.shape[:-1])
    advantages = np.zeros_like(rewards)
    for t in reversed(range(length)):
        next_values = values[..., t + 1] if t < length - 1 else 0.0
        delta = rewards[..., t] + gamma * next_values - values[..., t]
        last = delta + gamma * lam * last
        advantages[..., t] = last
    return advantages, advantages + values


@pytest.mark.parametrize("use_jit", [False, True])
def test_parity_with_openrlhf_loop_on_right_padding(use_jit):
    rng = np.random.default_rng(9)
    shape = (6, 19)
    rewards = rng.normal(size=shape)
    values = rng.normal(size=shape)
    mask = references.right_padded_mask(rng, shape)
    want_adv, want_ret = _openrlhf_loop(rewards, values, mask.astype(np.float64), 0.95, 0.9)
    fn = functools.partial(critic_jax.compute_gae, gamma=0.95, lam=0.9)
    fn = jax.jit(fn) if use_jit else fn
    adv, ret = fn(rewards.astype(np.float32), values.astype(np.float32), mask)
    # The framework loop leaves its values at padded positions; both agree on valid tokens.
    np.testing.assert_allclose(adv, want_adv * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret * mask, rtol=1e-5, atol=1e-5)


def test_errors():
    x = jnp.zeros((2, 5))
    gae = critic_jax.compute_gae
    with pytest.raises(ValueError, match=r"Shape mismatch.*`values`.*Received"):
        gae(x, jnp.zeros((2, 6)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`"):
        gae(x, x, jnp.ones((5,)))
    with pytest.raises(ValueError, match=r"`bootstrap_value`.*\(3,\)"):
        gae(x, x, x, bootstrap_value=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`gamma`.*\[0, 1\].*1.5"):
        gae(x, x, x, gamma=1.5)
    with pytest.raises(ValueError, match=r"`lam`.*\[0, 1\]"):
        gae(x, x, x, lam=jnp.float32(-0.1))
    with pytest.raises(ValueError, match=r"'scan', 'associative'.*'loop'"):
        gae(x, x, x, method="loop")
    with pytest.raises(ValueError, match=r"`rewards`.*floating.*int32"):
        gae(jnp.zeros((2, 5), jnp.int32), x, x)
    with pytest.raises(ValueError, match=r"`rewards`.*time axis"):
        gae(jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    with pytest.raises(ValueError, match=r"`gamma`"):
        critic_jax.td_errors(x, x, x, gamma=-1.0)
