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
    return references.value_batch(seed, shape, old_scale=1.0, new_scale=0.3, garbage=garbage)


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


def test_clipfrac_ignores_float_rounding_of_the_clipped_values():
    # |values - old| is inside the clip range everywhere, but old + (values - old) != values
    # in float32 for many tokens; with returns = values the old count took each such token.
    rng = np.random.default_rng(10)
    old = rng.normal(scale=0.1, size=(16, 64)).astype(np.float32)
    values = rng.normal(scale=0.1, size=old.shape).astype(np.float32)
    mask = np.ones(old.shape, bool)
    assert np.all(np.abs(values - old) < 1.0)
    vc = old + np.clip(values - old, -1.0, 1.0)
    assert np.mean(vc != values) > 0.2  # the data does hit the rounding
    got = jax.jit(functools.partial(critic_jax.value_metrics, clip_eps=1.0))(
        values, old, values, mask
    )
    want = references.value_metrics(values, old, values, mask, clip_eps=1.0)
    assert want["clipfrac"] == 0.0
    assert float(got["clipfrac"]) == 0.0
    # Really clipped tokens still count: returns far below, values above the range.
    far = values + 0.5
    got = critic_jax.value_metrics(far, values, values - 10.0, mask, clip_eps=0.3)
    assert float(got["clipfrac"]) == 0.0  # clipping moves vc towards the returns: smaller loss
    got = critic_jax.value_metrics(far, values, values + 10.0, mask, clip_eps=0.3)
    assert float(got["clipfrac"]) == 1.0


def test_value_metrics_hyperparameter_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    for clip_eps in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"`clip_eps`"):
            critic_jax.value_metrics(x, x, x, m, clip_eps=clip_eps)
        with pytest.raises(ValueError, match=r"`clip_eps`"):
            critic_jax.value_loss(x, x, x, m, clip_eps=clip_eps)
    assert float(critic_jax.value_metrics(x, x, x, m, clip_eps=float("inf"))["clipfrac"]) == 0.0


def test_none_arrays_are_named():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    cases = [
        (critic_jax.explained_variance, (None, x, m), "values"),
        (critic_jax.explained_variance, (x, None, m), "returns"),
        (critic_jax.explained_variance, (x, x, None), "mask"),
        (critic_jax.value_metrics, (x, None, x, m), "old_values"),
        (critic_jax.value_metrics, (x, x, x, None), "mask"),
        (metrics.value_error_metrics, (x, None, m), "true_values"),
        (metrics.advantage_metrics, (None, x, m), "advantages"),
        (metrics.advantage_metrics, (x, x, None), "mask"),
    ]
    for fn, args, name in cases:
        with pytest.raises(ValueError, match=f"`{name}`.*None"):
            fn(*args)


def test_empty_time_axis():
    x, m = jnp.zeros((3, 0)), jnp.ones((3, 0), bool)
    assert float(critic_jax.explained_variance(x, x, m)) == 0.0
    for key, value in critic_jax.value_metrics(x, x, x, m, clip_eps=0.2).items():
        assert float(value) == 0.0, key
    for key, value in jax.jit(metrics.value_error_metrics)(x, x, m).items():
        assert float(value) == 0.0, key
    for key, value in metrics.advantage_metrics(x, x, m).items():
        assert float(value) == 0.0, key


# ----------------------------------------------------------------------------- against the truth

from critic_jax import metrics  # noqa: E402


def _truth_batch(seed, shape=(12, 7), ties=False):
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=shape).astype(np.float32)
    estimate = truth + rng.normal(scale=0.7, size=shape).astype(np.float32)
    if ties:  # average ranks matter: few distinct values
        truth, estimate = np.round(truth), np.round(estimate * 2) / 2
    mask = references.mixed_mask(rng, shape)
    mask[:, 2] = False
    mask[:2, 2] = True  # a column with 2 valid tokens: no rank correlation there
    truth, estimate = (references.with_garbage(rng, x, mask) for x in (truth, estimate))
    return estimate, truth, mask


@pytest.mark.parametrize("use_jit", [False, True])
def test_value_error_metrics_match_reference(use_jit):
    values, true_values, mask = _truth_batch(20)
    fn = jax.jit(metrics.value_error_metrics) if use_jit else metrics.value_error_metrics
    got = fn(values, true_values, mask)
    want = references.value_error_metrics(values, true_values, mask)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].shape == () and got[key].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_advantage_metrics_match_reference(ties, use_jit):
    adv, true_adv, mask = _truth_batch(21 + ties, shape=(3, 5, 8), ties=ties)
    fn = functools.partial(metrics.advantage_metrics, sign_threshold=0.05)
    got = (jax.jit(fn) if use_jit else fn)(adv, true_adv, mask)
    want = references.advantage_metrics(adv, true_adv, mask, sign_threshold=0.05)
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key].shape == () and got[key].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0.2 < float(got["advantage_rank_correlation"]) < 1.0


