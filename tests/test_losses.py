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
    return references.value_batch(seed, shape, old_scale=0.5, new_scale=0.5, garbage=garbage)


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


def test_value_loss_hyperparameter_and_none_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    loss = critic_jax.value_loss
    with pytest.raises(ValueError, match=r"`clip_eps`.*nan"):
        loss(x, x, x, m, clip_eps=float("nan"))
    for delta in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"`huber_delta`"):
            loss(x, x, x, m, loss_type="huber", huber_delta=delta)
    for name, args in [("values", (None, x, x, m)), ("returns", (x, x, None, m)),
                       ("mask", (x, x, x, None))]:  # fmt: skip
        with pytest.raises(ValueError, match=f"`{name}`.*None"):
            loss(*args)
    with pytest.raises(ValueError, match=r"`old_values`.*None"):
        critic_jax.value_loss(x, None, x, m, clip_eps=0.1)


def test_traced_infinite_huber_delta_is_mse_with_finite_gradient():
    values, old_values, returns, mask = _batch(20)

    def fn(values, delta):
        return critic_jax.value_loss(
            values, old_values, returns, mask, clip_eps=0.2, loss_type="huber", huber_delta=delta
        )

    loss, grad = jax.jit(jax.value_and_grad(fn))(values, jnp.float32(jnp.inf))
    want = references.value_loss(values, old_values, returns, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_time_axis_gives_zero(reduction):
    x = jnp.zeros((3, 0))
    fn = functools.partial(critic_jax.value_loss, clip_eps=0.2, reduction=reduction)
    loss, grad = jax.value_and_grad(fn)(x, x, x, jnp.ones((3, 0), bool))
    assert float(loss) == 0.0 and grad.shape == (3, 0)
    ids = jnp.zeros((3, 0), jnp.int32)
    assert float(fn(x, x, x, jnp.ones((3, 0)), segment_ids=ids)) == 0.0
    assert float(losses.reduction_denominator(jnp.ones((3, 0)), reduction, ids)) == 0.0


def test_clipped_branch_never_picked_by_rounding():
    # old + (v - old) != v in float32 for many of these, yet nothing is clipped.
    rng = np.random.default_rng(21)
    old = rng.normal(scale=0.1, size=(8, 64)).astype(np.float32)
    values = rng.normal(scale=0.1, size=old.shape).astype(np.float32)
    returns = values.copy()  # e = 0: any rounding of vc would make the clipped loss larger
    assert np.mean((old + (values - old)) != values) > 0.2
    mask = np.ones(old.shape, bool)
    got = critic_jax.value_loss(values, old, returns, mask, clip_eps=1.0, reduction="token-mean")
    plain = critic_jax.value_loss(values, None, returns, mask, reduction="token-mean")
    assert float(got) == float(plain)


# ----------------------------------------------------------------------------- packed segments

from critic_jax import losses  # noqa: E402


def _segment_batch(seed, shape=(2, 3, 12)):
    """Random segments: contiguous runs, a non-contiguous id, padding, empty segments."""
    rng = np.random.default_rng(seed)
    values, old_values, returns, _ = _batch(seed, shape=shape, garbage=False)
    rows, length = int(np.prod(shape[:-1])), shape[-1]
    ids = np.zeros((rows, length), np.int32)
    for i in range(rows):
        if i % 5 == 4:
            continue  # a row of padding only
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        ids[i] = np.searchsorted(cuts, np.arange(length), side="right") + 1
        ids[i, rng.integers(length - 2) :] = 0 if i % 2 else ids[i, -1]  # right padding
        if i % 3 == 0:
            ids[i, 0] = ids[i].max()  # the last segment also owns position 0
    mask = rng.random((rows, length)) < 0.7
    mask[1, ids[1] == 1] = False  # a segment without a valid token
    ids, mask = ids.reshape(shape), mask.reshape(shape)
    values, old_values, returns = (
        references.with_garbage(rng, x, mask & (ids != 0)) for x in (values, old_values, returns)
    )
    return values, old_values, returns, mask, ids


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_with_segments_matches_reference(reduction, clip_eps):
    values, old_values, returns, mask, ids = _segment_batch(30 + len(reduction))
    kwargs = dict(clip_eps=clip_eps, reduction=reduction)
    want = references.packed_value_loss(
        values, old_values, returns, mask, segment_ids=ids, **kwargs
    )
    fn = functools.partial(critic_jax.value_loss, **kwargs)
    for f in (fn, jax.jit(fn)):
        got = f(values, old_values, returns, mask, segment_ids=ids)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = jax.grad(fn)(values, old_values, returns, mask, segment_ids=ids)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~(mask & (ids != 0))], 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_segment_per_row_is_the_unsegmented_loss(reduction):
    values, old_values, returns, mask = _batch(40)
    fn = functools.partial(critic_jax.value_loss, clip_eps=0.2, reduction=reduction)
    np.testing.assert_allclose(
        fn(values, old_values, returns, mask, segment_ids=np.ones(SHAPE, np.int32)),
        fn(values, old_values, returns, mask),
        rtol=1e-6,
    )


