"""Hugging Face checkpoints in and out: Llama and Qwen2, read and written with numpy.

Import (`critic_from_hf`, `actor_critic_from_hf`) reads `config.json` and safetensors (one file or
a sharded `model.safetensors.index.json`) with numpy: nothing is unpickled and torch is not needed.
The architecture in `config.json` picks what is loaded:

- `...ForSequenceClassification` (a reward model): trunk and the bias-free `score` head;
- `...ForTokenClassification` (a critic, as verl saves them): trunk and `score` with its bias;
- `...ForCausalLM` (the actor / SFT model): trunk; the value head starts fresh.

Export (`critic_to_hf`) writes a `...ForTokenClassification` checkpoint with one label, which
`transformers.AutoModelForTokenClassification` loads. Its logits are the head's *unshifted*
output: HF `logits[:, t - 1, 0]` is our `values[:, t]` (HF position t-1 sees tokens[:, :t]).

Parameters are converted, never re-laid-out in memory beyond a transpose/reshape:
HF `q_proj.weight` [N*H, D] is our `q` [D, N, H]; `o_proj.weight` [D, N*H] our `o` [N, H, D];
MLP and head weights are transposed. HF's q/k weights already use the half-split rotary layout
that `transformer._rotate` uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from critic_jax.models.critic import ActorCritic, Critic, ValueHead
from critic_jax.models.transformer import ModelConfig

FAMILIES = {"Llama": "llama", "Qwen2": "qwen2"}
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
SUPPORTED_ARCHITECTURES = tuple(f + h for f in FAMILIES for h in HEADS)
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# Stored by some older checkpoints; recomputed from the config here.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


# ----------------------------------------------------------------------------- config.json


def _split_architecture(hf_config: dict[str, Any]) -> tuple[str, str]:
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {arch!r} in config.json; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Received: {archs}"
        )
    family = next(f for f in FAMILIES if arch.startswith(f) and arch[len(f) :] in HEADS)
    return family, arch[len(family) :]


def _rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions write
    # `rope_theta` and an optional `rope_scaling` dict.
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face Llama / Qwen2 `config.json` (as a dict).

    Args:
      hf_config: the parsed `config.json`.
      **overrides: `ModelConfig` fields to set instead (e.g. `dtype="bfloat16"`, `remat=True`).
        `dtype` and `param_dtype` default to "float32" whatever the checkpoint's dtype.

    Raises:
      ValueError: on an unsupported architecture, rope type, activation or attention variant
        (Llama `attention_bias` / `mlp_bias`, Qwen2 sliding windows).
    """
    family, _ = _split_architecture(hf_config)
    rope = _rope_parameters(hf_config)
    if rope["rope_type"] not in _ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope type {rope['rope_type']!r}; supported: "
            f"{', '.join(_ROPE_TYPES)}. Received: {rope}"
        )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Unsupported hidden_act {act!r}; only 'silu'. Received: {act!r}")
    if family == "Llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf_config.get(key):
                raise ValueError(f"Unsupported Llama option {key}=true. Received: {key}=true")
    if family == "Qwen2" and hf_config.get("use_sliding_window"):
        raise ValueError(
            "Unsupported Qwen2 option use_sliding_window=true (only full attention). "
            f"Received: sliding_window={hf_config.get('sliding_window')}"
        )
    heads = hf_config["num_attention_heads"]
    d_model = hf_config["hidden_size"]
    scaling = _ROPE_TYPES[rope["rope_type"]]
    max_position = hf_config.get("max_position_embeddings", 8192)
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=d_model,
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or d_model // heads,
        mlp_dim=hf_config["intermediate_size"],
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=scaling,
        rope_factor=float(rope.get("factor", 1.0)) if scaling != "none" else 1.0,
        qkv_bias=family == "Qwen2",
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        rope_original_max_position=int(max_position),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    if scaling == "llama3":
        fields.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position=int(rope["original_max_position_embeddings"]),
        )
    fields.update(overrides)
    return ModelConfig(**fields)


