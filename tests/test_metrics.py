"""value_metrics and explained_variance against the NumPy loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

import critic_jax

SHAPE = (2, 3, 9)


def _batch(seed, shape=SHAPE, garbage=True):
    rng = np.random.default_rng(seed)
    returns = rng.normal(size=shape).astype(np.float32)
    old_values = returns + rng.normal(scale=1.0, size=shape).astype(np.float32)
    values = old_values + rng.normal(scale=0.3, size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    if garbage:
        values, old_values, returns = (
            references.with_garbage(rng, x, mask) for x in (values, old_values, returns)
        )
    return values, old_values, returns, mask


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("use_jit", [False, True])
def test_value_metrics_match_reference(clip_eps, use_jit):
    batch = _batch(0)
    fn = functools.partial(critic_jax.value_metrics, clip_eps=clip_eps)
    got = (jax.jit(fn) if use_jit else fn)(*batch)
    with np.errstate(invalid="ignore", over="ignore"):
        want = references.value_metrics(*batch, clip_eps=clip_eps)
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key].shape == () and got[key].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    if clip_eps is not None:
        assert 0.0 < float(got["clipfrac"]) < 1.0  # the inputs do exercise clipping


@pytest.mark.parametrize("use_jit", [False, True])
def test_explained_variance_matches_reference(use_jit):
    values, _, returns, mask = _batch(1)
    fn = jax.jit(critic_jax.explained_variance) if use_jit else critic_jax.explained_variance
    want = references.explained_variance(values, returns, mask)
    np.testing.assert_allclose(fn(values, returns, mask), want, rtol=1e-5, atol=1e-6)
    # Perfect and constant predictions: 1 and 0.
    np.testing.assert_allclose(fn(returns, returns, mask), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fn(np.full_like(returns, 5.0), returns, mask), 0.0, atol=1e-6)


def test_explained_variance_is_finite_on_degenerate_inputs():
    values, _, _, mask = _batch(2, garbage=False)
    ev = jax.jit(critic_jax.explained_variance)
    constant = np.full(SHAPE, 0.1, np.float32)  # constant returns: no variance to explain
    assert float(ev(values, constant, mask)) == 0.0
    assert float(ev(values, values, np.zeros(SHAPE, bool))) == 0.0
    one = np.zeros(SHAPE, bool)
    one[0, 0, 0] = True
    assert float(ev(values, values + 1.0, one)) == 0.0
    tiny = np.zeros(SHAPE, np.float32)
    tiny[0, 0, 0] = 1e-30  # variance underflows; a huge residual must not give -inf or NaN
    assert np.isfinite(float(ev(np.full(SHAPE, 1e4, np.float32), tiny, mask)))


def test_value_metrics_on_empty_mask_are_zero():
    batch = _batch(3)[:3]
    got = critic_jax.value_metrics(*batch, np.zeros(SHAPE, bool), clip_eps=0.2)
    for key, value in got.items():
        assert float(value) == 0.0, key


def test_errors():
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`returns`.*Received"):
        critic_jax.explained_variance(x, jnp.zeros((2, 4)), x)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`old_values`"):
        critic_jax.value_metrics(x, jnp.zeros((1, 5)), x, x)
    with pytest.raises(ValueError, match=r"`values`.*floating"):
        critic_jax.explained_variance(jnp.zeros((2, 5), jnp.int32), x, x)