def test_truth_metrics_on_perfect_and_degenerate_estimates():
    adv, true_adv, mask = _truth_batch(23, shape=(10, 6))
    clean = np.where(mask, true_adv, 0.0).astype(np.float32)
    got = metrics.advantage_metrics(clean, clean, mask)
    assert float(got["advantage_error_vs_true"]) == 0.0
    np.testing.assert_allclose(got["advantage_sign_agreement"], 1.0)
    np.testing.assert_allclose(got["advantage_rank_correlation"], 1.0, rtol=1e-6)
    got = metrics.advantage_metrics(-clean, clean, mask)
    assert float(got["advantage_sign_agreement"]) == 0.0
    np.testing.assert_allclose(got["advantage_rank_correlation"], -1.0, rtol=1e-6)
    got = metrics.value_error_metrics(clean, clean, mask)
    assert float(got["relative_value_error"]) == 0.0
    # Constant truth, one valid token, an empty mask: finite, never NaN.
    const = np.full(clean.shape, 2.0, np.float32)
    got = metrics.value_error_metrics(const + 0.5, const, mask)
    np.testing.assert_allclose(got["relative_value_error"], 0.5)  # falls back to the RMSE
    assert float(got["true_value_std"]) == 0.0
    got = metrics.advantage_metrics(clean, const, mask)
    assert float(got["advantage_rank_correlation"]) == 0.0  # A* constant in every column
    for empty in (np.zeros_like(mask), np.zeros((10, 0), bool)):
        for fn in (metrics.value_error_metrics, metrics.advantage_metrics):
            shape = empty.shape
            for key, value in fn(adv[:, : shape[1]], true_adv[:, : shape[1]], empty).items():
                assert float(value) == 0.0, key
    # Scale invariance of the sign threshold: it is relative to std(A*).
    a = metrics.advantage_metrics(adv, true_adv, mask, sign_threshold=0.5)
    adv, true_adv = (np.where(mask, x, 0.0) for x in (adv, true_adv))
    b = metrics.advantage_metrics(adv * 1e3, true_adv * 1e3, mask, sign_threshold=0.5)
    np.testing.assert_allclose(a["advantage_sign_agreement"], b["advantage_sign_agreement"])


def test_truth_metric_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`true_values`"):
        metrics.value_error_metrics(x, jnp.zeros((2, 4)), m)
    with pytest.raises(ValueError, match=r"`true_advantages`.*floating"):
        metrics.advantage_metrics(x, jnp.zeros((2, 5), jnp.int32), m)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`sign_threshold`"):
            metrics.advantage_metrics(x, x, m, sign_threshold=bad)


# ----------------------------------------------------------------------------- properties

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from properties import DENSITY, DTYPES, PROPERTY, SEEDS, SHAPES  # noqa: E402


@PROPERTY
@given(
    shape=SHAPES, density=DENSITY, empty_row=st.booleans(), dtype=DTYPES, seed=SEEDS,
    clip_eps=st.sampled_from([None, 0.0, 0.3]),
)  # fmt: skip
def test_property_value_metrics_and_explained_variance(shape, density, empty_row, dtype, seed,
                                                       clip_eps):  # fmt: skip
    mask, low, up = references.property_case(
        seed, shape, density, empty_row, dtype, ("values", "old", "returns")
    )
    got = critic_jax.value_metrics(
        low["values"], low["old"], low["returns"], mask, clip_eps=clip_eps
    )
    with np.errstate(invalid="ignore", over="ignore"):
        want = references.value_metrics(up["values"], up["old"], up["returns"], mask,
                                        clip_eps=clip_eps)  # fmt: skip
    for key, value in want.items():
        assert got[key].dtype == jnp.float32 and np.isfinite(float(got[key])), key
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)

    def ev(values):
        return critic_jax.explained_variance(values, low["returns"], mask)

    value, grad = jax.value_and_grad(ev)(up["values"])
    np.testing.assert_allclose(value, want["explained_variance"], rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


@PROPERTY
@given(shape=SHAPES, density=DENSITY, empty_row=st.booleans(), dtype=DTYPES, seed=SEEDS)
def test_property_truth_metrics(shape, density, empty_row, dtype, seed):
    mask, low, up = references.property_case(seed, shape, density, empty_row, dtype, ("a", "b"))
    got = metrics.value_error_metrics(low["a"], low["b"], mask)
    got.update(metrics.advantage_metrics(low["a"], low["b"], mask))
    want = references.value_error_metrics(up["a"], up["b"], mask)
    want.update(references.advantage_metrics(up["a"], up["b"], mask))
    for key, value in want.items():
        assert got[key].dtype == jnp.float32 and np.isfinite(float(got[key])), key
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
