"""The critic model: config validation, the value shift, causality, padding, precision, remat,
the actor-critic, and sharded construction on 8 fake CPU devices."""

import dataclasses

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from flax import nnx

from critic_jax import parallel
from critic_jax.models import ActorCritic, Critic, HLGaussHead, ModelConfig, ValueHead
from critic_jax.models.critic import shift_values
from critic_jax.models.transformer import (
    LAYER_LOOPS,
    MLP,
    PRESETS,
    rope_frequencies,
    segment_layout,
)

VOCAB = 96
B, T = 3, 10
CONFIG = ModelConfig.tiny(vocab_size=VOCAB, value_head_init="normal", qkv_bias=True, num_layers=1)


def _random_model(cls, config, seed=0, **kwargs):
    """The model with random numpy parameters: no initialiser is compiled, which keeps these
    tests fast; `Critic.__init__` itself runs in the sharding tests."""
    model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), **kwargs))
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(
        model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), params)
    )
    return model


@nnx.jit
def _apply(model, tokens, attention_mask=None):
    return model(tokens, attention_mask)


def _tokens(seed=0, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int32)


@pytest.fixture(scope="module")
def critic():
    return _random_model(Critic, CONFIG)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "multiple of model.num_kv_heads"),
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(dtype="float64"), "Unknown model.dtype 'float64'; valid: float32, bfloat16"),
        (dict(param_dtype="fp8"), "Unknown model.param_dtype"),
        (dict(rope_scaling="yarn"), "valid: none, linear, llama3"),
        (dict(value_head_init="ones"), "valid: zeros, normal"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
        (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), "rope_low_freq_factor"),
        (dict(remat="some"), "valid: none, full, dots, attention-out"),
        (dict(attention="flash"), "valid: auto, xla, xla-flash, cudnn, splash"),
        (dict(value_head="gauss"), "valid: scalar, hl-gauss"),
        (dict(value_head="hl-gauss", value_bins=1), "value_bins must be an integer >= 2"),
        (dict(value_head="hl-gauss", value_min=1.0), "value_min must be below"),
        (dict(preset="llama-70b"), "Unknown model.preset 'llama-70b'; valid: llama3-8b"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match) as err:
        dataclasses.replace(ModelConfig.tiny(), **changes)
    assert "Received: " in str(err.value).rsplit(". ", 1)[-1]


def test_tiny_config_allows_heads_times_head_dim_unequal_to_width():
    config = ModelConfig.tiny(vocab_size=17, d_model=32)
    assert (config.vocab_size, config.num_layers, config.num_heads * config.head_dim) == (17, 2, 64)


def test_presets_and_single_field_overrides():
    config = ModelConfig.from_preset("llama3.2-1b")
    assert (config.vocab_size, config.d_model, config.num_layers, config.mlp_dim) == (
        128256,
        2048,
        16,
        8192,
    )
    assert (config.rope_scaling, config.rope_factor, config.tie_embeddings) == (
        "llama3",
        32.0,
        True,
    )
    small = ModelConfig(preset="llama3.2-1b", num_layers=2, dtype="bfloat16")
    assert (small.num_layers, small.d_model, small.dtype) == (2, 2048, "bfloat16")
    # replace keeps what was resolved; the tiny model is the preset-less default.
    assert dataclasses.replace(small, remat="full").num_layers == 2
    assert ModelConfig() == ModelConfig.tiny()
    for name, shape in PRESETS.items():
        config = ModelConfig.from_preset(name)
        assert {k: getattr(config, k) for k in shape} == shape, name


def test_rope_frequencies():
    base = ModelConfig.tiny(head_dim=8, rope_theta=100.0)
    want = 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(rope_frequencies(base), want, rtol=1e-6)
    linear = dataclasses.replace(base, rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(rope_frequencies(linear), want / 4, rtol=1e-6)
    # llama3, original context 4: every wavelength (2π, 2π·√10, 20π, 20π·√10) is above 4/1.
    llama3 = dataclasses.replace(
        base, rope_scaling="llama3", rope_factor=4.0, rope_original_max_position=4
    )
    np.testing.assert_allclose(rope_frequencies(llama3), want / 4, rtol=1e-6)
    # Original context 100: thresholds 100/4 = 25 and 100/1 = 100.
    llama3 = dataclasses.replace(llama3, rope_original_max_position=100)
    got = rope_frequencies(llama3)
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)  # short wavelengths kept
    wavelen = 2 * np.pi / want[2]  # 62.8: between 25 and 100, interpolated
    smooth = (100 / wavelen - 1) / 3
    np.testing.assert_allclose(got[2], (1 - smooth) * want[2] / 4 + smooth * want[2], rtol=1e-6)
    np.testing.assert_allclose(got[3], want[3] / 4, rtol=1e-6)  # long wavelength slowed


