"""A cross-product pass over the model / numerics options for real sizes, at tiny shapes.

Options: `remat` (none, full, dots, attention-out) x `layer_loop` (auto, scan, unroll) x
`attention` (xla, xla-flash) x `attention_block_size` (0, 1, 7, 16, > T), on padded (left, right,
holes) and packed (monotone and non-monotone ids) rows with T not a multiple of the block; the
compute / storage dtypes; micro-batching of the update; edge shapes (T = 1, 2, one real token, no
real token, MQA, MHA, head_dim 2). Options that must compute the same numbers are compared with
each other on real tokens (values and the gradient of a loss over them); all nine dtype pairs are
traced for the dtypes of the values, head, final norm, loss and gradients, and a subset trains
through `train.run` (or is refused up front).

Each option pair is covered by a representative subset rather than the full product (see the
comment above `EQUIVALENT`). The tests under "found bugs" failed before the fixes of 2026-12-01
(init_from kept the checkpoint's numerics, xla-flash padded rows to a longer block, x64 mode);
each docstring says why.
"""

import dataclasses
import functools
import tempfile

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax import update as update_lib
from critic_jax.config import PPOConfig, TrainConfig
from critic_jax.data import DataConfig
from critic_jax.models import Critic, ModelConfig
from critic_jax.models.attention import dot_product_attention
from critic_jax.models.hf import critic_to_hf

VOCAB = 64
DTYPES = ("float32", "bfloat16", "float16")


def _model_config(**overrides) -> ModelConfig:
    """Width 32, 2 layers, 4 query heads over 2 kv heads of 8, q/k/v bias, a random head; the
    reference numerics (no remat, written-out layers, one block of XLA attention)."""
    fields = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        qkv_bias=True,
        value_head_init="normal",
        remat="none",
        layer_loop="unroll",
        attention="xla",
        attention_block_size=0,
    )
    return ModelConfig.tiny(**{**fields, **overrides})


def _graphdef(config: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def _random_params(config: ModelConfig, seed: int = 0, scale: float = 0.3):
    """Random numpy parameters (no initialiser compiled); the head is random, so the trunk has a
    gradient."""
    abstract = nnx.state(nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, scale, x.shape), x.dtype), abstract)


@functools.cache
def _value_and_grad(graphdef):
    """jit of (params, tokens, seg, weights) -> ((Σ over real tokens of w·V, V), gradient)."""

    def loss(params, tokens, seg, weights):
        values = nnx.merge(graphdef, params)(tokens, seg != 0, segment_ids=seg)
        return jnp.sum(jnp.where(seg != 0, values * weights, 0.0)), values

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run_model(config: ModelConfig, params, tokens, seg, weights):
    (loss, values), grads = _value_and_grad(_graphdef(config))(params, tokens, seg, weights)
    return jax.device_get((loss, values, grads))


def _assert_same(got, want, seg, *, rtol=1e-5):
    """Values equal on real tokens and finite everywhere; gradients equal up to float rounding
    relative to the largest gradient entry (entries that are 0 mathematically carry noise)."""
    (_, got_v, got_g), (_, want_v, want_g) = got, want
    real = np.asarray(seg) != 0
    assert np.all(np.isfinite(got_v)), "non-finite values (padding included)"
    scale_v = max(float(np.abs(want_v[real]).max()), 1e-6) if real.any() else 1.0
    np.testing.assert_allclose(got_v[real], want_v[real], rtol=rtol, atol=rtol * scale_v)
    for g in jax.tree.leaves(got_g):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), "non-finite gradient"
    scale_g = max(float(np.abs(np.asarray(g, np.float32)).max()) for g in jax.tree.leaves(want_g))
    chex.assert_trees_all_close(got_g, want_g, rtol=10 * rtol, atol=10 * rtol * max(scale_g, 1e-6))


# ----------------------------------------------------------------------------- 1. equivalence

T_EQUIV = 20  # a multiple of neither 7 nor 16


def _mixed_rows(seed: int = 1):
    """[6, 20] tokens, segment ids and loss weights: left padding, right padding, holes, a packed
    row with monotone ids and trailing padding, a packed row whose ids come back (1, 2, 1), and a
    row with one real token."""
    t = T_EQUIV
    seg = np.ones((6, t), np.int32)
    seg[0, :7] = 0
    seg[1, -5:] = 0
    seg[2, [1, 9, 10, 18]] = 0
    seg[3] = [1] * 6 + [2] * 7 + [3] * 5 + [0] * 2
    seg[4] = [1, 1, 2, 2, 1, 1, 0, 3, 3, 3, 0, 2, 2, 4, 4, 4, 4, 1, 0, 5]
    seg[5] = 0
    seg[5, 11] = 1
    rng = np.random.default_rng(seed)
    tokens = np.where(seg != 0, rng.integers(1, VOCAB, seg.shape), 0).astype(np.int32)
    weights = rng.normal(size=seg.shape).astype(np.float32)
    return tokens, seg, weights


