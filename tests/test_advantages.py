"""compute_gae, td_errors, decoupled_gae and length_adaptive_lam against the NumPy loops, rlax
and the OpenRLHF/TRL loop."""

import functools

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
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
def test_gae_for_several_batch_widths(shape):
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


# ----------------------------------------------------------------- per-row γ / λ and packing

PACKED = (6, 17)  # rows x T of the packed batches below


def _packed(seed, rows=PACKED[0], length=PACKED[1]):
    """Packed rows with garbage at every masked or padding position; a few padding positions
    (id 0) are marked valid in `mask` and must still be skipped."""
    rng = np.random.default_rng(seed)
    mask, ids = references.packed_mask_and_ids(rng, rows, length)
    mask = mask | ((ids == 0) & (rng.random(mask.shape) < 0.3))
    ignored = mask & (ids != 0)
    rewards = references.with_garbage(rng, rng.normal(size=mask.shape).astype(np.float32), ignored)
    values = references.with_garbage(rng, rng.normal(size=mask.shape).astype(np.float32), ignored)
    row_boot = rng.normal(size=rows).astype(np.float32)
    # Per-segment bootstrap: garbage everywhere but at each segment's last position.
    seg_boot = rng.normal(size=mask.shape).astype(np.float32)
    last = np.zeros(mask.shape, bool)
    for i in range(rows):
        for positions in references._segment_positions(ids[i]).values():
            last[i, positions[-1]] = True
    seg_boot = references.with_garbage(rng, seg_boot, last)
    gamma = rng.uniform(0.5, 1.0, size=rows).astype(np.float32)
    lam = rng.uniform(0.0, 1.0, size=rows).astype(np.float32)
    lam[0], lam[1] = 0.0, 1.0
    return rewards, values, mask, ids, row_boot, seg_boot, gamma, lam