# ----------------------------------------------------------------------------- the critic


def test_values_shape_dtype_and_first_position(critic):
    values = _apply(critic, _tokens())
    assert values.shape == (B, T) and values.dtype == jnp.float32
    np.testing.assert_array_equal(values[:, 0], 0.0)
    assert np.all(np.isfinite(values)) and np.abs(np.asarray(values[:, 1:])).min() > 0


def test_value_head_zero_init_gives_zero_values():
    model = _random_model(Critic, CONFIG)
    model.head = ValueHead(CONFIG.d_model, init="zeros", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_apply(model, _tokens()), 0.0)
    normal = ValueHead(CONFIG.d_model, init="normal", rngs=nnx.Rngs(0))
    std = float(np.std(normal.proj.kernel[...]))
    assert 0.3 / (CONFIG.d_model + 1) < std < 3 / (CONFIG.d_model + 1)
    with pytest.raises(ValueError, match="valid: zeros, normal"):
        ValueHead(8, init="uniform", rngs=nnx.Rngs(0))


def test_value_is_the_shifted_head_output(critic):
    tokens = _tokens(1)
    scores = nnx.jit(lambda m, x: m.head(m.backbone(x)))(critic, tokens)
    values = _apply(critic, tokens)
    np.testing.assert_allclose(values[:, 1:], scores[:, :-1], rtol=1e-6, atol=1e-6)


