"""critic_jax.models.attention against a NumPy float64 reference, forward and gradients."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.models import attention
from critic_jax.models.attention import dot_product_attention

CPU_IMPLEMENTATIONS = ("xla", "xla-flash")


def reference_attention(q, k, v, seg, dout=None):
    """Causal segment attention in float64, and the gradients of sum(out * dout) if given.

    Token t reads key s iff s <= t and seg[s] == seg[t] != 0; rows without a key give 0.
    Returns out [B, T, N, H], or (out, dq, dk, dv).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    seg = np.asarray(seg)
    b, t, n, h = q.shape
    r = n // k.shape[2]
    kr = np.repeat(k, r, axis=2)  # query head i reads kv head i // r
    vr = np.repeat(v, r, axis=2)
    causal = np.tril(np.ones((t, t), bool))
    valid = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
    scale = 1.0 / np.sqrt(h)
    s = np.einsum("btnh,bsnh->bnts", q, kr) * scale
    s = np.where(valid[:, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(valid[:, None], np.exp(s - m), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    out = np.einsum("bnts,bsnh->btnh", p, vr)
    if dout is None:
        return out
    do = np.asarray(dout, np.float64)
    dvr = np.einsum("bnts,btnh->bsnh", p, do)
    dp = np.einsum("btnh,bsnh->bnts", do, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = np.einsum("bnts,bsnh->btnh", ds, kr)
    dkr = np.einsum("bnts,btnh->bsnh", ds, q)
    group = lambda x: x.reshape(b, t, n // r, r, h).sum(3)
    return out, dq, group(dkr), group(dvr)


def _segments(case: str, b: int, t: int) -> np.ndarray:
    seg = np.ones((b, t), np.int32)
    if case == "left_padding":
        for i, pad in enumerate([0, 5, t - 1][:b]):
            seg[i, :pad] = 0
    elif case == "right_padding":
        for i, n_real in enumerate([t, 7, 1][:b]):
            seg[i, n_real:] = 0
    elif case == "holes":
        seg[0, [1, 4, 5, 9]] = 0
        seg[1, :3] = 0
        seg[1, 10:12] = 0
        seg[2, -4:] = 0
    elif case == "packed":
        seg[0, :6], seg[0, 6:15], seg[0, 15:] = 1, 2, 3
        seg[1, :2], seg[1, 2:9], seg[1, 9:12], seg[1, 12:] = 0, 4, 0, 7
        seg[2] = 0  # all padding
    return seg


def _inputs(b, t, n, g, h, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)).astype(dtype)
    k = rng.normal(size=(b, t, g, h)).astype(dtype)
    v = rng.normal(size=(b, t, g, h)).astype(dtype)
    dout = rng.normal(size=(b, t, n, h)).astype(np.float32)
    return q, k, v, dout


def _grads(fn, q, k, v, seg, dout):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * dout)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)[1]


CASES = ("causal", "left_padding", "right_padding", "holes", "packed")


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_matches_reference_forward_and_gradients(implementation, case, num_kv_heads):
    b, t, n, h = 3, 21, 4, 8  # 21 tokens: the last block of 8 is partial
    q, k, v, dout = _inputs(b, t, n, num_kv_heads, h)
    seg = _segments(case, b, t)
    fn = functools.partial(dot_product_attention, implementation=implementation, block_size=8)
    want, *want_grads = reference_attention(q, k, v, seg, dout)
    out = jax.jit(fn)(q, k, v, seg)
    assert out.shape == (b, t, n, h) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    grads = jax.jit(functools.partial(_grads, fn))(q, k, v, seg, dout)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", ["left_padding", "holes", "packed"])
def test_garbage_at_padding_changes_nothing(implementation, case):
    """NaN and inf in q, k and v at padding tokens: the output and the gradients equal the
    reference on inputs zeroed there, and the gradients at padding are 0."""
    b, t, n, h = 3, 21, 4, 8
    q, k, v, dout = _inputs(b, t, n, 2, h, seed=2)
    seg = _segments(case, b, t)
    pad = seg == 0
    clean = [np.where(pad[:, :, None, None], 0, x).astype(np.float32) for x in (q, k, v)]
    garbage = [x.copy() for x in clean]
    for i, x in enumerate(garbage):
        x[pad] = (np.nan, np.inf, -np.inf)[i]
    fn = functools.partial(dot_product_attention, implementation=implementation, block_size=8)
    want, *want_grads = reference_attention(*clean, seg, dout)
    np.testing.assert_allclose(jax.jit(fn)(*garbage, seg), want, rtol=1e-5, atol=1e-5)
    grads = jax.jit(functools.partial(_grads, fn))(*garbage, seg, dout)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        assert np.all(np.asarray(got)[pad] == 0), name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize(("block_size", "use_jit"), [(0, True), (5, True), (128, True), (8, False)])
def test_block_sizes_with_and_without_jit(implementation, block_size, use_jit):
    q, k, v, _ = _inputs(2, 16, 4, 2, 8, seed=1)
    seg = _segments("packed", 3, 16)[:2]
    fn = functools.partial(
        dot_product_attention, implementation=implementation, block_size=block_size
    )
    out = (jax.jit(fn) if use_jit else fn)(q, k, v, seg)
    np.testing.assert_allclose(out, reference_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_flash_skips_blocks_of_other_segments_exactly(layout):
    # Many short blocks: packed runs (whole key blocks of earlier segments are skipped), and
    # ids scattered token by token (a segment with holes spans many blocks).
    b, t, block = 3, 40, 4
    rng = np.random.default_rng(5)
    if layout == "runs":
        seg = np.cumsum(rng.random((b, t)) < 0.15, axis=1).astype(np.int32) + 1
        seg[0, :7] = 0
        seg[1, 30:] = 0
    else:
        seg = rng.integers(0, 4, size=(b, t)).astype(np.int32)
    q, k, v, dout = _inputs(b, t, 4, 2, 8, seed=6)
    fn = functools.partial(dot_product_attention, implementation="xla-flash", block_size=block)
    want, *want_grads = reference_attention(q, k, v, seg, dout)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, seg), want, rtol=1e-5, atol=1e-5)
    grads = jax.jit(functools.partial(_grads, fn))(q, k, v, seg, dout)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("layout", ["aligned_runs", "scattered"])
def test_segment_extents_match_brute_force(layout):
    rng = np.random.default_rng(7)
    nb, b, block = 6, 3, 4
    if layout == "aligned_runs":
        seg = np.repeat([[0, 5, 5, 9, 9, 0], [1, 1, 2, 2, 0, 3], [0, 0, 4, 6, 6, 7]], block, axis=1)
    else:
        seg = rng.integers(0, 3, size=(b, nb * block))
    seg = seg.astype(np.int32)
    lo, hi = attention._segment_extents(jnp.asarray(seg.reshape(b, nb, block).transpose(1, 0, 2)))
    reads = np.zeros((nb, nb), bool)  # query block i reads key block j
    for row in seg:
        for tq in range(nb * block):
            for s in range(tq + 1):
                if row[tq] != 0 and row[s] == row[tq]:
                    reads[tq // block, s // block] = True
    for i in range(nb):
        read = np.flatnonzero(reads[i])
        assert lo[i] == (read.min() if read.size else i + 1), i
        readers = np.flatnonzero(reads[:, i])
        assert hi[i] == (readers.max() + 1 if readers.size else i), i
    if layout == "aligned_runs":
        # The loops skip most earlier key blocks (lo) and later query blocks (hi).
        np.testing.assert_array_equal(lo, [0, 0, 1, 2, 3, 5])
        np.testing.assert_array_equal(hi, [2, 3, 4, 5, 5, 6])


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS + ("auto",))
def test_bfloat16_inputs(implementation):
    b, t, n, g, h = 2, 21, 4, 2, 16
    q, k, v, dout = _inputs(b, t, n, g, h, seed=2)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    seg = _segments("holes", 3, t)[:2]
    fn = functools.partial(dot_product_attention, implementation=implementation, block_size=8)
    f32 = lambda x: np.asarray(x, np.float32)
    want, *want_grads = reference_attention(f32(q), f32(k), f32(v), seg, dout)
    out = jax.jit(fn)(q, k, v, seg)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(out), want, rtol=2e-2, atol=3e-2)
    grads = jax.jit(functools.partial(_grads, fn))(q, k, v, seg, dout)
    for name, got, ref in zip("qkv", grads, want_grads, strict=True):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(f32(got), ref, rtol=5e-2, atol=1e-1, err_msg=name)


