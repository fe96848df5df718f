"""Hugging Face import/export: parity with transformers on tiny random models, round trips, errors.

The transformers/torch tests build their models here and save them to `tmp_path`; the error tests
write checkpoints with `critic_to_hf` and need neither.
"""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from critic_jax.models import (
    Critic,
    ModelConfig,
    actor_critic_from_hf,
    config_from_hf,
    critic_from_hf,
    critic_to_hf,
)

VOCAB = 96
B, T = 2, 9
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 4,
}


def _tokens(seed=0, shape=(B, T)):
    # Token 0 is the pad id of the HF configs below: never a real token.
    return np.random.default_rng(seed).integers(1, VOCAB, size=shape).astype(np.int32)


def _hf_model(family, head, tmp_path, *, rope=None, tied=False, dtype=None, seed=0):
    """A tiny random HF model saved to tmp_path; returns (torch model, path)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        num_labels=1,
        pad_token_id=0,
    )
    if family == "Llama":
        kwargs["head_dim"] = 12  # heads * head_dim != hidden_size, as Llama allows.
    if rope is not None:
        kwargs["rope_scaling"] = rope
    config = getattr(transformers, f"{family}Config")(**kwargs)
    model = getattr(transformers, f"{family}{head}")(config).eval()
    with torch.no_grad():  # Nonzero norms and biases, so that loading them is tested.
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    path = tmp_path / f"{family}{head}"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _torch_run(model, tokens, attention_mask=None, position_ids=None):
    torch = pytest.importorskip("torch")
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long), **kwargs)


def _np(x):
    return x.detach().float().numpy()


@nnx.jit
def _outputs(critic, tokens, attention_mask=None):
    """Final hidden states [B, T, D], the head's unshifted output [B, T] and the values [B, T]."""
    hidden = critic.backbone(tokens, attention_mask)
    return hidden, critic.head(hidden), critic(tokens, attention_mask)


@nnx.jit
def _apply(model, tokens, attention_mask=None):
    return model(tokens, attention_mask)