def test_causality(critic):
    """Changing token t changes no value at positions <= t (V(s_t) sees tokens[:t] only)."""
    tokens = _tokens(2)
    base = np.asarray(_apply(critic, tokens))
    for t in (0, 4, T - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        values = np.asarray(_apply(critic, changed))
        np.testing.assert_array_equal(values[:, : t + 1], base[:, : t + 1])
        if t + 1 < T:
            assert np.all(values[:, t + 1] != base[:, t + 1])


def test_left_and_right_padding_give_the_unpadded_values(critic):
    n = 6
    tokens = _tokens(3, (B, n))
    want = np.asarray(_apply(critic, tokens))
    pad = T - n
    garbage = _tokens(4, (B, pad))
    right = np.concatenate([tokens, garbage], axis=1)
    right_mask = np.concatenate([np.ones((B, n)), np.zeros((B, pad))], axis=1).astype(np.int32)
    left = np.concatenate([garbage, tokens], axis=1)
    left_mask = right_mask[:, ::-1].copy()
    got_right = np.asarray(_apply(critic, right, right_mask))
    got_left = np.asarray(_apply(critic, left, left_mask))
    np.testing.assert_allclose(got_right[:, :n], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_left[:, pad:], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_left[:, : pad + 1], 0.0)
    assert np.all(np.isfinite(got_right)) and np.all(np.isfinite(got_left))


def test_shift_values_with_holes_and_empty_rows():
    scores = np.arange(1.0, 7.0, dtype=np.float32)[None].repeat(3, 0)
    mask = np.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    want = np.array([[0, 1, 2, 2, 4, 4], [0, 0, 0, 0, 0, 0], [0, 0, 2, 3, 4, 5]], np.float32)
    np.testing.assert_array_equal(shift_values(jnp.asarray(scores), mask), want)
    np.testing.assert_array_equal(shift_values(jnp.asarray(scores), None)[0], [0, 1, 2, 3, 4, 5])


def test_fully_masked_rows_are_finite(critic):
    mask = np.ones((B, T), np.int32)
    mask[0] = 0
    values = np.asarray(_apply(critic, _tokens(5), mask))
    assert np.all(np.isfinite(values))
    np.testing.assert_array_equal(values[0], 0.0)


def test_bad_inputs(critic):
    with pytest.raises(ValueError, match="tokens must be an integer"):
        critic(np.zeros((B, T), np.float32))
    with pytest.raises(ValueError, match=r"Shape mismatch.*\(3, 10\) and \(3, 9\)"):
        critic(_tokens(), np.ones((B, T - 1)))
    with pytest.raises(ValueError, match=r"tokens and segment_ids .*\(3, 10\) and \(3, 9\)"):
        critic(_tokens(), segment_ids=np.ones((B, T - 1), np.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array"):
        critic(_tokens(), segment_ids=np.ones((B, T), np.float32))


def test_segment_layout_positions_and_previous_tokens():
    seg = np.array([[1, 1, 0, 1, 2, 2, 0, 3], [0, 0, 5, 5, 5, 0, 0, 0], [1, 2, 1, 2, 1, 2, 0, 0]])
    positions, previous = segment_layout(jnp.asarray(seg), seg.shape)
    np.testing.assert_array_equal(
        positions, [[0, 1, 0, 2, 0, 1, 0, 0], [0, 0, 0, 1, 2, 0, 0, 0], [0, 0, 1, 1, 2, 2, 0, 0]]
    )
    # -1 at each segment's first token; padding points at the last real token before it.
    np.testing.assert_array_equal(
        previous,
        [[-1, 0, 1, 1, -1, 4, 5, -1], [-1, -1, -1, 2, 3, 4, 4, 4], [-1, -1, 0, 1, 2, 3, 5, 5]],
    )
    scores = jnp.arange(1.0, 9.0)[None].repeat(3, 0)
    np.testing.assert_array_equal(
        shift_values(scores, segment_ids=seg)[0], [0, 1, 2, 2, 0, 5, 6, 0]
    )
    # An integer attention mask is read as segment ids.
    np.testing.assert_array_equal(shift_values(scores, seg), shift_values(scores, segment_ids=seg))


@pytest.mark.parametrize("order", ["runs", "interleaved", "mixed"])
def test_segment_layout_matches_the_loop_reference(order):
    """Both paths of `segment_layout` (cumulative sums for ids that never decrease along a row,
    the stable sort otherwise) against a loop, on packed rows with gaps and holes, padding masks
    (left, right, holes, empty rows) and rows whose ids come back; under jit and vmap too."""
    rng = np.random.default_rng({"runs": 0, "interleaved": 1, "mixed": 2}[order])
    rows = []
    for _ in range(4):
        _, ids = references.packed_mask_and_ids(rng, 6, 24)
        rows.append(ids)
    mask = references.mixed_mask(rng, (6, 24))
    rows.append(mask.astype(np.int32))
    seg = np.concatenate(rows)
    if order != "runs":
        scrambled = rng.integers(0, 4, seg.shape)
        seg = scrambled if order == "interleaved" else np.concatenate([seg, scrambled[:1]])
    positions, previous = references.segment_layout(seg)
    got = segment_layout(jnp.asarray(seg), seg.shape)
    np.testing.assert_array_equal(got[0], positions)
    np.testing.assert_array_equal(got[1], previous)
    jitted = jax.jit(segment_layout, static_argnums=1)(jnp.asarray(seg), seg.shape)
    np.testing.assert_array_equal(jitted[1], previous)
    mapped = jax.vmap(lambda s: segment_layout(s[None], (1, seg.shape[1])))(jnp.asarray(seg))
    np.testing.assert_array_equal(mapped[0][:, 0], positions)
    np.testing.assert_array_equal(mapped[1][:, 0], previous)


PACK_CONFIG = dataclasses.replace(CONFIG, num_layers=2, attention_block_size=4)
LENGTHS = (5, 4, 5)


def test_packed_row_equals_the_sequences_run_alone():
    """One row packing 3 sequences (and 2 padding tokens) gives exactly the values, and the
    gradients of a loss on them, of the 3 sequences run alone, right-padded to 8."""
    graphdef, params = nnx.split(_random_model(Critic, PACK_CONFIG, seed=3), nnx.Param)
    rng = np.random.default_rng(13)
    seqs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in LENGTHS]
    weights = [rng.normal(size=n).astype(np.float32) for n in LENGTHS]
    packed = np.concatenate([*seqs, [7, 7]])[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)] + [[0, 0]])[None]
    packed_w = np.concatenate([*weights, [0, 0]])[None]
    alone = np.zeros((3, 8), np.int32)
    alone_mask = np.zeros((3, 8), np.int32)
    alone_w = np.zeros((3, 8), np.float32)
    for i, (x, w) in enumerate(zip(seqs, weights, strict=True)):
        alone[i, : len(x)], alone_mask[i, : len(x)], alone_w[i, : len(x)] = x, 1, w

    def loss(params, tokens, weights, mask=None, segment_ids=None):
        values = nnx.merge(graphdef, params)(tokens, mask, segment_ids=segment_ids)
        return jnp.sum(weights * values**2), values

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (want_loss, want), want_grads = run(params, alone, alone_w, alone_mask)
    (got_loss, got), got_grads = run(params, packed, packed_w, segment_ids=seg)
    real = alone_mask.astype(bool)
    np.testing.assert_allclose(got[0, :14], np.asarray(want)[real], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[0, [0, 5, 9]], 0.0)  # each sequence's start
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)
    # The same packed row given as an integer attention mask of segment ids.
    (_, again), _ = run(params, packed, packed_w, seg)
    np.testing.assert_array_equal(again, got)


