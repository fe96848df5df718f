"""The critic model: config validation, the value shift, causality, padding, precision, remat,
the actor-critic, and sharded construction on 8 fake CPU devices."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from critic_jax import parallel
from critic_jax.models import ActorCritic, Critic, ModelConfig, ValueHead
from critic_jax.models.critic import shift_values
from critic_jax.models.transformer import MLP, rope_frequencies

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
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match) as err:
        dataclasses.replace(ModelConfig.tiny(), **changes)
    assert "Received: " in str(err.value).rsplit(". ", 1)[-1]


def test_tiny_config_allows_heads_times_head_dim_unequal_to_width():
    config = ModelConfig.tiny(vocab_size=17, d_model=32)
    assert (config.vocab_size, config.num_layers, config.num_heads * config.head_dim) == (17, 2, 64)


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


# ----------------------------------------------------------------------------- numerics


def test_bfloat16_compute_is_close_to_float32(critic):
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
    hidden = jax.eval_shape(lambda: bf16.backbone(tokens))
    assert hidden.dtype == jnp.bfloat16


def test_bfloat16_params():
    model = _random_model(Critic, dataclasses.replace(CONFIG, param_dtype="bfloat16"))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert _apply(model, _tokens()).dtype == jnp.float32


def test_remat_gives_the_same_gradients(critic):
    graphdef, params = nnx.split(critic, nnx.Param)
    remat_config = dataclasses.replace(CONFIG, remat=True)
    remat_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Critic(remat_config, rngs=nnx.Rngs(0))))
    tokens = _tokens(8)

    def loss(params, graphdef):
        return jnp.sum(nnx.merge(graphdef, params)(tokens) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    want = grad(params, graphdef)
    got = grad(params, remat_graphdef)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(want["backbone"]["embed"][...]).max()) > 0


@pytest.mark.parametrize("block", [2, 5])
def test_block_causal_attention_equals_full_attention(critic, block):
    """Query blocks that skip the causal upper triangle give the full T x T attention's values
    and gradients, with left padding, right padding and holes in the attention mask."""
    graphdef, params = nnx.split(critic, nnx.Param)
    assert CONFIG.attention_block_size >= T  # the fixture computes all T x T scores
    blocked = dataclasses.replace(CONFIG, attention_block_size=block)
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
    block = params["backbone"]["layers"][0]
    expected = {
        "embed [vocab/tensor, embed/fsdp]": (params["backbone"]["embed"], (v // 2, d // 4)),
        "q [embed/fsdp, heads/tensor, head_dim]": (block["attn"]["q"], (d // 4, n // 2, h)),
        "k [embed/fsdp, kv_heads/tensor, head_dim]": (block["attn"]["k"], (d // 4, k // 2, h)),
        "q_bias [heads/tensor, head_dim]": (block["attn"]["q_bias"], (n // 2, h)),
        "o [heads/tensor, head_dim, embed/fsdp]": (block["attn"]["o"], (n // 2, h, d // 4)),
        "gate [embed/fsdp, mlp/tensor]": (block["mlp"]["gate"], (d // 4, f // 2)),
        "down [mlp/tensor, embed/fsdp]": (block["mlp"]["down"], (f // 2, d // 4)),
        "norm [norm]": (block["attn_norm"]["scale"], (d,)),
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