def _hf_config(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """A `config.json` for `config`, read by transformers 4.x and 5.x alike."""
    family, _ = _split_architecture({"architectures": [architecture]})
    c = config
    if c.rope_scaling == "none":
        rope = {"rope_type": "default"}
        max_position = c.rope_original_max_position
    else:
        rope = {"rope_type": c.rope_scaling, "factor": c.rope_factor}
        max_position = c.rope_original_max_position
        if c.rope_scaling == "llama3":
            rope.update(
                low_freq_factor=c.rope_low_freq_factor,
                high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_max_position,
            )
            max_position = int(c.rope_original_max_position * c.rope_factor)
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": FAMILIES[family],
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": max_position,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling == "none" else rope,
        "rope_parameters": {**rope, "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "torch_dtype": c.param_dtype,
        "dtype": c.param_dtype,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": False,
    }
    if family == "Llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=c.num_layers,
            layer_types=["full_attention"] * c.num_layers,
        )
    return out


# ----------------------------------------------------------------------------- safetensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only numpy arrays (memory-mapped).

    The format is read directly (an 8-byte header length, a JSON header, raw little-endian data)
    so that bfloat16 checkpoints load too.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"Tensor {name!r} in {path} has unsupported dtype {info['dtype']}; supported: "
                f"{', '.join(_SAFETENSORS_DTYPES)}. Received: {info['dtype']}"
            )
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return out