# ----------------------------------------------------------------------------- numerics


def test_bfloat16_compute_is_close_to_float32(critic):
    """bf16 compute with float32 master weights: values close to float32's, and the final norm's
    output and the value head are float32 (no bf16 rounding of the values)."""
    bf16 = nnx.eval_shape(
        lambda: Critic(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    )
    nnx.update(bf16, nnx.state(critic, nnx.Param))
    tokens = _tokens(7)
    want = np.asarray(_apply(critic, tokens))
    got = _apply(bf16, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert bf16.backbone.embed[...].dtype == jnp.float32
    assert jax.eval_shape(lambda: bf16.backbone(tokens)).dtype == jnp.float32
    graphdef, params = nnx.split(bf16, nnx.Param)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params)
    dots = helpers.dot_generals(jaxpr.jaxpr)
    head = [e for e in dots if e.invars[1].aval.shape == (CONFIG.d_model, 1)]
    assert len(head) == 1 and {v.aval.dtype for v in head[0].invars} == {jnp.dtype("float32")}
    # The block matmuls (inside the layer scan) run in bfloat16.
    assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)


def test_bfloat16_params():
    model = _random_model(Critic, dataclasses.replace(CONFIG, param_dtype="bfloat16"))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert _apply(model, _tokens()).dtype == jnp.float32


def test_remat_accepts_the_old_boolean():
    assert [dataclasses.replace(CONFIG, remat=r).remat for r in (True, False, "True", "false")] == [
        "full",
        "none",
        "full",
        "none",
    ]


@pytest.mark.parametrize("remat", ["full", "dots", "attention-out"])
def test_remat_gives_the_same_gradients(critic, remat):
    graphdef, params = nnx.split(critic, nnx.Param)
    remat_config = dataclasses.replace(CONFIG, remat=remat)
    remat_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Critic(remat_config, rngs=nnx.Rngs(0))))
    tokens = _tokens(8)

    def loss(params, graphdef):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad(params, graphdef)
    got = grad(params, remat_graphdef)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(want["backbone"]["embed"][...]).max()) > 0


def test_remat_model_under_lax_map():
    """The trainer evaluates the model inside `lax.map` over micro-batches of the outer trace's
    parameters; `nnx.remat` failed there ("Cannot mutate Param from a different trace level")."""
    config = dataclasses.replace(CONFIG, remat="full")
    graphdef, params = nnx.split(_random_model(Critic, config), nnx.Param)
    tokens = _tokens(12, (2, B, T))

    @jax.jit
    def run(params):
        def loss(params):
            values = jax.lax.map(lambda x: nnx.merge(graphdef, params)(x), tokens)
            return jnp.sum(values**2), values

        return jax.grad(loss, has_aux=True)(params)

    grads, values = run(params)
    plain = nnx.merge(graphdef, params)
    np.testing.assert_allclose(values[1], _apply(plain, tokens[1]), rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("block, attention", [(2, "xla"), (5, "auto"), (4, "xla-flash")])
def test_block_causal_attention_equals_full_attention(critic, block, attention):
    """Query blocks that skip the causal upper triangle, and the flash path, give the full T x T
    attention's values and gradients, with left padding, right padding and holes in the mask."""
    graphdef, params = nnx.split(critic, nnx.Param)
    assert CONFIG.attention_block_size >= T  # the fixture computes all T x T scores
    blocked = dataclasses.replace(CONFIG, attention_block_size=block, attention=attention)
    blocked_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Critic(blocked, rngs=nnx.Rngs(0))))
    tokens = _tokens(9)
    attention_mask = np.ones((B, T), np.int32)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[1, -4:] = 0  # right padding
    attention_mask[2, [2, 5, 6]] = 0  # holes

    def loss(params, graphdef):
        values = nnx.merge(graphdef, params)(tokens, attention_mask)
        return jnp.sum(jnp.where(attention_mask != 0, values, 0.0) ** 2), values

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want_values), want_grads = run(params, graphdef)
    (_, got_values), got_grads = run(params, blocked_graphdef)
    real = attention_mask != 0
    np.testing.assert_allclose(
        np.asarray(got_values)[real], np.asarray(want_values)[real], rtol=1e-5, atol=1e-6
    )
    assert np.all(np.isfinite(np.asarray(got_values)))
    chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- HL-Gauss head