def _pack(seed, length=10, n=9):
    """n rollouts one per row [n, length] and the same rollouts packed into fewer rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, length // 2 + 2, size=n)
    unpacked = {k: np.zeros((n, length), np.float32) for k in ("v", "old", "ret")}
    unpacked["mask"] = np.zeros((n, length), bool)
    rows, where = [[]], []
    for i, size in enumerate(sizes):
        for k in ("v", "old", "ret"):
            unpacked[k][i, :size] = rng.normal(size=size)
        unpacked["mask"][i, :size] = rng.random(size) < 0.8
        unpacked["mask"][i, 0] = False  # a prompt token: in the segment, not an action
        if sum(sizes[j] for j in rows[-1]) + size > length:
            rows.append([])
        rows[-1].append(i)
    rows.append([])  # a row of padding
    packed = {k: np.full((len(rows), length), np.nan, np.float32) for k in ("v", "old", "ret")}
    packed["mask"] = rng.random((len(rows), length)) < 0.5  # garbage where ids are 0
    packed["ids"] = np.zeros((len(rows), length), np.int32)
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(members):
            stop = start + sizes[i]
            for k in ("v", "old", "ret", "mask"):
                packed[k][r, start:stop] = unpacked[k][i, : sizes[i]]
            packed["ids"][r, start:stop] = s + 1
            where.append((i, r, start, stop))
            start = stop
    for k in ("v", "old", "ret"):
        unpacked[k] = references.with_garbage(rng, unpacked[k], unpacked["mask"])
        packed[k] = references.with_garbage(rng, packed[k], packed["mask"] & (packed["ids"] > 0))
    return unpacked, packed, where, sizes


def _unpack_grad(grad, where, sizes, shape):
    out = np.zeros(shape, np.float32)
    for i, r, start, stop in where:
        out[i, : sizes[i]] = np.asarray(grad)[r, start:stop]
    return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_batch_equals_unpacked_batch(reduction):
    unpacked, packed, where, sizes = _pack(50)
    assert packed["ids"].shape[0] < unpacked["v"].shape[0]  # it really packs
    fn = jax.jit(
        jax.value_and_grad(
            functools.partial(critic_jax.value_loss, clip_eps=0.3, reduction=reduction)
        )
    )
    loss_u, grad_u = fn(unpacked["v"], unpacked["old"], unpacked["ret"], unpacked["mask"])
    loss_p, grad_p = fn(
        packed["v"], packed["old"], packed["ret"], packed["mask"], segment_ids=packed["ids"]
    )
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _unpack_grad(grad_p, where, sizes, grad_u.shape), grad_u, rtol=1e-5, atol=1e-7
    )
    assert np.all(np.isfinite(grad_p))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_packed_hl_gauss_equals_unpacked(reduction):
    unpacked, packed, where, sizes = _pack(51)
    support = np.linspace(-3, 3, 7)
    rng = np.random.default_rng(0)

    def logits_for(shape):
        return rng.normal(size=(*shape, 7)).astype(np.float32)

    logits_u = logits_for(unpacked["v"].shape)
    logits_p = np.full((*packed["v"].shape, 7), np.nan, np.float32)
    for i, r, start, stop in where:
        logits_p[r, start:stop] = logits_u[i, : sizes[i]]
    fn = jax.jit(
        jax.value_and_grad(
            functools.partial(
                critic_jax.hl_gauss_loss, support=support, sigma=0.6, reduction=reduction
            )  # fmt: skip
        )
    )
    loss_u, grad_u = fn(logits_u, unpacked["ret"], unpacked["mask"])
    loss_p, grad_p = fn(logits_p, packed["ret"], packed["mask"], segment_ids=packed["ids"])
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    back = np.zeros_like(grad_u)
    for i, r, start, stop in where:
        back[i, : sizes[i]] = grad_p[r, start:stop]
    np.testing.assert_allclose(back, grad_u, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("packed_rows", [False, True])
def test_micro_batch_scaling_sums_to_the_minibatch_loss(reduction, packed_rows):
    if packed_rows:
        values, old_values, returns, mask, ids = _segment_batch(60, shape=(8, 12))
    else:
        values, old_values, returns, mask = _batch(60, shape=(8, 12))
        ids = None
    mask[4:6] = False  # one micro-batch without a valid token
    fn = functools.partial(critic_jax.value_loss, clip_eps=0.2, reduction=reduction)

    def scaled_sum(values):
        total = losses.reduction_denominator(mask, reduction, ids)
        out = 0.0
        for k in range(4):
            part = slice(2 * k, 2 * k + 2)
            sub_ids = None if ids is None else ids[part]
            micro = losses.reduction_denominator(mask[part], reduction, sub_ids)
            scale = jnp.where(total > 0, micro / total, 0.0)
            out = out + scale * fn(
                values[part], old_values[part], returns[part], mask[part], segment_ids=sub_ids
            )
        return out

    whole, grad = jax.jit(jax.value_and_grad(fn))(
        values, old_values, returns, mask, segment_ids=ids
    )
    split, split_grad = jax.jit(jax.value_and_grad(scaled_sum))(values)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(split_grad, grad, rtol=1e-5, atol=1e-7)


def test_reduction_denominator_counts():
    mask = np.array([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]], bool)
    ids = np.array([[1, 1, 2, 2, 3, 0], [4, 4, 0, 0, 0, 0], [2, 0, 0, 0, 0, 2]], np.int32)
    den = functools.partial(losses.reduction_denominator, mask)
    assert float(den("token-mean")) == 7
    assert float(den("seq-mean-token-mean")) == 2
    assert float(den("seq-mean-token-sum-norm")) == 18
    assert float(den("token-mean", ids)) == 6  # position [0, 5] has id 0
    # Segments with a valid token: row 0 ids 1, 2, 3; row 2 id 2 (non-contiguous).
    assert float(den("seq-mean-token-sum", ids)) == 4
    # Segments: 1, 2, 3 | 4 | 2 -> 5, times T = 6.
    assert float(den("seq-mean-token-sum-norm", ids)) == 30
    assert float(jax.jit(den, static_argnums=0)("seq-mean-token-mean", ids)) == 4


def test_segment_id_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    with pytest.raises(ValueError, match=r"`segment_ids`.*integer"):
        critic_jax.value_loss(x, x, x, m, segment_ids=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Shape mismatch.*`segment_ids`"):
        critic_jax.value_loss(x, x, x, m, segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"'token-mean'.*'sum'"):
        losses.reduction_denominator(m, "sum")
    with pytest.raises(ValueError, match=r"`mask`.*None"):
        losses.reduction_denominator(None, "token-mean")


# ----------------------------------------------------------------------------- HL-Gauss

SUPPORT = np.linspace(-2.0, 2.0, 9)


@pytest.mark.parametrize("sigma", [0.05, 0.375, 3.0])
@pytest.mark.parametrize("use_jit", [False, True])
def test_hl_gauss_probs_match_reference(sigma, use_jit):
    x = np.array([[-4.0, -2.25, -0.1, 0.0], [0.26, 1.0, 2.2, 3.0]], np.float32)
    fn = functools.partial(critic_jax.hl_gauss_probs, support=SUPPORT, sigma=sigma)
    got = (jax.jit(fn) if use_jit else fn)(x)
    assert got.shape == (2, 4, 9) and got.dtype == jnp.float32
    want = references.hl_gauss_probs(x, support=SUPPORT, sigma=sigma)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=1e-6)


def test_hl_gauss_probs_far_outside_the_support_and_low_precision():
    probs = jax.jit(critic_jax.hl_gauss_probs, static_argnames="support")
    x = jnp.asarray([-1e6, -40.0, 40.0, 1e30], jnp.float32)
    got = critic_jax.hl_gauss_probs(x, support=SUPPORT, sigma=0.2)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:2, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(got[2:, -1], 1.0, rtol=1e-6)
    for dtype in (jnp.bfloat16, jnp.float16):
        low = jnp.asarray([0.3, -1.1], dtype)
        got = probs(low, support=tuple(SUPPORT), sigma=0.375)
        assert got.dtype == jnp.float32
        want = references.hl_gauss_probs(np.asarray(low, np.float32), support=SUPPORT, sigma=0.375)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # Traced sigma and gradient with respect to x: finite everywhere.
    grad = jax.jit(
        jax.grad(
            lambda x, s: jnp.sum(critic_jax.hl_gauss_probs(x, support=SUPPORT, sigma=s) * SUPPORT)
        )
    )(jnp.asarray([-1e6, 0.1, 40.0]), 0.2)
    assert np.all(np.isfinite(grad))


def _hl_batch(seed, shape=(2, 3, 6), k=9, garbage=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(*shape, k)).astype(np.float32)
    returns = rng.uniform(-2.6, 2.6, size=shape).astype(np.float32)
    mask = references.mixed_mask(rng, shape)
    if garbage:
        returns = references.with_garbage(rng, returns, mask)
        logits = np.where(
            mask[..., None], logits, references.with_garbage(rng, logits, np.zeros_like(logits))
        )
    return logits, returns, mask


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hl_gauss_loss_matches_reference(reduction):
    logits, returns, mask = _hl_batch(70)
    kwargs = dict(support=SUPPORT, sigma=0.375, reduction=reduction)
    want = references.hl_gauss_loss(logits, returns, mask, **kwargs)
    fn = functools.partial(critic_jax.hl_gauss_loss, **kwargs)
    for f in (fn, jax.jit(fn)):
        got = f(logits, returns, mask)
        assert got.shape == () and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ids = np.where(mask, 1 + (np.arange(6) >= 3), 0).astype(np.int32)
    want = references.hl_gauss_loss(logits, returns, mask, segment_ids=ids, **kwargs)
    np.testing.assert_allclose(jax.jit(fn)(logits, returns, mask, segment_ids=ids), want, rtol=1e-5)


def test_hl_gauss_loss_gradient_is_softmax_minus_target():
    logits, returns, mask = _hl_batch(71)
    fn = functools.partial(critic_jax.hl_gauss_loss, support=SUPPORT, sigma=0.375)
    grad_logits, grad_returns = jax.jit(jax.grad(fn, argnums=(0, 1)))(logits, returns, mask)
    assert np.all(np.isfinite(grad_logits))
    np.testing.assert_array_equal(grad_returns, 0.0)  # a fixed target
    clean = np.where(mask[..., None], logits, 0.0)
    soft = np.exp(clean - clean.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    target = references.hl_gauss_probs(np.where(mask, returns, 0.0), support=SUPPORT, sigma=0.375)
    want = np.where(mask[..., None], soft - target, 0.0) / mask.sum()
    np.testing.assert_allclose(grad_logits, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hl_gauss_loss_empty_mask_and_empty_time_axis(reduction):
    logits, returns, mask = _hl_batch(72)
    empty = np.zeros_like(mask)
    logits = references.with_garbage(np.random.default_rng(1), logits, np.zeros_like(logits))
    returns = references.with_garbage(np.random.default_rng(2), returns, empty)
    fn = functools.partial(critic_jax.hl_gauss_loss, support=SUPPORT, sigma=0.3,
                           reduction=reduction)  # fmt: skip
    loss, grad = jax.jit(jax.value_and_grad(fn))(logits, returns, empty)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    loss, grad = jax.value_and_grad(fn)(jnp.zeros((2, 0, 9)), jnp.zeros((2, 0)), jnp.ones((2, 0)))
    assert float(loss) == 0.0 and grad.shape == (2, 0, 9)


def test_hl_gauss_low_precision_logits():
    logits, returns, mask = _hl_batch(73, garbage=False)
    for dtype in (jnp.bfloat16, jnp.float16):
        low = jnp.asarray(logits, dtype)
        got = critic_jax.hl_gauss_loss(low, returns, mask, support=SUPPORT, sigma=0.4)
        assert got.dtype == jnp.float32
        want = references.hl_gauss_loss(
            np.asarray(low, np.float32), returns, mask, support=SUPPORT, sigma=0.4
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_hl_gauss_errors():
    x, m = jnp.zeros((2, 5)), jnp.ones((2, 5))
    logits = jnp.zeros((2, 5, 9))
    probs = critic_jax.hl_gauss_probs
    with pytest.raises(ValueError, match=r"`support`.*1-D"):
        probs(x, support=np.zeros((3, 3)), sigma=1.0)
    with pytest.raises(ValueError, match=r"`support`.*at least 2"):
        probs(x, support=np.zeros(1), sigma=1.0)
    with pytest.raises(ValueError, match=r"`support`.*increasing"):
        probs(x, support=np.array([0.0, 2.0, 1.0]), sigma=1.0)
    with pytest.raises(ValueError, match=r"`support`.*increasing"):
        probs(x, support=np.array([0.0, 0.0]), sigma=1.0)
    for sigma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"`sigma`"):
            probs(x, support=SUPPORT, sigma=sigma)
    with pytest.raises(ValueError, match=r"`x`.*floating"):
        probs(jnp.zeros(3, jnp.int32), support=SUPPORT, sigma=1.0)
    loss = functools.partial(critic_jax.hl_gauss_loss, support=SUPPORT, sigma=1.0)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`logits`.*\(2, 5, 9\)"):
        loss(jnp.zeros((2, 5, 8)), x, m)
    with pytest.raises(ValueError, match=r"Shape mismatch.*`mask`"):
        loss(logits, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"'token-mean'.*'mean'"):
        loss(logits, x, m, reduction="mean")
    for name, args in [("logits", (None, x, m)), ("returns", (logits, None, m)),
                       ("mask", (logits, x, None))]:  # fmt: skip
        with pytest.raises(ValueError, match=f"`{name}`.*None"):
            loss(*args)
    # A traced support skips the value checks but still works.
    got = jax.jit(lambda s: critic_jax.hl_gauss_loss(logits, x, m, support=s, sigma=1.0))(SUPPORT)
    np.testing.assert_allclose(got, np.log(9.0), rtol=1e-6)


# ----------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from properties import DENSITY, DTYPES, PROPERTY, SEEDS, SHAPES  # noqa: E402


@PROPERTY
@given(
    shape=SHAPES, density=DENSITY, empty_row=st.booleans(), dtype=DTYPES, seed=SEEDS,
    reduction=st.sampled_from(REDUCTIONS), loss_type=st.sampled_from(["mse", "huber"]),
    clip_eps=st.sampled_from([None, 0.0, 0.3]),
)  # fmt: skip
def test_property_value_loss(shape, density, empty_row, dtype, seed, reduction, loss_type,
                             clip_eps):  # fmt: skip
    mask, low, up = references.property_case(
        seed, shape, density, empty_row, dtype, ("values", "old", "returns")
    )
    kwargs = dict(clip_eps=clip_eps, loss_type=loss_type, huber_delta=0.7, reduction=reduction)
    fn = functools.partial(critic_jax.value_loss, **kwargs)
    loss, grad = jax.value_and_grad(fn)(low["values"], low["old"], low["returns"], mask)
    assert loss.dtype == jnp.float32
    want = references.value_loss(up["values"], up["old"], up["returns"], mask, **kwargs)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    np.testing.assert_array_equal(np.asarray(grad, np.float32)[~mask], 0.0)


@settings(PROPERTY, max_examples=15)
@given(
    shape=SHAPES, density=DENSITY, empty_row=st.booleans(), dtype=DTYPES, seed=SEEDS,
    reduction=st.sampled_from(REDUCTIONS), sigma=st.sampled_from([0.1, 0.75, 4.0]),
)  # fmt: skip
def test_property_hl_gauss(shape, density, empty_row, dtype, seed, reduction, sigma):
    mask, low, up = references.property_case(seed, shape, density, empty_row, dtype, ("returns",))
    support = np.linspace(-2.0, 2.0, 5)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, 5)).astype(np.float32)
    logits[~mask] = np.nan
    logits = logits.astype(low["returns"].dtype)
    probs = critic_jax.hl_gauss_probs(
        np.where(mask, low["returns"], 0).astype(low["returns"].dtype), support=support, sigma=sigma
    )
    assert probs.shape == (*shape, 5) and probs.dtype == jnp.float32
    assert np.all(np.asarray(probs) >= 0)
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-5)
    kwargs = dict(support=support, sigma=sigma, reduction=reduction)
    fn = functools.partial(critic_jax.hl_gauss_loss, **kwargs)
    loss, grad = jax.value_and_grad(fn)(logits, low["returns"], mask)
    want = references.hl_gauss_loss(logits.astype(np.float32), up["returns"], mask, **kwargs)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    np.testing.assert_array_equal(np.asarray(grad, np.float32)[~mask], 0.0)