def _read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for name in files:
            tensors.update(_read_safetensors(path / name))
        return tensors
    single = path / "model.safetensors"
    if single.exists():
        return _read_safetensors(single)
    raise ValueError(
        f"No model.safetensors or model.safetensors.index.json in {path} (pickled .bin "
        f"checkpoints are not read). Received: {sorted(os.listdir(path))}"
    )


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor and the parameter it maps to: `ours = to_ours(hf)`, `hf = to_hf(ours)`."""

    var: nnx.Variable
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _in_proj(var: nnx.Variable) -> _Entry:
    """[heads*H, D] (HF) <-> [D, heads, H] (ours)."""
    d, n, h = var.shape
    return _Entry(var, (n * h, d), lambda x: x.T.reshape(d, n, h), lambda x: x.reshape(d, n * h).T)


def _in_bias(var: nnx.Variable) -> _Entry:
    n, h = var.shape
    return _Entry(var, (n * h,), lambda x: x.reshape(n, h), lambda x: x.reshape(n * h))


def _out_proj(var: nnx.Variable) -> _Entry:
    """[D, N*H] (HF) <-> [N, H, D] (ours)."""
    n, h, d = var.shape
    return _Entry(var, (d, n * h), lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T)


def _matrix(var: nnx.Variable) -> _Entry:
    """nn.Linear weight [out, in] (HF) <-> kernel [in, out] (ours)."""
    return _Entry(var, tuple(var.shape[::-1]), _transpose, _transpose)


def _vector(var: nnx.Variable) -> _Entry:
    return _Entry(var, tuple(var.shape), _same, _same)


def _backbone_entries(model: Critic | ActorCritic) -> dict[str, _Entry]:
    bb = model.backbone
    out = {
        "model.embed_tokens.weight": _vector(bb.embed),
        "model.norm.weight": _vector(bb.norm.scale),
    }
    for i, block in enumerate(bb.layers):
        p = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        out[p + "input_layernorm.weight"] = _vector(block.attn_norm.scale)
        out[p + "post_attention_layernorm.weight"] = _vector(block.mlp_norm.scale)
        out[p + "self_attn.q_proj.weight"] = _in_proj(attn.q)
        out[p + "self_attn.k_proj.weight"] = _in_proj(attn.k)
        out[p + "self_attn.v_proj.weight"] = _in_proj(attn.v)
        out[p + "self_attn.o_proj.weight"] = _out_proj(attn.o)
        if model.config.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = _in_bias(attn.q_bias)
            out[p + "self_attn.k_proj.bias"] = _in_bias(attn.k_bias)
            out[p + "self_attn.v_proj.bias"] = _in_bias(attn.v_bias)
        out[p + "mlp.gate_proj.weight"] = _matrix(mlp.gate)
        out[p + "mlp.up_proj.weight"] = _matrix(mlp.up)
        out[p + "mlp.down_proj.weight"] = _matrix(mlp.down)
    return out


def _load_entries(
    tensors: dict[str, np.ndarray],
    entries: dict[str, _Entry],
    *,
    ignore: set[str],
    where: Path,
) -> None:
    missing = sorted(set(entries) - set(tensors))
    if missing:
        raise ValueError(
            f"Missing tensors in {where}: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Received: {len(tensors)} tensors"
        )
    unexpected = sorted(
        n for n in tensors if n not in entries and n not in ignore and not _IGNORED.match(n)
    )
    if unexpected:
        raise ValueError(
            f"Unexpected tensors in {where}: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}. Received: {len(tensors)} tensors"
        )
    for name, entry in entries.items():
        x = tensors[name]
        if tuple(x.shape) != entry.hf_shape:
            raise ValueError(
                f"Shape mismatch for tensor {name!r}: expected {entry.hf_shape} from config.json, "
                f"got {tuple(x.shape)}. Received: {tuple(x.shape)}"
            )
        dtype = entry.var.dtype
        entry.var.set_value(jnp.asarray(entry.to_ours(np.asarray(x, np.float32)), dtype))


def _prepare(path: str | os.PathLike, overrides: dict[str, Any]) -> tuple[Path, ModelConfig, str]:
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    _, head = _split_architecture(hf_config)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = config_from_hf(hf_config, **overrides)
    if head != "ForCausalLM":
        num_labels = len(hf_config["id2label"]) if "id2label" in hf_config else None
        num_labels = hf_config.get("num_labels", num_labels)
        if num_labels != 1:
            raise ValueError(
                f"A critic needs a one-label {head[3:]} head (num_labels=1). "
                f"Received: num_labels={num_labels}"
            )
    return path, config, head


def _fresh_head(config: ModelConfig, rngs: nnx.Rngs | None) -> ValueHead:
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    return ValueHead(
        config.d_model, init=config.value_head_init, param_dtype=config.param_dtype, rngs=rngs
    )


def critic_from_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: bool | None = None,
    value_head_init: str | None = None,
    rngs: nnx.Rngs | None = None,
) -> Critic:
    """A `Critic` from a Hugging Face Llama / Qwen2 checkpoint directory.

    `...ForSequenceClassification` (reward model): trunk and `score` (no bias; ours is set to 0).
    `...ForTokenClassification`: trunk and `score` with its bias. `...ForCausalLM`: trunk, a
    fresh head (`value_head_init`, zeros by default) and `lm_head.weight` ignored.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: compute dtype ("float32", "bfloat16", "float16"); default "float32".
      param_dtype: parameter dtype; default "float32" whatever the checkpoint stores.
      remat: rematerialise each block in the backward pass.
      value_head_init: "zeros" or "normal", for a fresh head (causal-LM checkpoints).
      rngs: seeds a "normal" fresh head; default `nnx.Rngs(0)`.

    Returns:
      The critic, its parameters as (unsharded) `jax.Array`s. Place them on a mesh with
      `jax.device_put(nnx.state(critic, nnx.Param), parallel.state_shardings(...))`.

    Raises:
      ValueError: on an unsupported architecture or rope type, `num_labels != 1`, missing or
        unexpected tensors, or a tensor whose shape disagrees with `config.json`.
    """
    path, config, head = _prepare(
        path,
        dict(dtype=dtype, param_dtype=param_dtype, remat=remat, value_head_init=value_head_init),
    )
    # Shapes and metadata only: every parameter is then set from the file, nothing initialised.
    critic = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    entries = _backbone_entries(critic)
    ignore: set[str] = set()
    if head == "ForCausalLM":
        ignore.add("lm_head.weight")
        critic.head = _fresh_head(config, rngs)
    else:
        entries["score.weight"] = _matrix(critic.head.proj.kernel)
        if head == "ForTokenClassification":
            entries["score.bias"] = _vector(critic.head.proj.bias)
        else:
            bias = critic.head.proj.bias
            bias.set_value(jnp.zeros(bias.shape, bias.dtype))
    _load_entries(_read_checkpoint(path), entries, ignore=ignore, where=path)
    return critic


def actor_critic_from_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: bool | None = None,
    value_head_init: str | None = None,
    stop_value_grad: bool = False,
    rngs: nnx.Rngs | None = None,
) -> ActorCritic:
    """An `ActorCritic` from a Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoint:
    trunk and LM head (tied or not) from the file, a fresh value head.

    Arguments as in `critic_from_hf`; `stop_value_grad` as in `ActorCritic`.

    Raises:
      ValueError: if the checkpoint is not a causal LM, and as `critic_from_hf`.
    """
    path, config, head = _prepare(
        path,
        dict(dtype=dtype, param_dtype=param_dtype, remat=remat, value_head_init=value_head_init),
    )
    if head != "ForCausalLM":
        raise ValueError(
            f"actor_critic_from_hf needs a ...ForCausalLM checkpoint (it has an LM head). "
            f"Received: ...{head}"
        )
    model = nnx.eval_shape(
        lambda: ActorCritic(config, rngs=nnx.Rngs(0), stop_value_grad=stop_value_grad)
    )
    model.head = _fresh_head(config, rngs)
    entries = _backbone_entries(model)
    ignore: set[str] = set()
    if config.tie_embeddings:
        ignore.add("lm_head.weight")  # Some tied checkpoints store the copy as well.
    else:
        entries["lm_head.weight"] = _matrix(model.lm_head)
    _load_entries(_read_checkpoint(path), entries, ignore=ignore, where=path)
    return model


def critic_to_hf(
    critic: Critic, path: str | os.PathLike, *, architecture: str | None = None
) -> None:
    """Writes `critic` as a one-label Hugging Face `...ForTokenClassification` checkpoint.

    `path` receives `config.json` and `model.safetensors` (parameters in their own dtype).
    `transformers.AutoModelForTokenClassification.from_pretrained(path)(ids).logits[:, t, 0]` is
    the head's unshifted output at position t, i.e. our `values[:, t + 1]` for an unpadded row
    (HF positions come from `arange`, ours from the mask: pass `position_ids` to HF for padded
    rows). `critic_from_hf(path)` gives back the same parameters and config.

    Args:
      critic: the critic to write.
      path: output directory (created if needed).
      architecture: "LlamaForTokenClassification" or "Qwen2ForTokenClassification"; default
        Qwen2 when `config.qkv_bias`, else Llama.

    Raises:
      ValueError: on another architecture, or Llama with q/k/v bias (HF Llama ties them to an
        output-projection bias).
    """
    config = critic.config
    if architecture is None:
        architecture = (
            "Qwen2ForTokenClassification" if config.qkv_bias else "LlamaForTokenClassification"
        )
    valid = tuple(f + "ForTokenClassification" for f in FAMILIES)
    if architecture not in valid:
        raise ValueError(
            f"critic_to_hf writes one of {', '.join(valid)}. Received: {architecture!r}"
        )
    if architecture.startswith("Llama") and config.qkv_bias:
        raise ValueError(
            "A critic with q/k/v bias exports as Qwen2ForTokenClassification, not Llama. "
            f"Received: architecture={architecture!r}, qkv_bias=True"
        )
    entries = _backbone_entries(critic)
    entries["score.weight"] = _matrix(critic.head.proj.kernel)
    entries["score.bias"] = _vector(critic.head.proj.bias)
    tensors = {}
    for name, entry in entries.items():
        x = np.asarray(jax.device_get(entry.var[...]))
        tensors[name] = np.ascontiguousarray(entry.to_hf(x))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_hf_config(config, architecture), indent=2))
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