HL_CONFIG = dataclasses.replace(
    CONFIG, value_head="hl-gauss", value_bins=7, value_min=-3.0, value_max=3.0
)


def test_hl_gauss_head_logits_and_expected_values():
    critic = _random_model(Critic, HL_CONFIG, seed=5)
    np.testing.assert_allclose(critic.support, np.linspace(-3, 3, 7))
    assert critic.support.dtype == jnp.float32
    np.testing.assert_allclose(critic.sigma, 0.75 * 1.0)
    tokens = _tokens(14)
    mask = np.ones((B, T), np.int32)
    mask[1, :2] = 0
    logits, values = nnx.jit(lambda m, x, a: m.logits_and_values(x, a))(critic, tokens, mask)
    assert logits.shape == (B, T, 7) and logits.dtype == jnp.float32
    np.testing.assert_allclose(values, _apply(critic, tokens, mask), rtol=1e-6, atol=1e-6)
    # Shifted like the values: position t holds the head's output at t's previous real token.
    raw = nnx.jit(lambda m, x, a: m.head(m.backbone(x, a)))(critic, tokens, mask)
    np.testing.assert_allclose(logits[0, 1:], raw[0, :-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(logits[:, 0], 0.0)
    np.testing.assert_array_equal(values[1, :3], 0.0)
    expected = jax.nn.softmax(logits[:, 1:], axis=-1) @ critic.support
    np.testing.assert_allclose(values[0, 1:], expected[0], rtol=1e-5, atol=1e-6)
    # A zero-initialised head predicts uniform bins: the support's mean, 0 here.
    critic.head = HLGaussHead(CONFIG.d_model, bins=7, init="zeros", rngs=nnx.Rngs(0))
    assert critic.head.proj.kernel.shape == (CONFIG.d_model, 7)
    np.testing.assert_allclose(_apply(critic, tokens), 0.0, atol=1e-6)


def test_logits_and_values_needs_the_hl_gauss_head(critic):
    with pytest.raises(ValueError, match="value_head='hl-gauss'. Received: 'scalar'"):
        critic.logits_and_values(_tokens())


# ----------------------------------------------------------------------------- scale


def _lowered(config):
    """(length, while loops) of the lowered text of the critic's gradient."""
    abstract = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(_tokens())))
    text = jax.jit(grad).lower(params).as_text()
    return len(text), text.count("stablehlo.while")


def test_layers_are_one_scanned_block():
    """The lowered program holds one block whatever the depth ("scan"; "auto" above
    `UNROLL_MAX_LAYERS` or with remat), "unroll" writes the blocks out, and every loop equals
    applying the layers one by one."""
    out = {}
    cases = [(2, "scan", "full"), (8, "scan", "full"), (8, "auto", "none"), (2, "auto", "full")]
    cases += [(2, "unroll", "full"), (4, "auto", "none")]
    for layers, loop, remat in cases:
        config = dataclasses.replace(CONFIG, num_layers=layers, remat=remat, layer_loop=loop)
        out[layers, loop, remat] = _lowered(config)
    assert out[8, "scan", "full"][0] < 1.05 * out[2, "scan", "full"][0], out
    assert out[8, "auto", "none"][1] == out[2, "auto", "full"][1] == 2, out  # scanned
    assert out[2, "unroll", "full"][1] == out[4, "auto", "none"][1] == 0, out  # written out

    model = _random_model(Critic, PACK_CONFIG, seed=4)
    tokens = _tokens(15)
    bb = model.backbone
    graphdef, stacked = nnx.split(bb.layers)
    h = jnp.take(bb.embed[...], tokens, axis=0)
    angles = jnp.arange(T)[None, :, None] * rope_frequencies(PACK_CONFIG)
    angles = jnp.broadcast_to(angles, (B, T, angles.shape[-1]))
    for i in range(PACK_CONFIG.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
        h = layer(h, jnp.cos(angles), jnp.sin(angles), jnp.ones((B, T), jnp.int32))
    want = model.head(bb.norm(h))
    for loop in LAYER_LOOPS:
        model.backbone.config = dataclasses.replace(PACK_CONFIG, layer_loop=loop)
        got = nnx.jit(lambda m, x: m.head(m.backbone(x)))(model, tokens)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=loop)