def _build(config, seed=0):
    """A critic with random numpy parameters (biases and norms included); compiling the
    initialiser is left to test_models."""
    critic = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = nnx.state(critic, nnx.Param)
    nnx.update(
        critic, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), params)
    )
    return critic


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "family, rope",
    [
        ("Llama", None),
        ("Llama", LLAMA3_ROPE),
        ("Llama", {"rope_type": "linear", "factor": 2.0}),
        ("Qwen2", None),
    ],
)
def test_token_classification_parity(family, rope, tmp_path):
    model, path = _hf_model(family, "ForTokenClassification", tmp_path, rope=rope)
    tokens = _tokens()
    want = _np(_torch_run(model, tokens).logits)[..., 0]
    hidden, scores, values = _outputs(critic_from_hf(path), tokens)
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-4)
    # HF position t-1 has seen tokens[:, :t]: that is our V(s_t).
    np.testing.assert_allclose(values[:, 1:], want[:, :-1], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(values[:, 0], 0.0)
    want_h = _np(_torch_run(model.model, tokens).last_hidden_state)
    np.testing.assert_allclose(hidden, want_h, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_sequence_classification_parity(family, tmp_path):
    model, path = _hf_model(family, "ForSequenceClassification", tmp_path)
    tokens = _tokens(1)
    want = _np(_torch_run(model, tokens).logits)[:, 0]  # score of the last token
    critic = critic_from_hf(path)
    np.testing.assert_array_equal(critic.head.proj.bias[...], 0.0)
    np.testing.assert_allclose(_outputs(critic, tokens)[1][:, -1], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, tied", [("Llama", False), ("Qwen2", True)])
def test_causal_lm_parity(family, tied, tmp_path):
    model, path = _hf_model(family, "ForCausalLM", tmp_path, tied=tied)
    tokens = _tokens(2)
    out = _torch_run(model, tokens)
    actor_critic = actor_critic_from_hf(path)
    logits, values = _apply(actor_critic, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (B, T, VOCAB)
    np.testing.assert_allclose(logits, _np(out.logits), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(values, 0.0)  # fresh zero head
    assert (actor_critic.lm_head is None) == tied

    hidden, _, values = _outputs(critic_from_hf(path), tokens)
    np.testing.assert_array_equal(values, 0.0)
    want_h = _np(_torch_run(model.model, tokens).last_hidden_state)
    np.testing.assert_allclose(hidden, want_h, atol=1e-4, rtol=1e-4)
    fresh = critic_from_hf(path, value_head_init="normal", rngs=nnx.Rngs(3))
    assert np.abs(np.asarray(_apply(fresh, tokens)[:, 1:])).min() > 0


@pytest.mark.parametrize("block", [0, 3])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_parity(side, block, tmp_path):
    model, path = _hf_model("Qwen2", "ForTokenClassification", tmp_path)
    tokens = _tokens(3)
    mask = np.ones((B, T), np.int32)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want = _np(_torch_run(model, tokens, mask, positions).logits)[..., 0]
    critic = critic_from_hf(path)
    # Query blocks of 3 over T = 9 skip the causal upper triangle; 0 computes every score.
    config = dataclasses.replace(critic.config, attention_block_size=block)
    blocked = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    nnx.update(blocked, nnx.state(critic))
    got = _outputs(blocked, tokens, mask)[1]
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4, rtol=1e-4)


def test_sharded_and_bfloat16_checkpoints(tmp_path):
    model, path = _hf_model("Llama", "ForTokenClassification", tmp_path)
    tokens = _tokens(4)
    single = critic_from_hf(path)
    sharded_path = tmp_path / "sharded"
    model.save_pretrained(sharded_path, safe_serialization=True, max_shard_size="20KB")
    assert (sharded_path / "model.safetensors.index.json").exists()
    chex.assert_trees_all_equal(
        nnx.state(critic_from_hf(sharded_path), nnx.Param), nnx.state(single, nnx.Param)
    )

    bf16_path = tmp_path / "bf16"
    model.to(pytest.importorskip("torch").bfloat16).save_pretrained(bf16_path)
    critic = critic_from_hf(bf16_path, param_dtype="bfloat16")
    assert critic.backbone.embed[...].dtype == jnp.bfloat16
    want = _outputs(single, tokens)[1]
    np.testing.assert_allclose(_outputs(critic, tokens)[1], want, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig.tiny(
            vocab_size=VOCAB,
            value_head_init="normal",
            rope_scaling="llama3",
            rope_factor=8.0,
            rope_original_max_position=4,
            d_model=32,
        ),
        ModelConfig.tiny(
            vocab_size=VOCAB, value_head_init="normal", qkv_bias=True, tie_embeddings=True
        ),
    ],
    ids=["llama-llama3-rope", "qwen2-tied"],
)
def test_transformers_loads_export(config, tmp_path):
    transformers = pytest.importorskip("transformers")
    critic = _build(config)
    critic_to_hf(critic, tmp_path / "export")
    expected_arch = "Qwen2" if config.qkv_bias else "Llama"
    hf_config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf_config["architectures"] == [f"{expected_arch}ForTokenClassification"]

    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == f"{expected_arch}ForTokenClassification"
    tokens = _tokens(5)
    logits = _np(_torch_run(hf, tokens).logits)
    assert logits.shape == (B, T, 1)
    np.testing.assert_allclose(
        _apply(critic, tokens)[:, 1:], logits[:, :-1, 0], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_export_import_is_identity(param_dtype, tmp_path):
    config = ModelConfig.tiny(
        vocab_size=VOCAB, qkv_bias=True, value_head_init="normal", param_dtype=param_dtype
    )
    critic = _build(config)
    critic_to_hf(critic, tmp_path / "a")
    again = critic_from_hf(tmp_path / "a", param_dtype=param_dtype)
    assert again.config == dataclasses.replace(config, value_head_init="zeros")  # not stored
    chex.assert_trees_all_equal(nnx.state(again, nnx.Param), nnx.state(critic, nnx.Param))
    critic_to_hf(again, tmp_path / "b")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_hf_import_export_import_is_identity(tmp_path):
    model, path = _hf_model("Llama", "ForTokenClassification", tmp_path, rope=LLAMA3_ROPE)
    first = critic_from_hf(path)
    critic_to_hf(first, tmp_path / "out")
    second = critic_from_hf(tmp_path / "out")
    assert second.config == first.config
    chex.assert_trees_all_equal(nnx.state(second, nnx.Param), nnx.state(first, nnx.Param))
    original = safetensors.numpy.load_file(path / "model.safetensors")
    exported = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    chex.assert_trees_all_equal(original, exported)


def test_config_from_hf_reads_legacy_rope_keys():
    legacy = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "rope_theta": 123.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    config = config_from_hf(legacy, dtype="bfloat16")
    assert (config.rope_theta, config.rope_scaling, config.rope_factor) == (123.0, "linear", 4.0)
    assert (config.num_kv_heads, config.head_dim, config.dtype) == (2, 4, "bfloat16")


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path):
    config = ModelConfig.tiny(vocab_size=VOCAB, d_model=32, num_layers=1)
    critic_to_hf(_build(config), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, fn):
    tensors = dict(safetensors.numpy.load_file(path / "model.safetensors"))
    fn(tensors)
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture(exported):
    _edit_config(exported, architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match="Unsupported architecture 'MistralForCausalLM'"):
        critic_from_hf(exported)


def test_unsupported_rope_type(exported):
    _edit_config(exported, rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="Unsupported rope type 'yarn'"):
        critic_from_hf(exported)


def test_num_labels_must_be_one(exported):
    _edit_config(exported, id2label={"0": "a", "1": "b"})
    with pytest.raises(ValueError, match="num_labels=2"):
        critic_from_hf(exported)


def test_missing_tensor(exported):
    _edit_tensors(exported, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"Missing tensors .*model\.layers\.0\.mlp\.up_proj"):
        critic_from_hf(exported)


def test_unexpected_tensor(exported):
    _edit_tensors(exported, lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="Unexpected tensors .*extra"):
        critic_from_hf(exported)


def test_shape_mismatch(exported):
    _edit_config(exported, intermediate_size=64)
    with pytest.raises(ValueError, match=r"Shape mismatch for tensor 'model\.layers\.0\.mlp"):
        critic_from_hf(exported)


def test_actor_critic_needs_causal_lm(exported):
    with pytest.raises(ValueError, match="ForCausalLM"):
        actor_critic_from_hf(exported)


def test_export_rejects_llama_with_qkv_bias(tmp_path):
    critic = _build(ModelConfig.tiny(vocab_size=VOCAB, qkv_bias=True))
    with pytest.raises(ValueError, match="Qwen2ForTokenClassification"):
        critic_to_hf(critic, tmp_path, architecture="LlamaForTokenClassification")
    with pytest.raises(ValueError, match="Received: 'LlamaForCausalLM'"):
        critic_to_hf(critic, tmp_path, architecture="LlamaForCausalLM")


def test_int8_weights_are_refused(exported):
    _edit_tensors(exported, lambda t: t.update({"model.norm.weight": np.ones(32, np.int8)}))
    with pytest.raises(ValueError, match=r"Tensor 'model\.norm\.weight' in .* has dtype I8"):
        critic_from_hf(exported)


def test_non_finite_weights_are_refused(exported):
    def poison(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][3, 2] = np.nan

    _edit_tensors(exported, poison)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' .* NaN or inf"):
        critic_from_hf(exported)


@pytest.mark.parametrize("keep", [0, 5, -100])
def test_empty_or_truncated_file(exported, keep):
    file = exported / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        critic_from_hf(exported)


def test_incomplete_config_names_the_key_and_file(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["intermediate_size"]
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no 'intermediate_size'"):
        critic_from_hf(exported)
    (exported / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Cannot read .*config\.json"):
        critic_from_hf(exported)


def test_model_config_from_hf_takes_a_dict_file_or_directory(exported):
    config = ModelConfig.from_hf(exported, dtype="bfloat16")
    assert config == ModelConfig.from_hf(exported / "config.json", dtype="bfloat16")
    hf = json.loads((exported / "config.json").read_text())
    assert config == config_from_hf(hf, dtype="bfloat16")
    assert (config.d_model, config.num_layers, config.dtype) == (32, 1, "bfloat16")


# The published config.json of two presets (the keys that set the shape).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
}


@pytest.mark.parametrize("name, hf", [("qwen2.5-0.5b", QWEN25_05B), ("llama3.2-1b", LLAMA32_1B)])
def test_presets_match_the_published_configs(name, hf):
    want = dataclasses.replace(config_from_hf(hf), init_std=0.02)
    got = ModelConfig.from_preset(name)
    assert dataclasses.replace(got, preset=None) == want


# ----------------------------------------------------------------------------- HL-Gauss


HL_CONFIG = ModelConfig.tiny(
    vocab_size=VOCAB,
    d_model=32,
    qkv_bias=True,
    value_head="hl-gauss",
    value_bins=5,
    value_min=-2.0,
    value_max=6.0,
    value_head_init="normal",
)


def test_hl_gauss_export_import_round_trip(tmp_path):
    critic = _build(HL_CONFIG)
    critic_to_hf(critic, tmp_path / "a")
    hf_config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(hf_config["id2label"]) == 5
    np.testing.assert_allclose(hf_config["critic_jax"]["value_support"], [-2, 0, 2, 4, 6])
    again = critic_from_hf(tmp_path / "a")
    assert again.config == dataclasses.replace(HL_CONFIG, value_head_init="zeros")
    chex.assert_trees_all_equal(nnx.state(again, nnx.Param), nnx.state(critic, nnx.Param))
    np.testing.assert_allclose(again.support, critic.support)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "a").eval()
    tokens = _tokens(6)
    logits = _np(_torch_run(hf, tokens).logits)
    assert logits.shape == (B, T, 5)
    ours, _ = nnx.jit(lambda m, x: m.logits_and_values(x))(again, tokens)
    np.testing.assert_allclose(ours[:, 1:], logits[:, :-1], atol=1e-4, rtol=1e-4)


def test_hl_gauss_needs_matching_labels(tmp_path):
    critic_to_hf(_build(HL_CONFIG), tmp_path / "a")
    _edit_config(tmp_path / "a", id2label={"0": "a"})
    with pytest.raises(ValueError, match="num_labels=5. Received: num_labels=1"):
        critic_from_hf(tmp_path / "a")


# ----------------------------------------------------------------------------- sharded load


def test_sharded_load_reads_each_device_slice(tmp_path):
    """Loading onto an 8-device mesh (fsdp=4 x tensor=2) gives the single-device parameters,
    each device holding only its shard."""
    from critic_jax import parallel  # the trainer's layer; models/ never imports it

    config = ModelConfig.tiny(vocab_size=VOCAB, qkv_bias=True, num_layers=3, d_model=32)
    critic_to_hf(_build(config, seed=2), tmp_path / "a")
    want = nnx.state(critic_from_hf(tmp_path / "a"), nnx.Param)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    got = critic_from_hf(
        tmp_path / "a", shardings=lambda params: parallel.state_shardings(params, mesh)
    )
    params = nnx.state(got, nnx.Param)
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(want))
    q = params["backbone"]["layers"]["attn"]["q"][...]
    assert q.addressable_shards[0].data.shape == (3, 32 // 4, 4 // 2, 16)
    assert len(q.sharding.device_set) == 8
    embed = params["backbone"]["embed"][...]
    assert embed.addressable_shards[0].data.shape == (VOCAB // 2, 32 // 4)
    # A pytree of shardings works as well as a function returning one.
    shardings = parallel.state_shardings(nnx.state(got, nnx.Param), mesh)
    again = critic_from_hf(tmp_path / "a", shardings=shardings)
    chex.assert_trees_all_equal(jax.device_get(nnx.state(again, nnx.Param)), jax.device_get(want))