def _close(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scan", "associative"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_gae_per_row_gamma_and_lam_match_reference(method, use_jit):
    rewards, values, mask, boot = _batch(11)
    rng = np.random.default_rng(11)
    gamma = rng.uniform(0.0, 1.0, size=SHAPE[:-1]).astype(np.float32)
    lam = rng.uniform(0.0, 1.0, size=SHAPE[:-1]).astype(np.float32)
    fn = functools.partial(critic_jax.compute_gae, method=method, bootstrap_value=boot)
    fn = jax.jit(fn) if use_jit else fn
    for g, lm in ((gamma, lam), (gamma, 0.9), (0.8, lam)):
        want = references.segmented_gae(
            rewards, values, mask, gamma=g, lam=lm, bootstrap_value=boot
        )
        _close(fn(rewards, values, mask, gamma=g, lam=lm), want)


def test_per_row_gamma_never_broadcasts_along_time():
    # With B == T a [B] gamma could also broadcast along time; it must mean one value per row.
    rng = np.random.default_rng(12)
    rewards, values = rng.normal(size=(2, 5, 5)).astype(np.float32)
    mask = rng.random((5, 5)) < 0.8
    gamma = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
    lam = gamma[::-1].copy()
    want = references.segmented_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for method in ("scan", "associative"):
        got = critic_jax.compute_gae(rewards, values, mask, gamma=gamma, lam=lam, method=method)
        _close(got, want)
    want_td = references.segmented_gae(rewards, values, mask, gamma=gamma, lam=0.0)[0]
    np.testing.assert_allclose(
        critic_jax.td_errors(rewards, values, mask, gamma=gamma), want_td, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("method", ["scan", "associative"])
@pytest.mark.parametrize("use_jit", [False, True])
def test_gae_segments_match_reference(method, use_jit):
    rewards, values, mask, ids, row_boot, seg_boot, gamma, lam = _packed(13)
    fn = functools.partial(critic_jax.compute_gae, method=method)
    fn = jax.jit(fn) if use_jit else fn
    cases = [
        (b, g, lm) for b in (None, row_boot, seg_boot) for g, lm in ((0.9, 0.95), (gamma, lam))
    ]
    for boot, g, lm in cases if use_jit else cases[-1:]:  # eager: the compilations dominate
        want = references.segmented_gae(
            rewards, values, mask, gamma=g, lam=lm, bootstrap_value=boot, segment_ids=ids
        )
        got = fn(rewards, values, mask, gamma=g, lam=lm, bootstrap_value=boot, segment_ids=ids)
        _close(got, want)
        assert np.all(np.asarray(got[0])[ids == 0] == 0)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_packed_row_equals_each_rollout_alone(method):
    rng = np.random.default_rng(14)
    gamma, lam = 0.95, 0.9
    gae = jax.jit(functools.partial(critic_jax.compute_gae, gamma=gamma, lam=lam, method=method))
    rollouts = []
    for kind in ("holes", "full", "empty", "one", "holes"):
        n = int(rng.integers(1, 7))
        m = {
            "holes": rng.random(n) < 0.6,
            "full": np.ones(n, bool),
            "empty": np.zeros(n, bool),
            "one": np.arange(n) == n - 1,
        }[kind]
        r = references.with_garbage(rng, rng.normal(size=n).astype(np.float32), m)
        v = references.with_garbage(rng, rng.normal(size=n).astype(np.float32), m)
        rollouts.append((r, v, m, np.float32(rng.normal())))
    pad = 3
    length = sum(len(r) for r, *_ in rollouts) + pad
    rewards = np.full(length, np.nan, np.float32)
    values = np.full(length, np.inf, np.float32)
    mask = np.ones(length, bool)  # padding marked valid: segment id 0 must win
    ids = np.zeros(length, np.int32)
    seg_boot = np.full(length, np.nan, np.float32)
    t = 0
    for s, (r, v, m, b) in enumerate(rollouts, start=1):
        n = len(r)
        rewards[t : t + n], values[t : t + n], mask[t : t + n], ids[t : t + n] = r, v, m, s
        seg_boot[t + n - 1] = b
        t += n
    for boot in (None, seg_boot):
        adv, ret = gae(rewards, values, mask, segment_ids=ids, bootstrap_value=boot)
        t = 0
        for r, v, m, b in rollouts:
            n = len(r)
            alone = gae(r, v, m, bootstrap_value=None if boot is None else b)
            np.testing.assert_allclose(adv[t : t + n], alone[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ret[t : t + n], alone[1], rtol=1e-6, atol=1e-6)
            t += n
        np.testing.assert_array_equal(adv[t:], 0.0)
        np.testing.assert_array_equal(ret[t:], 0.0)
    # A row-wide bootstrap follows the row's last segment only.
    row_boot = np.float32(2.5)
    adv, _ = gae(rewards, values, mask, segment_ids=ids, bootstrap_value=row_boot)
    r, v, m, _ = rollouts[-1]
    want, _ = gae(r, v, m, bootstrap_value=row_boot)
    np.testing.assert_allclose(adv[length - pad - len(r) : length - pad], want, rtol=1e-6)
    r, v, m, _ = rollouts[0]
    np.testing.assert_allclose(adv[: len(r)], gae(r, v, m)[0], rtol=1e-6, atol=1e-6)


def test_padding_inside_a_segment_is_skipped_like_a_hole():
    # Ids [1, 1, 0, 1, 1] are ONE rollout with a hole, not two rollouts.
    rng = np.random.default_rng(15)
    rewards, values = rng.normal(size=(2, 2, 5)).astype(np.float32)
    ids = np.array([[1, 1, 0, 1, 1], [1, 1, 0, 2, 2]], np.int32)
    mask = np.ones((2, 5), bool)
    adv, _ = critic_jax.compute_gae(rewards, values, mask, gamma=0.9, lam=0.8, segment_ids=ids)
    hole = mask & (ids != 0)
    want, _ = references.gae(rewards, values, hole, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv[0], want[0], rtol=1e-5, atol=1e-6)
    want, _ = references.segmented_gae(rewards, values, mask, gamma=0.9, lam=0.8, segment_ids=ids)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_jit", [False, True])
def test_td_errors_with_segments_and_per_row_gamma(use_jit):
    rewards, values, mask, ids, row_boot, seg_boot, gamma, _ = _packed(16)
    fn = jax.jit(critic_jax.td_errors) if use_jit else critic_jax.td_errors
    for boot in (row_boot, seg_boot):
        want, _ = references.segmented_gae(
            rewards, values, mask, gamma=gamma, lam=0.0, bootstrap_value=boot, segment_ids=ids
        )
        got = fn(rewards, values, mask, gamma=gamma, bootstrap_value=boot, segment_ids=ids)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_decoupled_gae_matches_reference_and_two_gae_calls(use_jit):
    rewards, values, mask, ids, row_boot, seg_boot, gamma, lam = _packed(17)
    fn = jax.jit(critic_jax.decoupled_gae) if use_jit else critic_jax.decoupled_gae
    cases = (
        dict(),  # defaults: γ = 1, value λ = 1, policy λ = 0.95
        dict(gamma=gamma, value_lam=lam, policy_lam=0.9, bootstrap_value=row_boot),
        dict(gamma=0.99, value_lam=1.0, policy_lam=lam, bootstrap_value=seg_boot),
    )
    for kw in cases:
        kw = {"segment_ids": ids, **kw}
        got = fn(rewards, values, mask, **kw)
        want = references.decoupled_gae(
            rewards,
            values,
            mask,
            gamma=kw.get("gamma", 1.0),
            value_lam=kw.get("value_lam", 1.0),
            policy_lam=kw.get("policy_lam", 0.95),
            bootstrap_value=kw.get("bootstrap_value"),
            segment_ids=ids,
        )
        _close(got, want)
        common = {k: kw[k] for k in ("gamma", "bootstrap_value", "segment_ids") if k in kw}
        adv, _ = critic_jax.compute_gae(
            rewards, values, mask, lam=kw.get("policy_lam", 0.95), **common
        )
        _, ret = critic_jax.compute_gae(
            rewards, values, mask, lam=kw.get("value_lam", 1.0), **common
        )
        chex.assert_trees_all_close(got, (adv, ret), rtol=1e-6, atol=1e-6)
    # And without packing, on the mixed masks.
    rewards, values, mask, boot = _batch(18)
    got = fn(rewards, values, mask, gamma=0.9, bootstrap_value=boot)
    want = references.decoupled_gae(
        rewards, values, mask, gamma=0.9, value_lam=1.0, policy_lam=0.95, bootstrap_value=boot
    )
    _close(got, want)


@pytest.mark.parametrize("use_jit", [False, True])
def test_length_adaptive_lam_matches_reference(use_jit):
    rng = np.random.default_rng(19)
    mask = references.mixed_mask(rng, (2, 6, 41))  # includes empty rows and single tokens
    fn = jax.jit(critic_jax.length_adaptive_lam) if use_jit else critic_jax.length_adaptive_lam
    for alpha in (0.05, 0.5, 1e3):
        got = fn(mask.astype(np.uint8) * 7, alpha=alpha)
        want = references.length_adaptive_lam(mask, alpha=alpha)
        assert got.shape == (2, 6) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(fn(mask))[~mask.any(-1)] == 0)
    # Traced alpha, and the λ's plug straight into GAE as per-row values.
    lams = jax.jit(jax.vmap(lambda a: critic_jax.length_adaptive_lam(mask, alpha=a)))(
        jnp.array([0.05, 0.2])
    )
    np.testing.assert_allclose(
        lams[1], references.length_adaptive_lam(mask, alpha=0.2), rtol=1e-6, atol=1e-7
    )
    rewards, values = rng.normal(size=(2, *mask.shape)).astype(np.float32)
    lam = critic_jax.length_adaptive_lam(mask)
    want = references.segmented_gae(rewards, values, mask, gamma=1.0, lam=np.asarray(lam))
    _close(critic_jax.compute_gae(rewards, values, mask, lam=lam), want)
    assert critic_jax.length_adaptive_lam(np.zeros((3, 0))).shape == (3,)


def test_vmap_over_gamma_with_per_row_lam_and_segments():
    rewards, values, mask, ids, _, seg_boot, gamma, lam = _packed(20)

    @jax.jit
    def sweep(gammas):
        def one(g):
            return critic_jax.compute_gae(
                rewards, values, mask, gamma=g, lam=lam, segment_ids=ids, bootstrap_value=seg_boot
            )

        return jax.vmap(one)(gammas)

    scalars = jnp.array([0.0, 0.5, 1.0], jnp.float32)
    per_row = jnp.stack([jnp.asarray(gamma), jnp.asarray(gamma[::-1])])
    for gammas in (scalars, per_row):
        advs, rets = sweep(gammas)
        for g, adv, ret in zip(np.asarray(gammas), advs, rets, strict=True):
            want = references.segmented_gae(
                rewards, values, mask, gamma=g, lam=lam, segment_ids=ids, bootstrap_value=seg_boot
            )
            _close((adv, ret), want)


@pytest.mark.parametrize("method", ["scan", "associative"])
def test_packed_outputs_carry_no_gradient_and_ignore_garbage(method):
    rewards, values, mask, ids, _, seg_boot, gamma, lam = _packed(21)

    def loss(rewards, values, boot, gamma, lam):
        adv, ret = critic_jax.compute_gae(
            rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=boot,
            segment_ids=ids, method=method,
        )  # fmt: skip
        p_adv, v_ret = critic_jax.decoupled_gae(
            rewards, values, mask, gamma=gamma, policy_lam=lam, segment_ids=ids
        )
        return jnp.sum(adv) + jnp.sum(ret) + jnp.sum(p_adv) + jnp.sum(v_ret)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(
        rewards, values, seg_boot, gamma, lam
    )
    assert np.isfinite(value)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_empty_time_axis_and_all_padding():
    for fn in (critic_jax.compute_gae, critic_jax.decoupled_gae):
        x = jnp.zeros((3, 0))
        out = fn(x, x, x, segment_ids=jnp.zeros((3, 0), jnp.int32), gamma=jnp.ones(3) * 0.5)
        assert all(o.shape == (3, 0) and o.dtype == jnp.float32 for o in out)
    rewards, values, mask, _ = _batch(22)
    ids = np.zeros(SHAPE, np.int32)
    for method in ("scan", "associative"):
        adv, ret = critic_jax.compute_gae(
            rewards, values, np.ones(SHAPE), segment_ids=ids, bootstrap_value=1.0, method=method
        )
        np.testing.assert_array_equal(adv, 0.0)
        np.testing.assert_array_equal(ret, 0.0)


@st.composite
def _packed_case(draw):
    lead = draw(st.sampled_from([(1,), (3,), (2, 2)]))
    length = draw(st.integers(0, 9))
    shape = (*lead, length)
    elems = st.floats(-4, 4, width=32)
    rewards = draw(hnp.arrays(np.float32, shape, elements=elems))
    values = draw(hnp.arrays(np.float32, shape, elements=elems))
    mask = draw(hnp.arrays(np.bool_, shape))
    # Segment ids: non-decreasing runs with padding (0) anywhere; some rows unpacked.
    starts = draw(hnp.arrays(np.bool_, shape))
    ids = np.cumsum(starts, axis=-1).astype(np.int32) + 1
    ids = np.where(draw(hnp.arrays(np.bool_, shape)) & (ids % 2 == 0), 0, ids)
    unit = st.floats(0, 1, width=32)
    gamma = draw(st.one_of(unit, hnp.arrays(np.float32, lead, elements=unit)))
    lam = draw(st.one_of(unit, hnp.arrays(np.float32, lead, elements=unit)))
    boot = draw(st.sampled_from([None, "row", "segment"] if length else [None, "row"]))
    if boot == "row":
        boot = draw(hnp.arrays(np.float32, lead, elements=elems))
    elif boot == "segment":
        boot = draw(hnp.arrays(np.float32, shape, elements=elems))
    use_ids = draw(st.booleans())
    return rewards, values, mask, ids if use_ids else None, gamma, lam, boot


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(_packed_case())
def test_property_gae_matches_reference_for_any_packing(case):
    rewards, values, mask, ids, gamma, lam, boot = case
    if ids is None and boot is not None and np.shape(boot) == rewards.shape:
        boot = boot[..., -1]
    want = references.segmented_gae(
        rewards, values, mask, gamma=gamma, lam=lam, bootstrap_value=boot, segment_ids=ids
    )
    kw = dict(gamma=gamma, lam=lam, bootstrap_value=boot, segment_ids=ids)
    for method in ("scan", "associative"):
        got = critic_jax.compute_gae(rewards, values, mask, method=method, **kw)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    p_adv, v_ret = critic_jax.decoupled_gae(
        rewards, values, mask, gamma=gamma, policy_lam=lam, value_lam=1.0,
        bootstrap_value=boot, segment_ids=ids,
    )  # fmt: skip
    np.testing.assert_allclose(p_adv, want[0], rtol=1e-4, atol=1e-4)


def test_new_argument_errors():
    x = jnp.zeros((2, 5))
    gae = critic_jax.compute_gae
    with pytest.raises(ValueError, match=r"`gamma`.*\(2,\).*\(5,\)"):
        gae(x, x, x, gamma=jnp.full((5,), 0.9))  # a [T] gamma for a [B, T] batch, B != T
    with pytest.raises(ValueError, match=r"`lam`.*\(2, 5\)"):
        gae(x, x, x, lam=jnp.full((2, 5), 0.9))
    with pytest.raises(ValueError, match=r"`lam`.*\(2,\).*\(2, 1\)"):
        gae(x, x, x, lam=jnp.full((2, 1), 0.9))
    with pytest.raises(ValueError, match=r"`gamma`.*\[0, 1\]"):
        gae(x, x, x, gamma=np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match=r"`gamma`.*\[0, 1\]"):
        gae(x, x, x, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"`lam`.*\[0, 1\]"):
        gae(x, x, x, lam=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer.*float32"):
        gae(x, x, x, segment_ids=x)
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer.*bool"):
        gae(x, x, x, segment_ids=x > 0)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`segment_ids`"):
        gae(x, x, x, segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"`bootstrap_value`.*segment_ids"):
        gae(x, x, x, bootstrap_value=x)
    with pytest.raises(ValueError, match=r"`bootstrap_value`.*\(2, 4\)"):
        gae(x, x, x, bootstrap_value=jnp.zeros((2, 4)), segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"`gamma`.*\(3,\)"):
        critic_jax.td_errors(x, x, x, gamma=jnp.full((3,), 0.5))
    dec = critic_jax.decoupled_gae
    with pytest.raises(ValueError, match=r"`value_lam`.*\[0, 1\]"):
        dec(x, x, x, value_lam=1.2)
    with pytest.raises(ValueError, match=r"`policy_lam`.*\(5,\)"):
        dec(x, x, x, policy_lam=jnp.full((5,), 0.9))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`"):
        dec(x, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer"):
        dec(x, x, x, segment_ids=x)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`alpha`.*> 0"):
            critic_jax.length_adaptive_lam(x, alpha=alpha)
    with pytest.raises(ValueError, match=r"`mask`.*time axis"):
        critic_jax.length_adaptive_lam(jnp.ones(()))
