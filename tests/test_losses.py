"""value_loss against the NumPy loop: values, gradients, empty masks, dtypes and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

import critic_jax

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SHAPE = (2, 3, 9)


def _batch(seed, shape=SHAPE, garbage=True):
    rng = np.random.default_rng(seed)
    returns = rng.normal(size=shape).astype(np.float32)
    old_values = returns + rng.normal(scale=0.5, size=shape).astype(np.float32)
    values = old_values + rng.normal(scale=0.5, size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    if garbage:
        values, old_values, returns = (
            references.with_garbage(rng, x, mask) for x in (values, old_values, returns)
        )
    return values, old_values, returns, mask


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", ["mse", "huber"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_reference(reduction, loss_type, clip_eps):
    batch = _batch(len(reduction))
    kwargs = dict(clip_eps=clip_eps, loss_type=loss_type, huber_delta=0.3, reduction=reduction)
    want = references.value_loss(*batch, **kwargs)
    fn = functools.partial(critic_jax.value_loss, **kwargs)
    for f in (fn, jax.jit(fn)):
        got = f(*batch)
        assert got.shape == () and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type,clip_eps", [("mse", None), ("mse", 0.2), ("huber", 0.2)])
def test_value_loss_gradient_matches_finite_differences(reduction, loss_type, clip_eps):
    values, old_values, returns, mask = _batch(11, shape=(3, 6))
    kwargs = dict(clip_eps=clip_eps, loss_type=loss_type, huber_delta=0.3, reduction=reduction)
    grad = jax.jit(jax.grad(functools.partial(critic_jax.value_loss, **kwargs)))(
        values, old_values, returns, mask
    )
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
    # Central differences of the float64 reference at every valid position.
    h = 1e-6
    want = np.zeros(values.shape)
    base = values.astype(np.float64)
    for idx in zip(*np.nonzero(mask), strict=True):
        up, down = base.copy(), base.copy()
        up[idx] += h
        down[idx] -= h
        want[idx] = (
            references.value_loss(up, old_values, returns, mask, **kwargs)
            - references.value_loss(down, old_values, returns, mask, **kwargs)
        ) / (2 * h)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_empty_mask_gives_zero_loss_and_zero_gradient(reduction):
    values, old_values, returns, _ = _batch(12)
    mask = np.zeros(SHAPE, bool)
    values, old_values, returns = (
        references.with_garbage(np.random.default_rng(0), x, mask)
        for x in (values, old_values, returns)
    )
    fn = functools.partial(critic_jax.value_loss, clip_eps=0.2, reduction=reduction)
    loss, grad = jax.jit(jax.value_and_grad(fn))(values, old_values, returns, mask)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(SHAPE))


def test_empty_rows_do_not_dilute_the_sequence_mean():
    values, old_values, returns, mask = _batch(13, shape=(4, 7), garbage=False)
    mask[1] = False
    keep = [0, 2, 3]
    for reduction in ("seq-mean-token-mean", "seq-mean-token-sum"):
        full = critic_jax.value_loss(values, old_values, returns, mask, reduction=reduction)
        kept = critic_jax.value_loss(
            values[keep], old_values[keep], returns[keep], mask[keep], reduction=reduction
        )
        np.testing.assert_allclose(full, kept, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    batch = _batch(14, garbage=False)
    low = [jnp.asarray(x, dtype) for x in batch[:3]]
    got = jax.jit(functools.partial(critic_jax.value_loss, clip_eps=0.1))(*low, batch[3])
    assert got.dtype == jnp.float32
    want = references.value_loss(
        *[np.asarray(x.astype(jnp.float32)) for x in low], batch[3], clip_eps=0.1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    loss = critic_jax.value_loss
    with pytest.raises(ValueError, match=r"Shape mismatch.*`returns`.*Received"):
        loss(x, x, jnp.zeros((2, 4)), m)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`"):
        loss(x, x, x, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match=r"'token-mean'.*'seq-mean-token-sum-norm'.*'mean'"):
        loss(x, x, x, m, reduction="mean")
    with pytest.raises(ValueError, match=r"'mse', 'huber'.*'l1'"):
        loss(x, x, x, m, loss_type="l1")
    with pytest.raises(ValueError, match=r"`clip_eps`.*-0.1"):
        loss(x, x, x, m, clip_eps=-0.1)
    with pytest.raises(ValueError, match=r"`huber_delta`"):
        loss(x, x, x, m, loss_type="huber", huber_delta=0.0)
    with pytest.raises(ValueError, match=r"`old_values`"):
        loss(x, None, x, m, clip_eps=0.2)
    with pytest.raises(ValueError, match=r"`values`.*floating"):
        loss(jnp.zeros((2, 5), jnp.int32), x, x, m)
    # Without clipping, old_values may be omitted.
    np.testing.assert_allclose(loss(x + 1.0, None, x, m), 0.5)