def _temp_bytes(config, seq_len, device=None):
    """Temporary memory of the compiled forward + backward of one row, by `memory_analysis`."""
    abstract = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
    params, tokens = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        (params, jax.ShapeDtypeStruct((1, seq_len), jnp.int32)),
    )
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)  # noqa: E731
    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# Layers scanned in both: the question is what the policy keeps, not the loop.
REMAT_MEMORY_CONFIG = ModelConfig.tiny(
    vocab_size=VOCAB,
    num_layers=4,
    d_model=128,
    head_dim=32,
    mlp_dim=256,
    attention="xla-flash",
    layer_loop="scan",
)


def test_full_remat_keeps_only_the_block_inputs_cpu():
    """CPU compile, 4 layers of width 128 at T = 512: measured 2026-11-30, no remat ~3x the
    temporaries of "full" (width 256, T = 1024: none 173 MB, full 53, dots 88,
    attention-out 57)."""
    temp = {
        remat: _temp_bytes(dataclasses.replace(REMAT_MEMORY_CONFIG, remat=remat), 512)
        for remat in ("none", "full", "dots")
    }
    assert temp["full"] < 0.6 * temp["none"], temp
    assert temp["full"] < temp["dots"] < temp["none"], temp


@pytest.mark.slow
def test_full_remat_keeps_only_the_block_inputs_tpu():
    """The same on a TPU v5e compiled with libtpu's compile-only devices (skipped without
    libtpu). 4 layers of width 256, bf16, splash, T = 2048: measured none 89 MB, full 5.6 MB.
    Width 512, 4 -> 8 layers: none 304 -> 675 MB, full 19 -> 41, dots 92 -> 199,
    attention-out 26 -> 58.
    (Smaller models — T = 1024, or 2 layers — stay at a few MB without remat on TPU: the
    compiler's own rematerialisation kicks in, so the comparison needs this size.)"""
    pytest.importorskip("libtpu")
    import os

    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold it
    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    config = dataclasses.replace(
        REMAT_MEMORY_CONFIG,
        d_model=256,
        mlp_dim=1024,
        head_dim=64,
        dtype="bfloat16",
        attention="splash",
    )
    temp = {
        remat: _temp_bytes(dataclasses.replace(config, remat=remat), 2048, device)
        for remat in ("none", "full")
    }
    assert temp["full"] < 0.3 * temp["none"], temp


# ----------------------------------------------------------------------------- actor-critic


@pytest.mark.parametrize("tied", [False, True])
def test_actor_critic(tied):
    config = dataclasses.replace(CONFIG, tie_embeddings=tied)
    ac = _random_model(ActorCritic, config)
    tokens = _tokens(9)
    logits, values = _apply(ac, tokens)
    assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32
    assert (ac.lm_head is None) == tied
    h = np.asarray(_apply(ac.backbone, tokens), np.float64)
    w = np.asarray(ac.backbone.embed[...]).T if tied else np.asarray(ac.lm_head[...])
    np.testing.assert_allclose(logits, h @ w, rtol=1e-5, atol=1e-5)

    critic = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    nnx.update(critic.backbone, nnx.state(ac.backbone))
    nnx.update(critic.head, nnx.state(ac.head))
    np.testing.assert_allclose(values, _apply(critic, tokens), rtol=1e-6, atol=1e-7)


def test_actor_critic_stop_value_grad():
    model = _random_model(ActorCritic, CONFIG, stop_value_grad=True)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = _tokens(10)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens)[1])  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    # The value loss trains the head only; the trunk's gradient is exactly zero.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
    assert float(jnp.abs(grads["head"]["proj"]["kernel"][...]).max()) > 0.0


# ----------------------------------------------------------------------------- sharding