@pytest.fixture(scope="module")
def reference():
    config = _model_config()
    params = _random_params(config)
    tokens, seg, weights = _mixed_rows()
    return params, (tokens, seg, weights), _run_model(config, params, tokens, seg, weights)


# (remat, layer_loop, attention, attention_block_size). `layer_loop="auto"` is "unroll" without
# remat and "scan" with it (at 2 layers), so the distinct remat x loop paths are (none, scan),
# (none, unroll), (X, scan) and (X, unroll) for each remat X: each is here once (two through
# "auto"), and so is every attention x block pair (block > T: 100) but XLA's block 1 (one
# attention per query in the graph, slow to compile at T = 20: covered by the edge shapes);
# each remat and each loop meet both kernels. The reference is (none, unroll, xla, 0).
EQUIVALENT = [
    ("none", "scan", "xla-flash", 16),
    ("none", "auto", "xla-flash", 0),
    ("full", "scan", "xla", 7),
    ("full", "unroll", "xla-flash", 100),
    ("dots", "auto", "xla", 100),
    ("dots", "unroll", "xla-flash", 7),
    ("attention-out", "scan", "xla-flash", 1),
    ("attention-out", "unroll", "xla", 16),
]


@pytest.mark.parametrize("remat, loop, attention, block", EQUIVALENT, ids=str)
def test_options_give_the_same_values_and_gradients(reference, remat, loop, attention, block):
    params, (tokens, seg, weights), want = reference
    config = _model_config(
        remat=remat, layer_loop=loop, attention=attention, attention_block_size=block
    )
    _assert_same(_run_model(config, params, tokens, seg, weights), want, seg)


def test_reference_is_not_trivial(reference):
    """The compared numbers carry information: nonzero values on real tokens (0 at each
    segment's first token) and a nonzero gradient in every trunk matrix but those that are
    mathematically 0."""
    _, (_, seg, _), (_, values, grads) = reference
    real = seg != 0
    assert np.abs(values[real]).max() > 0.1
    assert values[5, 11] == 0  # the one real token of row 5: the first of its sequence
    for name in ("embed",):
        assert np.abs(grads["backbone"][name][...]).max() > 1e-3
    for name in ("q", "k", "v", "o"):
        assert np.abs(grads["backbone"]["layers"]["attn"][name][...]).max() > 1e-4


# ----------------------------------------------------------------------------- 2. dtypes


@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_head_norm_and_loss_stay_float32(dtype, param_dtype):
    """Traced only (nothing compiled): with any compute / storage dtype the values, the final
    norm's output and the loss are float32, the head's product runs in float32, the block
    matmuls in the compute dtype, and each gradient has its parameter's dtype."""
    config = _model_config(
        dtype=dtype, param_dtype=param_dtype, remat="dots", layer_loop="scan", attention="xla-flash"
    )
    graphdef = _graphdef(config)
    params = _random_params(config)
    tokens, seg, weights = _mixed_rows()
    fn = _value_and_grad.__wrapped__(graphdef)
    (loss, values), grads = jax.eval_shape(fn, params, tokens, seg, weights)
    assert loss.dtype == values.dtype == jnp.float32
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.dtype == p.dtype == jnp.dtype(param_dtype)
    hidden = jax.eval_shape(lambda p: nnx.merge(graphdef, p).backbone(tokens, seg != 0), params)
    assert hidden.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens, seg != 0))(params)
    dots = helpers.dot_generals(jaxpr.jaxpr)
    head = [e for e in dots if e.invars[1].aval.shape == (config.d_model, 1)]
    assert len(head) == 1
    assert {v.aval.dtype for v in head[0].invars} == {jnp.dtype(jnp.float32)}
    assert any(e.invars[0].aval.dtype == jnp.dtype(dtype) for e in dots if e not in head)


def test_hl_gauss_logits_and_values_stay_float32():
    config = _model_config(dtype="float16", param_dtype="bfloat16", value_head="hl-gauss")
    graphdef = _graphdef(config)
    params = _random_params(config)
    tokens, seg, _ = _mixed_rows()
    logits, values = jax.eval_shape(
        lambda p: nnx.merge(graphdef, p).logits_and_values(tokens, seg != 0, segment_ids=seg),
        params,
    )
    assert logits.dtype == values.dtype == jnp.float32