def test_padding_queries_give_zero():
    q, k, v, _ = _inputs(3, 21, 4, 2, 8)
    seg = _segments("packed", 3, 21)
    for implementation in CPU_IMPLEMENTATIONS:
        fn = functools.partial(dot_product_attention, implementation=implementation, block_size=8)
        out = jax.jit(fn)(q, k, v, seg)
        np.testing.assert_array_equal(np.asarray(out)[seg == 0], 0.0)


def test_padding_mask_equals_segment_ids_and_bool():
    q, k, v, _ = _inputs(3, 21, 4, 2, 8)
    mask = _segments("left_padding", 3, 21) != 0
    fn = jax.jit(functools.partial(dot_product_attention, implementation="xla-flash"))
    a, b = fn(q, k, v, mask.astype(np.int32)), fn(q, k, v, mask)
    np.testing.assert_array_equal(a, b)


def test_auto_choice():
    choose = attention.choose_implementation
    limit = attention.XLA_MAX_SEQ_LEN
    assert choose("auto", seq_len=limit, dtype=jnp.float32, backend="cpu") == "xla"
    assert choose("auto", seq_len=limit + 1, dtype=jnp.float32, backend="cpu") == "xla-flash"
    assert choose("auto", seq_len=64, dtype=jnp.bfloat16, backend="gpu") == "cudnn"
    assert choose("auto", seq_len=64, dtype=jnp.float32, backend="gpu") == "xla-flash"
    assert choose("auto", seq_len=64, dtype=jnp.float32, backend="tpu") == "splash"
    assert choose("xla", seq_len=10**6, dtype=jnp.float32, backend="tpu") == "xla"


