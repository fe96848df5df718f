"""masked_mean / masked_var / masked_whiten against the NumPy loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

import critic_jax

SHAPE = (2, 3, 8)


def _batch(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=2.0, size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    return references.with_garbage(rng, x, mask), mask


@pytest.mark.parametrize("axis", [None, -1, 0])
@pytest.mark.parametrize("use_jit", [False, True])
def test_mean_and_var_match_reference(axis, use_jit):
    x, mask = _batch(0)
    wrap = jax.jit if use_jit else (lambda f: f)
    mean = wrap(functools.partial(critic_jax.masked_mean, axis=axis))(x, mask)
    np.testing.assert_allclose(mean, references.masked_mean(x, mask, axis), rtol=1e-6, atol=1e-6)
    assert mean.dtype == jnp.float32
    for unbiased in (True, False):
        var = wrap(functools.partial(critic_jax.masked_var, axis=axis, unbiased=unbiased))(x, mask)
        want = references.masked_var(x, mask, axis, unbiased)
        np.testing.assert_allclose(var, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("use_jit", [False, True])
def test_whiten_matches_reference(shift_mean, use_jit):
    x, mask = _batch(1)
    fn = functools.partial(critic_jax.masked_whiten, shift_mean=shift_mean)
    got = (jax.jit(fn) if use_jit else fn)(x, mask)
    want = references.masked_whiten(x, mask, shift_mean=shift_mean)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got.dtype == jnp.float32
    if shift_mean:  # unit (unbiased) variance and zero mean over the valid entries
        np.testing.assert_allclose(references.masked_var(got, mask), 1.0, rtol=1e-5)
        np.testing.assert_allclose(references.masked_mean(got, mask), 0.0, atol=1e-6)


def test_fewer_than_two_valid_entries_give_finite_zero_variance():
    x, _ = _batch(2, shape=(3, 4))
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True  # row 0: empty, row 1: one entry, row 2: empty
    mask[2] = True
    var = critic_jax.masked_var(x, mask, axis=-1)
    np.testing.assert_array_equal(np.asarray(var)[:2], 0.0)
    np.testing.assert_array_equal(critic_jax.masked_var(x, mask, axis=-1, unbiased=False)[:2], 0.0)
    np.testing.assert_array_equal(critic_jax.masked_mean(x, np.zeros_like(mask)), 0.0)
    np.testing.assert_array_equal(critic_jax.masked_whiten(x, np.zeros_like(mask)), 0.0)
    one = np.zeros_like(mask)
    one[1, 2] = True
    np.testing.assert_allclose(
        critic_jax.masked_whiten(x, one, shift_mean=False), np.where(one, x, 0.0)
    )


def test_gradients_are_finite_and_zero_at_masked_positions():
    x, mask = _batch(3)

    def total(x):
        return (
            critic_jax.masked_mean(x, mask)
            + critic_jax.masked_var(x, mask, axis=-1).sum()
            + (critic_jax.masked_whiten(x, mask) * jnp.arange(x.size).reshape(x.shape)).sum()
        )

    grad = jax.jit(jax.grad(total))(x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    empty = np.zeros_like(mask)
    np.testing.assert_array_equal(jax.grad(lambda x: critic_jax.masked_var(x, empty))(x), 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_and_broadcast_numeric_mask(dtype):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4, 6)), dtype)
    mask = (rng.random(6) < 0.5).astype(np.int32) * 7  # broadcast over the rows
    got = jax.jit(critic_jax.masked_var)(x, mask)
    assert got.dtype == jnp.float32
    full = np.broadcast_to(mask, (4, 6))
    want = references.masked_var(np.asarray(x.astype(jnp.float32)), full)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`.*Received"):
        critic_jax.masked_mean(jnp.zeros((2, 5)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"`x`.*floating"):
        critic_jax.masked_var(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Shape mismatch"):
        critic_jax.masked_whiten(jnp.zeros((2, 5)), jnp.ones((3, 5)))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_with_zero_eps_and_zero_variance_is_finite(shift_mean):
    x = np.full((3, 4), 2.5, np.float32)
    mask = np.ones((3, 4), bool)
    fn = functools.partial(critic_jax.masked_whiten, shift_mean=shift_mean, eps=0.0)
    got, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, mask) ** 2))(x)
    want = 0.0 if shift_mean else 2.5  # only centred: there is no scale to divide by
    np.testing.assert_allclose(fn(x, mask), np.full((3, 4), want, np.float32))
    assert np.isfinite(float(got)) and np.all(np.isfinite(grad))
    # One valid entry: the unbiased variance is 0 by definition.
    one = np.zeros((3, 4), bool)
    one[1, 1] = True
    assert np.all(np.isfinite(jax.jit(fn)(x, one)))
    # eps = 0 on spread data is plain whitening.
    y, m = _batch(5)
    got = critic_jax.masked_whiten(y, m, shift_mean=shift_mean, eps=0.0)
    want = references.masked_whiten(y, m, shift_mean=shift_mean, eps=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_whiten_eps_errors_and_none_arrays():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    for eps in (-1e-8, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`eps`"):
            critic_jax.masked_whiten(x, m, eps=eps)
    for fn in (critic_jax.masked_mean, critic_jax.masked_var, critic_jax.masked_whiten):
        with pytest.raises(ValueError, match=r"`x`.*None"):
            fn(None, m)
        with pytest.raises(ValueError, match=r"`mask`.*None"):
            fn(x, None)
    # A traced eps is allowed (a sweep may vmap it).
    got = jax.vmap(lambda e: critic_jax.masked_whiten(x + jnp.arange(5.0), m, eps=e))(
        jnp.array([0.0, 1e-8])
    )
    assert got.shape == (2, 2, 5) and np.all(np.isfinite(got))


def test_empty_arrays():
    for shape in [(3, 0), (0,), (0, 4)]:
        x, m = jnp.zeros(shape), jnp.ones(shape, bool)
        assert float(critic_jax.masked_mean(x, m)) == 0.0
        assert float(critic_jax.masked_var(x, m)) == 0.0
        assert critic_jax.masked_whiten(x, m).shape == shape
        assert critic_jax.masked_mean(x, m, axis=-1).shape == shape[:-1]
        assert np.all(np.asarray(critic_jax.masked_var(x, m, axis=-1)) == 0.0)


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
    axis=st.sampled_from([None, -1, 0]),
    shift_mean=st.booleans(),
)
def test_property_masked_statistics(shape, density, empty_row, dtype, seed, axis, shift_mean):
    mask, low, up = references.property_case(seed, shape, density, empty_row, dtype, ("x",))
    x, x32 = low["x"], up["x"]
    mean = critic_jax.masked_mean(x, mask, axis=axis)
    np.testing.assert_allclose(mean, references.masked_mean(x32, mask, axis), rtol=1e-5, atol=1e-6)
    for unbiased in (True, False):
        var = critic_jax.masked_var(x, mask, axis=axis, unbiased=unbiased)
        want = references.masked_var(x32, mask, axis, unbiased)
        np.testing.assert_allclose(var, want, rtol=1e-4, atol=1e-6)
    whiten = critic_jax.masked_whiten(x, mask, shift_mean=shift_mean)
    want = references.masked_whiten(x32, mask, shift_mean=shift_mean)
    np.testing.assert_allclose(whiten, want, rtol=1e-4, atol=1e-4)

    def total(x):
        weights = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
        return (
            jnp.sum(critic_jax.masked_mean(x, mask, axis=axis))
            + jnp.sum(critic_jax.masked_var(x, mask, axis=axis))
            + jnp.sum(critic_jax.masked_whiten(x, mask, shift_mean=shift_mean) * weights)
        )

    grad = np.asarray(jax.grad(total)(x), np.float32)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~mask], 0.0)