def test_bfloat16_compute_is_close_to_float32(reference):
    """bf16 compute with float32 master weights (flash attention, full remat, scanned layers):
    finite, and close to float32 (loosely)."""
    params, (tokens, seg, weights), (_, want_v, want_g) = reference
    config = _model_config(
        dtype="bfloat16",
        remat="full",
        layer_loop="scan",
        attention="xla-flash",
        attention_block_size=7,
    )
    _, values, grads = _run_model(config, params, tokens, seg, weights)
    real = seg != 0
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[real], want_v[real], atol=0.03 * np.abs(want_v[real]).max())
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_g))
    chex.assert_trees_all_close(grads, want_g, rtol=0.05, atol=0.03 * scale)


_RUNS: dict = {}


def _train_run(tmp_root, dtype: str, param_dtype: str, ppo=None, **options):
    """One `train.run` of 3 iterations of `tiny_config` (1 layer, width 32, no checkpoint
    before the last), cached by its arguments: (config, summary or exception, iterations run)."""
    key = repr((dtype, param_dtype, ppo, sorted(options.items())))
    if key not in _RUNS:
        config = helpers.tiny_config(tempfile.mkdtemp(dir=tmp_root), steps=3, layers=1, mlp_dim=64)
        model = dataclasses.replace(config.model, dtype=dtype, param_dtype=param_dtype, **options)
        config = dataclasses.replace(
            config,
            model=model,
            ppo=dataclasses.replace(config.ppo, **(ppo or {})),
            checkpoint=dataclasses.replace(config.checkpoint, every=0),
        )
        done = []
        hooks = train_lib.Hooks(on_iteration=lambda i, m, s: done.append(i))
        try:
            _RUNS[key] = (config, train_lib.run(config, hooks), len(done))
        except Exception as e:  # noqa: BLE001 - reported by the test
            _RUNS[key] = (config, e, len(done))
    return _RUNS[key]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


FLASH_SCAN = dict(remat="full", layer_loop="scan", attention="xla-flash", attention_block_size=7)
# (dtype, param_dtype, options): every compute and every storage dtype at least once, the
# other options through the trainer (micro-batches, remat, the layer loops, both kernels).
TRAIN_RUNS = {
    "bf16-compute": ("bfloat16", "float32", dict(**FLASH_SCAN, ppo=dict(micro_batches=2))),
    "fp16-compute-bf16-params": (
        "float16",
        "bfloat16",
        dict(remat="dots", attention="xla", attention_block_size=5),
    ),
    "fp16-params": ("float32", "float16", dict()),
}


@pytest.mark.parametrize("case", list(TRAIN_RUNS))
def test_dtype_pairs_train_to_finite_numbers_or_are_refused_up_front(run_root, case):
    """Either refused before the first iteration with a one-line ValueError (an unsupported
    combination: float16 parameters, whose AdamW moments cannot hold eps), or trained with a
    finite loss, finite evaluated values and no skipped update."""
    dtype, param_dtype, options = TRAIN_RUNS[case]
    config, summary, iterations = _train_run(run_root, dtype, param_dtype, **options)
    if isinstance(summary, ValueError) and iterations == 0 and "\n" not in str(summary):
        assert param_dtype == "float16", summary  # the only combination refused
        return
    assert not isinstance(summary, Exception), f"{type(summary).__name__}: {summary}"
    assert iterations == 3
    assert np.isfinite(summary["final_loss"])
    assert np.isfinite(summary["relative_value_error"])  # computed from the values
    assert summary["skipped_updates"] == 0


# ----------------------------------------------------------------------------- 3. micro-batches

ROWS, T_MB = 8, 19


def _update_batch(packed: bool, seed: int = 0) -> dict:
    """[8, 19] minibatch with old values and returns: padded rows (left and right) or packed
    rows of three rollouts and trailing padding."""
    rng = np.random.default_rng(seed)
    seg = np.ones((ROWS, T_MB), np.int32)
    for r in range(ROWS):
        if packed:
            a, b = sorted(rng.choice(np.arange(1, T_MB), 2, replace=False))
            seg[r, a:b], seg[r, b:] = 2, 3
            seg[r, T_MB - rng.integers(0, 3) :] = 0
        else:
            left = rng.integers(0, 3)
            seg[r, :left], seg[r, rng.integers(left + 1, T_MB + 1) :] = 0, 0
    mask = (seg != 0) & (rng.random(seg.shape) < 0.7)
    batch = {
        "tokens": np.where(seg != 0, rng.integers(1, VOCAB, seg.shape), 0).astype(np.int32),
        "attention_mask": (seg != 0).astype(np.int32),
        "mask": mask.astype(np.float32),
        "old_values": 0.1 * rng.normal(size=seg.shape).astype(np.float32),
        "returns": rng.normal(size=seg.shape).astype(np.float32),
    }
    if packed:
        batch["segment_ids"] = seg
    return batch