def test_rejects_bad_arguments():
    q, k, v, _ = _inputs(2, 8, 4, 2, 8)
    seg = np.ones((2, 8), np.int32)
    with pytest.raises(ValueError, match="valid: auto, xla, xla-flash, cudnn, splash"):
        dot_product_attention(q, k, v, seg, implementation="flash")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        dot_product_attention(q, k, v, seg, implementation="cudnn")
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(q, k, v, seg[:, :5])
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        dot_product_attention(q[:, :, :3], k, v, seg)
    with pytest.raises(ValueError, match="Shape mismatch"):
        dot_product_attention(q, k, v[:, :4], seg)
    with pytest.raises(ValueError, match="block_size"):
        dot_product_attention(q, k, v, seg, block_size=-1)


def _grad_temp_bytes(implementation, *, b, t, n, h, block_size):
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fn = functools.partial(
        dot_product_attention, implementation=implementation, block_size=block_size
    )
    loss = lambda q, k, v, seg: jnp.sum(fn(q, k, v, seg))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(("implementation", "linear"), [("xla-flash", True), ("xla", False)])
def test_flash_memory_is_linear_in_length(implementation, linear):
    # Compiled only: B=1, T=8192, N=2, H=64. The T x T float32 scores alone are 512 MiB.
    b, t, n, h = 1, 8192, 2, 64
    scores_bytes = b * n * t * t * 4
    block_size = 128 if linear else 1024  # fewer unrolled blocks keep the xla compile short
    temp = _grad_temp_bytes(implementation, b=b, t=t, n=n, h=h, block_size=block_size)
    assert (temp < scores_bytes / 8) == linear, (implementation, temp, scores_bytes)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_reference():
    b, t, n, g, h = 2, 64, 4, 2, 64
    q, k, v, dout = _inputs(b, t, n, g, h, seed=3)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    f32 = lambda x: np.asarray(x, np.float32)
    for case in CASES:
        seg = _segments(case, 3, t)[:b]
        fn = functools.partial(dot_product_attention, implementation="cudnn")
        want, *want_grads = reference_attention(f32(q), f32(k), f32(v), seg, dout)
        np.testing.assert_allclose(f32(jax.jit(fn)(q, k, v, seg)), want, rtol=2e-2, atol=3e-2)
        grads = jax.jit(functools.partial(_grads, fn))(q, k, v, seg, dout)
        for name, got, ref in zip("qkv", grads, want_grads, strict=True):
            np.testing.assert_allclose(f32(got), ref, rtol=5e-2, atol=1e-1, err_msg=name)