def test_sharded_construction_places_parameters_by_the_rule_table():
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    config = CONFIG

    def make():
        return nnx.state(Critic(config, rngs=nnx.Rngs(0)), nnx.Param)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        abstract = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
        shardings = parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh)
        params = jax.jit(make, out_shardings=shardings)()

    d, v, f = config.d_model, config.vocab_size, config.mlp_dim
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    layers = config.num_layers
    block = params["backbone"]["layers"]
    expected = {
        "embed [vocab/tensor, embed/fsdp]": (params["backbone"]["embed"], (v // 2, d // 4)),
        "q [layers, embed/fsdp, heads/tensor, head_dim]": (
            block["attn"]["q"],
            (layers, d // 4, n // 2, h),
        ),
        "k [layers, embed/fsdp, kv_heads/tensor, head_dim]": (
            block["attn"]["k"],
            (layers, d // 4, k // 2, h),
        ),
        "q_bias [layers, heads/tensor, head_dim]": (block["attn"]["q_bias"], (layers, n // 2, h)),
        "o [layers, heads/tensor, head_dim, embed/fsdp]": (
            block["attn"]["o"],
            (layers, n // 2, h, d // 4),
        ),
        "gate [layers, embed/fsdp, mlp/tensor]": (block["mlp"]["gate"], (layers, d // 4, f // 2)),
        "down [layers, mlp/tensor, embed/fsdp]": (block["mlp"]["down"], (layers, f // 2, d // 4)),
        "norm [layers, norm]": (block["attn_norm"]["scale"], (layers, d)),
        "value head [embed/fsdp, 1]": (params["head"]["proj"]["kernel"], (d // 4, 1)),
    }
    for name, (var, shape) in expected.items():
        assert var[...].addressable_shards[0].data.shape == shape, name
        assert len(var[...].sharding.device_set) == 8, name

    # The sharded parameters compute the same values as a single-device copy of them.
    tokens = _tokens(11)
    graphdef, _ = nnx.split(abstract, nnx.Param)
    want = _apply(nnx.merge(graphdef, jax.device_get(params)), tokens)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_eager_construction_under_a_mesh_is_sharded():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        mlp = MLP(CONFIG, rngs=nnx.Rngs(0))
    d, f = CONFIG.d_model, CONFIG.mlp_dim
    assert mlp.gate[...].addressable_shards[0].data.shape == (d // 2, f // 2)
    assert mlp.down[...].addressable_shards[0].data.shape == (f // 2, d // 2)
    # Without a mesh the same module builds unsharded, keeping its logical names.
    plain = MLP(CONFIG, rngs=nnx.Rngs(0))
    assert plain.gate.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert len(plain.gate[...].sharding.device_set) == 1
    np.testing.assert_array_equal(plain.gate[...], mlp.gate[...])


@pytest.mark.parametrize(
    "shape, vocab",
    [
        (dict(fsdp=8), 64),  # the table's model axis over 8 devices
        (dict(data=2, fsdp=2, tensor=2), 64),  # vocabulary split too
        (dict(tensor=8), 64),  # vocabulary split 8 ways, tokens on every device
        (dict(data=8), 64),  # table replicated: a plain lookup
        (dict(fsdp=8), 16),  # fewer rows than the 40 tokens gathered: the gathered table
    ],
)
def test_embedding_lookup_on_shards_equals_take(shape, vocab):
    """`models.embedding.lookup` under a mesh and the rule table gives `table[tokens]` and the
    same table gradient as the unsharded lookup, for every layout of the table."""
    from critic_jax.models.embedding import lookup

    mesh = parallel.make_mesh(parallel.MeshConfig(**shape))
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, 16)).astype(np.float32)
    tokens = rng.integers(0, vocab, (8, 5)).astype(np.int32)
    weights = rng.normal(size=(8, 5, 16)).astype(np.float32)

    def loss(t, x):
        with (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES),
        ):
            return jnp.sum(lookup(t, x, jnp.float32) * weights), lookup(t, x, jnp.float32)

    placed = jax.device_put(
        table, jax.sharding.NamedSharding(mesh, parallel.logical_spec(("vocab", "embed")))
    )
    rows = jax.device_put(tokens, parallel.batch_sharding(mesh))
    (_, got), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(placed, rows)
    np.testing.assert_array_equal(np.asarray(got), table[tokens])
    want = np.zeros_like(table)
    np.add.at(want, tokens, weights)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
    if vocab > tokens.size:  # looked up on its shards: the gradient stays where the table is
        assert grad.sharding.spec == placed.sharding.spec