def _accumulated(model: ModelConfig, micro: int, reduction: str, params, batch: dict):
    """`update.accumulate_gradients` as the trainer binds it (its apply function, the default
    loss of `model` and `split_layers`) on one device."""
    config = TrainConfig(
        model=model,
        ppo=PPOConfig(minibatch_size=ROWS, micro_batches=micro, reduction=reduction),
        data=dataclasses.replace(DataConfig(), batch_size=ROWS),
    )
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
    fn = functools.partial(
        update_lib.accumulate_gradients,
        apply_fn=update_lib.make_apply_fn(_graphdef(model), mesh),
        loss_fn=train_lib.default_loss_fn(config),
        ppo=config.ppo,
        mesh=mesh,
        split_layers=model.unrolled,
    )
    with train_lib.mesh_context(mesh):
        return jax.device_get(jax.jit(fn)(params, parallel.make_global_batch(batch, mesh)))


# Written-out layers with remat: the micro-batch loop slices the stacked layers once
# (`split_layers`); HL-Gauss loss, packed rows, the per-sequence reduction. (Padded rows, the other
# reductions and the scanned loop gave the same gradient in the probes; `test_update.py` covers
# padded rows under every reduction with the default options.)
@pytest.mark.parametrize(
    "options, packed, reduction",
    [
        (
            dict(
                remat="full",
                layer_loop="unroll",
                attention="xla-flash",
                attention_block_size=7,
                value_head="hl-gauss",
                value_bins=11,
            ),
            True,
            "seq-mean-token-mean",
        ),
    ],
    ids=["unroll-full-flash-hlgauss-packed"],
)
def test_micro_batches_give_the_same_gradient(options, packed, reduction):
    model = _model_config(vocab_size=VOCAB, **options)
    params = _random_params(model, seed=2, scale=0.2)
    batch = _update_batch(packed)
    g1, loss1, v1 = _accumulated(model, 1, reduction, params, batch)
    g4, loss4, v4 = _accumulated(model, 4, reduction, params, batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    real = batch["attention_mask"] != 0
    np.testing.assert_allclose(v4[real], v1[real], rtol=1e-5, atol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
    chex.assert_trees_all_close(g4, g1, rtol=1e-4, atol=1e-5 * scale)
    assert float(np.abs(g1["backbone"]["embed"][...]).max()) > 1e-4 * scale  # the trunk learns


# ----------------------------------------------------------------------------- 4. edge shapes


def _edge_rows(t, rows, real):
    rng = np.random.default_rng(t)
    seg = np.asarray(real, np.int32).reshape(rows, t)
    tokens = np.where(seg != 0, rng.integers(1, VOCAB, seg.shape), 0).astype(np.int32)
    return tokens, seg, rng.normal(size=seg.shape).astype(np.float32)


_HOLES = np.ones((3, 9), np.int32)
_HOLES[0, :3], _HOLES[1, -3:], _HOLES[2, [2, 5]] = 0, 0, 0
_ONE = np.zeros((3, 9), np.int32)
_ONE[1, 4] = 1
_XLA_1 = dict(remat="dots", layer_loop="unroll", attention="xla", attention_block_size=1)
_FLASH_1 = dict(remat="full", layer_loop="scan", attention="xla-flash", attention_block_size=1)
_FLASH_4 = dict(
    remat="attention-out", layer_loop="scan", attention="xla-flash", attention_block_size=4
)
# case: (shape fields, (T, rows, real tokens), the options compared with the reference's). Cases
# of one shape and options share their compilations.
EDGES = {
    "T=1": (dict(), (1, 3, [1, 1, 1]), _FLASH_1),
    "T=2": (dict(), (2, 3, [[1, 1], [0, 1], [1, 0]]), _XLA_1),
    "one-real-token-in-the-batch": (dict(), (9, 3, _ONE), _FLASH_4),
    "no-real-token": (dict(), (9, 3, np.zeros((3, 9))), _FLASH_4),
    "mqa": (dict(num_kv_heads=1), (9, 3, _HOLES), _FLASH_4),
    "mha": (dict(num_kv_heads=4), (9, 3, _HOLES), _FLASH_1),
    "head_dim=2": (dict(num_heads=2, num_kv_heads=1, head_dim=2), (9, 3, _HOLES), _FLASH_4),
}


@pytest.mark.parametrize("case", list(EDGES))
def test_edge_shapes_agree_across_options(case):
    shape, (t, rows, real), options = EDGES[case]
    base = _model_config(num_layers=1, **shape)
    params = _random_params(base, seed=3)
    tokens, seg, weights = _edge_rows(t, rows, real)
    want = _run_model(base, params, tokens, seg, weights)
    _assert_same(
        _run_model(dataclasses.replace(base, **options), params, tokens, seg, weights), want, seg
    )
    _, values, grads = want
    for r in range(rows):  # the first real token of a row is the first of its sequence
        first = np.flatnonzero(seg[r])
        if first.size:
            assert values[r, first[0]] == 0
    if not (seg != 0).any():  # nothing to learn from: a zero gradient, not NaN
        assert all(not np.any(g) for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- found bugs


def test_flash_block_larger_than_the_sequence_is_clamped():
    """`attention_block_size` above T must cost what one block of T costs ("0 means one block
    of T; the result is the same either way"). The XLA path clamps; the flash path pads every
    row up to the block: at T = 32 the default block of 128 costs 16x the score FLOPs, a block
    of 1024 about 1000x (and 0.5 GiB of temporaries). On GPU, `auto` takes this path for float32
    inputs, and the synthetic MRP's rows are 32 tokens."""
    b, t, n, g, h = 2, 32, 4, 2, 16
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, g, h), jnp.float32)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def flops(block):
        fn = functools.partial(dot_product_attention, implementation="xla-flash", block_size=block)
        cost = jax.jit(fn).lower(q, kv, kv, seg).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return cost["flops"]

    one_block = flops(0)
    assert flops(128) <= 1.5 * one_block
    assert flops(1024) <= 1.5 * one_block


def test_flash_attention_runs_with_64_bit_mode():
    """Under `jax_enable_x64` the flash path's loop bounds mix int32 (`_segment_extents`) and
    int64 (`jnp.arange(nb)`): fori_loop raises TypeError. The XLA path runs."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    kv = rng.normal(size=(1, 5, 1, 4)).astype(np.float32)
    seg = np.ones((1, 5), np.int32)

    def attend(implementation):
        fn = functools.partial(dot_product_attention, implementation=implementation, block_size=2)
        return jax.jit(fn)(q, kv, kv, seg)

    with jax.enable_x64(True):
        want = attend("xla")
        got = attend("xla-flash")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


NUMERICS = dict(
    dtype="bfloat16",
    param_dtype="float32",
    remat="full",
    attention="xla-flash",
    attention_block_size=16,
    layer_loop="scan",
)


def test_init_from_a_hugging_face_checkpoint_keeps_the_numerics_options(tmp_path):
    """`--init-from HF_DIR`: config.json replaces the architecture; the numerics options the
    user set must survive. `resolve_config` passes only dtype, param_dtype and remat, so the
    attention kernel, its block size and the layer loop fall back to their defaults."""
    config = helpers.tiny_config(tmp_path / "run", layers=1, mlp_dim=64)
    model = config.model
    critic_to_hf(nnx.merge(_graphdef(model), _random_params(model, scale=0.02)), tmp_path / "hf")
    asked = dataclasses.replace(config.model, **NUMERICS)
    resolved = train_lib.resolve_config(
        dataclasses.replace(config, init_from=str(tmp_path / "hf"), model=asked)
    ).model
    assert {k: getattr(resolved, k) for k in NUMERICS} == NUMERICS


def test_init_from_a_workdir_keeps_the_numerics_options(run_root, tmp_path):
    """`--init-from runs/pretrain` (VC-PPO's second command): the pretraining run's model
    replaces `model` whole, so the dtypes, remat, attention and layer loop asked for the
    second run are silently those of the first."""
    dtype, param_dtype, options = TRAIN_RUNS["fp16-compute-bf16-params"]
    config, summary, _ = _train_run(run_root, dtype, param_dtype, **options)
    assert not isinstance(summary, Exception), summary
    numerics = {**NUMERICS, "param_dtype": config.model.param_dtype}
    asked = dataclasses.replace(config.model, **numerics)
    second = dataclasses.replace(
        config, workdir=str(tmp_path / "second"), init_from=config.workdir, model=asked
    )
    resolved = train_lib.resolve_config(second).model
    assert {k: getattr(resolved, k) for k in numerics} == numerics