_SPLASH_COMPILE = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies
    from critic_jax.models.attention import dot_product_attention

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    results = {}
    fn = lambda q, k, v, seg: dot_product_attention(q, k, v, seg, implementation="splash")
    loss = lambda q, k, v, seg: jnp.sum(fn(q, k, v, seg).astype(jnp.float32))

    def compile_both(q, kv, seg):
        fwd = jax.jit(fn).lower(q, kv, kv, seg).compile()
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        text = bwd.as_text()
        return {
            "pallas_kernel": "tpu_custom_call" in text,
            "all_gathers": text.count("all-gather-start") + text.count(" all-gather("),
            "fwd_temp_bytes": fwd.memory_analysis().temp_size_in_bytes,
            "bwd_temp_bytes": bwd.memory_analysis().temp_size_in_bytes,
        }

    results = {"platform": device.platform}
    for b, t, n, g, h in [(2, 1000, 4, 2, 128), (1, 8192, 4, 1, 64)]:
        spec = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
        q, kv, seg = spec(b, t, n, h), spec(b, t, g, h), spec(b, t, dt=jnp.int32)
        results[f"{b}x{t}x{n}x{g}x{h}"] = compile_both(q, kv, seg)

    # On a 2x2 mesh the kernel runs in a shard_map: batch over "data", kv heads over "tensor".
    mesh = topologies.make_mesh(topo, (2, 2), ("data", "tensor"))
    heads = jax.sharding.NamedSharding(mesh, jax.P("data", None, "tensor"))
    rows = jax.sharding.NamedSharding(mesh, jax.P("data"))
    q = jax.ShapeDtypeStruct((4, 1000, 4, 128), jnp.bfloat16, sharding=heads)
    kv = jax.ShapeDtypeStruct((4, 1000, 2, 128), jnp.bfloat16, sharding=heads)
    seg = jax.ShapeDtypeStruct((4, 1000), jnp.int32, sharding=rows)
    rules = (("batch", "data"), ("kv_heads", "tensor"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        results["mesh_2x2"] = compile_both(q, kv, seg)
    print("RESULT " + json.dumps(results))
    """
)


def test_splash_compiles_for_tpu():
    pytest.importorskip("libtpu")
    # A subprocess: the compile-only TPU client must not touch this process's JAX backends.
    # ALLOW_MULTIPLE_LIBTPU_LOAD: without it libtpu takes /tmp/libtpu_lockfile and any other
    # process loading libtpu at the same time (a parallel test, `critic-jax plan`) aborts.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SPLASH_COMPILE],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    assert results.pop("platform") == "tpu"
    for shape, stats in results.items():
        assert stats["pallas_kernel"], shape
        assert stats["all_gathers"] == 0, shape
    # Linear memory: at T=8192 the bf16 scores of one head alone would be 128 MiB.
    assert results["1x8192x4x1x64"]["bwd_temp_bytes"] < 8192 * 8192 * 2 // 8


def test_flash_under_a_mesh_keeps_the_batch_and_heads_split():
    # 8 fake CPU devices: data=4 x tensor=2, batch and heads split; no gathers, same numbers.
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), (jax.sharding.AxisType.Auto,) * 2)
    q, k, v, dout = _inputs(4, 21, 4, 2, 8, seed=4)
    seg = np.concatenate([_segments("packed", 3, 21), _segments("left_padding", 3, 21)[1:2]])
    heads = jax.sharding.NamedSharding(mesh, jax.P("data", None, "tensor"))
    rows = jax.sharding.NamedSharding(mesh, jax.P("data"))
    fn = functools.partial(dot_product_attention, implementation="xla-flash", block_size=8)
    step = jax.jit(functools.partial(_grads, fn), in_shardings=(heads, heads, heads, rows, heads))
    text = step.lower(q, k, v, seg, dout).compile().as_text()
    assert "all-gather" not in text and "all-to-all" not in text
    _, *want = reference_attention(q, k, v, seg, dout)
    for name, got, ref in zip("qkv", step(q, k, v, seg, dout), want, strict=True):
        assert got.sharding.spec == jax.P("data", None, "tensor"), name
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=name)
