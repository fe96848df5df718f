"""Hugging Face checkpoints in and out: Llama and Qwen2, read and written with numpy.

Import (`critic_from_hf`, `actor_critic_from_hf`) reads `config.json` and safetensors (one file or
a sharded `model.safetensors.index.json`) with numpy: nothing is unpickled and torch is not needed.
The architecture in `config.json` picks what is loaded:

- `...ForSequenceClassification` (a reward model): trunk and the bias-free `score` head;
- `...ForTokenClassification` (a critic, as verl saves them): trunk and `score` with its bias;
- `...ForCausalLM` (the actor / SFT model): trunk; the value head starts fresh.

Export (`critic_to_hf`) writes a `...ForTokenClassification` checkpoint, which
`transformers.AutoModelForTokenClassification` loads: one label for the scalar head, `value_bins`
labels for the HL-Gauss head (its support is stored under the `critic_jax` key of `config.json`).
Its logits are the head's *unshifted* output: HF `logits[:, t - 1]` is our `values[:, t]`'s
(HF position t-1 sees tokens[:, :t]).

Parameters are converted, never re-laid-out in memory beyond a transpose/reshape:
HF `model.layers.{i}.self_attn.q_proj.weight` [N*H, D] is layer i of our stacked `q` [L, D, N, H];
`o_proj.weight` [D, N*H] our `o` [L, N, H, D]; MLP and head weights are transposed. HF's q/k
weights already use the half-split rotary layout that `transformer._rotate` uses.

Loading onto a mesh (`shardings=`) builds every parameter with `jax.make_array_from_callback`:
each device's slice is read from the file by byte range (rows of the HF tensor) and converted,
so the host never holds the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import math
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

from critic_jax.models.config import ModelConfig
from critic_jax.models.critic import ActorCritic, Critic, make_value_head
from critic_jax.models.hf_config import (
    FAMILIES,
    OWN_KEY,
    VALUE_HEAD_FIELDS,
    read_config_json,
    split_architecture,
)

# Stored by some older checkpoints; recomputed from the config here.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Weights must be floating point: integer tensors are quantised weights (or not weights at all),
# and casting them to float would silently give a different model.
_FLOAT_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}
_READ_CHUNK = 16 * 2**20  # bytes of a tensor's rows read at once
Shardings = Any  # a pytree of jax.sharding.Sharding like nnx.state(model, nnx.Param)


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf_config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face Llama / Qwen2 `config.json` (`ModelConfig.from_hf`).

    Args:
      hf_config: the parsed `config.json`, its path, or the checkpoint directory holding it.
      **overrides: `ModelConfig` fields to set instead (e.g. `dtype="bfloat16"`, `remat="full"`).
        `dtype` and `param_dtype` default to "float32" whatever the checkpoint's dtype.

    Raises:
      ValueError: see `hf_config.model_fields`, and on an invalid field (naming the file).
    """
    return ModelConfig.from_hf(hf_config, **overrides)


def _hf_config(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """A `config.json` for `config`, read by transformers 4.x and 5.x alike."""
    family, _ = split_architecture({"architectures": [architecture]})
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
    labels = c.value_bins if c.value_head == "hl-gauss" else 1
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
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)},
        "label2id": {f"LABEL_{i}": i for i in range(labels)},
        "torch_dtype": c.param_dtype,
        "dtype": c.param_dtype,
        "attention_dropout": 0.0,
        "initializer_range": c.init_std,
        "use_cache": False,
    }
    if c.value_head == "hl-gauss":
        out[OWN_KEY] = {k: getattr(c, k) for k in VALUE_HEAD_FIELDS}
        out[OWN_KEY]["value_support"] = [float(x) for x in c.value_support]
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


def _check_header_entry(path: Path, name: str, info: Any) -> None:
    """One tensor's header entry: a string dtype, a shape of non-negative integers, and two
    integer data offsets 0 <= begin <= end."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(info, dict):
        problem = "is not an object"
    elif not isinstance(info.get("dtype"), str):
        problem = "has no dtype name"
    elif not isinstance(info.get("shape"), list) or not all(
        is_int(n) and n >= 0 for n in info["shape"]
    ):
        problem = "has no shape of non-negative integers"
    elif (
        not isinstance(info.get("data_offsets"), list)
        or len(info["data_offsets"]) != 2
        or not all(is_int(n) for n in info["data_offsets"])
        or not 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
    ):
        problem = "has no data_offsets [begin, end] with 0 <= begin <= end"
    else:
        return
    raise ValueError(
        f"Corrupt safetensors header in {path}: the entry of tensor {name!r} {problem}. "
        f"Received: {info!r}"[:2000]
    )


class _SafetensorsFile:
    """The header of one .safetensors file, validated, and reads of row ranges of its tensors.

    The format is read directly (an 8-byte header length, a JSON header, raw little-endian data)
    so that bfloat16 tensors load too (safetensors' numpy reader has no bfloat16). A read takes
    the bytes of the requested rows only (`os.pread`, no memory map), so a device's slice costs
    host memory for that slice's rows, not for the file.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"it has {size} bytes, fewer than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > size - 8:
                    raise ValueError(f"its header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
            reason = "its header is nested too deeply" if isinstance(e, RecursionError) else e
            raise ValueError(
                f"Cannot read safetensors file {path}: {reason} (empty, truncated or not "
                f"safetensors). Received: {path}"
            ) from None
        if not isinstance(header, dict):
            raise ValueError(f"Corrupt safetensors header in {path}. Received: {type(header)}")
        self.data_offset = 8 + header_len
        data_size = size - self.data_offset
        self.tensors: dict[str, dict[str, Any]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            _check_header_entry(path, name, info)
            begin, end = info["data_offsets"]
            if end > data_size:
                raise ValueError(
                    f"Safetensors file {path} is truncated: tensor {name!r} ends at byte {end} "
                    f"of the data, which has {data_size}. Received: {size} bytes"
                )
            self.tensors[name] = info
        # Tensors own disjoint byte ranges: two sharing bytes would be the same weights twice.
        spans = sorted((info["data_offsets"], name) for name, info in self.tensors.items())
        for ((_, end), first), ((begin, _), second) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise ValueError(
                    f"Corrupt safetensors header in {path}: tensors {first!r} and {second!r} "
                    f"share bytes. Received: data_offsets ending at {end}, starting at {begin}"
                )

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype of a floating-point tensor.

        Raises:
          ValueError: naming the tensor, for integer (quantised) or unknown dtypes.
        """
        stored = self.tensors[name]["dtype"]
        if stored not in _FLOAT_DTYPES:
            raise ValueError(
                f"Tensor {name!r} in {self.path} has dtype {stored}: only floating-point "
                f"weights ({', '.join(_FLOAT_DTYPES)}) are loaded; integer or quantised "
                f"checkpoints are refused rather than cast. Received: {stored}"
            )
        return _FLOAT_DTYPES[stored]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """float32 `tensor[index]` (one slice per axis, step 1), rejecting NaN and inf.

        Raises:
          ValueError: naming the tensor and file, on non-finite values.
        """
        info = self.tensors[name]
        dtype = self.dtype(name)
        shape = self.shape(name)
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"Tensor {name!r} in {self.path} has {end - begin} bytes, not the "
                f"{math.prod(shape) * dtype.itemsize} of {info['dtype']}{list(shape)}. "
                f"Received: data_offsets={info['data_offsets']}"
            )
        if not shape:
            rows = slice(0, 1)
            row_shape: tuple[int, ...] = ()
        else:
            rows = slice(*index[0].indices(shape[0])[:2]) if index else slice(0, shape[0])
            row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        # Rows are read in chunks of about _READ_CHUNK bytes and sliced at once, so reading a
        # column slice (a device's part of an fsdp-split weight) never holds the whole tensor.
        step = max(1, _READ_CHUNK // max(row_bytes, 1))
        parts = []
        with open(self.path, "rb") as f:
            for lo in range(rows.start, max(rows.stop, rows.start + 1), step):
                count = max(min(step, rows.stop - lo), 0)
                raw = os.pread(
                    f.fileno(), count * row_bytes, self.data_offset + begin + lo * row_bytes
                )
                x = np.frombuffer(raw, dtype).reshape((count, *row_shape) if shape else ())
                if shape and index:
                    x = x[(slice(None), *index[1:])]
                with np.errstate(over="ignore"):  # float64 beyond float32: inf, refused below
                    parts.append(np.array(x, np.float32))
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not np.isfinite(x).all():
            raise ValueError(
                f"Tensor {name!r} in {self.path} holds NaN or inf values; a checkpoint to "
                f"start from must be finite. Received: {int((~np.isfinite(x)).sum())} "
                "non-finite values"
            )
        return x


def _open_checkpoint(path: Path) -> dict[str, _SafetensorsFile]:
    """Tensor name -> the file holding it, for one file or a sharded index.

    Raises:
      ValueError: naming the file, on an unreadable index or shard, a tensor stored in two
        shards, or one stored in another shard than the index says.
    """
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else repr(e)
            raise ValueError(f"Cannot read {index}: {reason}. Received: {index}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()
        ):
            raise ValueError(
                f"{index}: weight_map must map tensor names to shard file names in {path}. "
                f"Received: {str(weight_map)[:300]}"
            )
        out: dict[str, _SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            file = _SafetensorsFile(path / shard)
            for name in file.tensors:
                if name in out:
                    raise ValueError(
                        f"Tensor {name!r} is stored twice, in {out[name].path} and {file.path}. "
                        f"Received: {index}"
                    )
                if weight_map.get(name, shard) != shard:
                    raise ValueError(
                        f"Tensor {name!r} is in {file.path}, but {index} puts it in "
                        f"{weight_map[name]}. Received: {index}"
                    )
                out[name] = file
        return out
    single = path / "model.safetensors"
    if single.exists():
        file = _SafetensorsFile(single)
        return {name: file for name in file.tensors}
    raise ValueError(
        f"No model.safetensors or model.safetensors.index.json in {path} (pickled .bin "
        f"checkpoints are not read). Received: {sorted(os.listdir(path))}"
    )


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor and the parameter (or one layer of it) it maps to.

    `ours = hf.reshape(view).transpose(perm)`: `view` splits merged HF axes (N*H -> N, H), HF
    axis j is made of the view axes `groups[j]`, and our axis i is view axis `perm[i]`.
    """

    key: tuple[str, ...]  # the parameter's path in nnx.state(model, nnx.Param)
    layer: int | None  # index on the stacked "layers" axis, None for unstacked parameters
    view: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.view[a] for a in g) for g in self.groups)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

    def read(self, file: _SafetensorsFile, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """float32 `ours[index]` of this layer, reading only the HF rows that slice needs."""
        view_index = [slice(0, n) for n in self.view]
        for i, s in enumerate(index):
            view_index[self.perm[i]] = slice(*s.indices(self.view[self.perm[i]])[:2])
        # Each HF axis: the outer view axis's range; inner axes read whole, sliced afterwards.
        hf_index, block, inner = [], [], [slice(None)] * len(self.view)
        for group in self.groups:
            outer, size = view_index[group[0]], math.prod(self.view[a] for a in group[1:])
            hf_index.append(slice(outer.start * size, outer.stop * size))
            block.append(outer.stop - outer.start)
            for a in group[1:]:
                block.append(self.view[a])
                inner[a] = view_index[a]
        x = file.read(name, tuple(hf_index)).reshape(block)
        return x[tuple(inner)].transpose(self.perm)


def _entry(key, layer, view, groups, perm) -> _Entry:
    return _Entry(tuple(key), layer, tuple(view), tuple(groups), tuple(perm))


def _backbone_entries(config: ModelConfig) -> dict[str, _Entry]:
    c = config
    d, f = c.d_model, c.mlp_dim
    n, g, h = c.num_heads, c.num_kv_heads, c.head_dim
    out = {
        "model.embed_tokens.weight": _entry(
            ("backbone", "embed"), None, (c.vocab_size, d), ((0,), (1,)), (0, 1)
        ),
        "model.norm.weight": _entry(("backbone", "norm", "scale"), None, (d,), ((0,),), (0,)),
    }
    for i in range(c.num_layers):
        p = f"model.layers.{i}."

        def add(name, key, view, groups, perm, i=i, p=p):
            out[p + name] = _entry(("backbone", "layers", *key), i, view, groups, perm)

        add("input_layernorm.weight", ("attn_norm", "scale"), (d,), ((0,),), (0,))
        add("post_attention_layernorm.weight", ("mlp_norm", "scale"), (d,), ((0,),), (0,))
        # [heads*H, D] (HF) <-> [D, heads, H] (ours).
        add("self_attn.q_proj.weight", ("attn", "q"), (n, h, d), ((0, 1), (2,)), (2, 0, 1))
        add("self_attn.k_proj.weight", ("attn", "k"), (g, h, d), ((0, 1), (2,)), (2, 0, 1))
        add("self_attn.v_proj.weight", ("attn", "v"), (g, h, d), ((0, 1), (2,)), (2, 0, 1))
        # [D, N*H] (HF) <-> [N, H, D] (ours).
        add("self_attn.o_proj.weight", ("attn", "o"), (d, n, h), ((0,), (1, 2)), (1, 2, 0))
        if c.qkv_bias:
            add("self_attn.q_proj.bias", ("attn", "q_bias"), (n, h), ((0, 1),), (0, 1))
            add("self_attn.k_proj.bias", ("attn", "k_bias"), (g, h), ((0, 1),), (0, 1))
            add("self_attn.v_proj.bias", ("attn", "v_bias"), (g, h), ((0, 1),), (0, 1))
        # nn.Linear weight [out, in] (HF) <-> kernel [in, out] (ours).
        add("mlp.gate_proj.weight", ("mlp", "gate"), (f, d), ((0,), (1,)), (1, 0))
        add("mlp.up_proj.weight", ("mlp", "up"), (f, d), ((0,), (1,)), (1, 0))
        add("mlp.down_proj.weight", ("mlp", "down"), (d, f), ((0,), (1,)), (1, 0))
    return out


def _score_entries(config: ModelConfig, *, bias: bool) -> dict[str, _Entry]:
    k = config.value_bins if config.value_head == "hl-gauss" else 1
    out = {
        "score.weight": _entry(
            ("head", "proj", "kernel"), None, (k, config.d_model), ((0,), (1,)), (1, 0)
        )
    }
    if bias:
        out["score.bias"] = _entry(("head", "proj", "bias"), None, (k,), ((0,),), (0,))
    return out


def _lm_head_entry(config: ModelConfig) -> _Entry:
    return _entry(("lm_head",), None, (config.vocab_size, config.d_model), ((0,), (1,)), (1, 0))


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        out.append(str(name))
    return tuple(out)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {_path_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _load_into(
    model: Critic | ActorCritic,
    path: Path,
    files: dict[str, _SafetensorsFile],
    entries: dict[str, _Entry],
    fixed: dict[tuple[str, ...], np.ndarray],
    *,
    ignore: set[str],
    shardings: Shardings | Callable[[Any], Shardings] | None,
) -> None:
    """Sets every parameter of the abstract `model`: from the file through `entries`, or from
    `fixed` (fresh heads); placed by `shardings` when given, each device reading its slice."""
    missing = sorted(set(entries) - set(files))
    if missing:
        raise ValueError(
            f"Missing tensors in {path}: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Received: {len(files)} tensors"
        )
    unexpected = sorted(
        n for n in files if n not in entries and n not in ignore and not _IGNORED.match(n)
    )
    if unexpected:
        raise ValueError(
            f"Unexpected tensors in {path}: {', '.join(unexpected[:8])}"
            f"{' ...' if len(unexpected) > 8 else ''}. Received: {len(files)} tensors"
        )
    by_key: dict[tuple[str, ...], dict[int | None, tuple[str, _Entry]]] = {}
    for name, entry in entries.items():
        files[name].dtype(name)  # Refuse integer weights before reading anything.
        shape = files[name].shape(name)
        if shape != entry.hf_shape:
            raise ValueError(
                f"Shape mismatch for tensor {name!r} in {files[name].path}: expected "
                f"{entry.hf_shape} from config.json, got {shape}. Received: {shape}"
            )
        by_key.setdefault(entry.key, {})[entry.layer] = (name, entry)

    abstract = nnx.state(model, nnx.Param)
    if callable(shardings):
        shardings = shardings(abstract)
    placement = _flat(shardings) if shardings is not None else {}

    def build(key: tuple[str, ...], like: jax.ShapeDtypeStruct) -> jax.Array:
        if key in fixed:
            value = np.asarray(fixed[key], like.dtype)
            return jax.device_put(value, placement[key]) if placement else jnp.asarray(value)
        layers = by_key[key]

        def read(index: tuple[slice, ...]) -> np.ndarray:
            if None in layers:
                name, entry = layers[None]
                return entry.read(files[name], name, index).astype(like.dtype)
            first, stop, _ = index[0].indices(like.shape[0])
            parts = []
            for i in range(first, stop):
                name, entry = layers[i]
                parts.append(entry.read(files[name], name, index[1:]))
            return np.stack(parts).astype(like.dtype)

        if placement:
            return jax.make_array_from_callback(like.shape, placement[key], read)
        return jnp.asarray(read(tuple(slice(0, n) for n in like.shape)))

    values = jax.tree_util.tree_map_with_path(lambda p, x: build(_path_key(p), x), abstract)
    nnx.update(model, values)


def _prepare(
    path: str | os.PathLike, overrides: dict[str, Any]
) -> tuple[Path, ModelConfig, str, dict[str, _SafetensorsFile]]:
    """(the directory, its config, the head of its architecture, tensor name -> file)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            "A Hugging Face checkpoint is a directory with config.json and safetensors. "
            f"Received: {str(path)!r} ({'a file' if path.exists() else 'no such path'})"
        )
    hf_config, config_path = read_config_json(path)
    _, head = split_architecture(hf_config, str(config_path))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = config_from_hf(config_path, **overrides)
    files = _open_checkpoint(path)
    # Layers the config claims but the file lacks are reported before anything is built per
    # layer (a config claiming 10^9 layers must not cost 10^9 of anything); extra ones are
    # named as unexpected tensors later.
    stored = {int(m[1]) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if config.num_layers > len(stored):
        absent = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in files]
        absent.append(f"model.layers.{min(set(range(len(stored) + 1)) - stored)}.*")
        raise ValueError(
            f"Missing tensors in {path}: {', '.join(absent)} ({config_path} has "
            f"num_hidden_layers={config.num_layers}, the safetensors hold {len(stored)} layers). "
            f"Received: {len(files)} tensors"
        )
    if head != "ForCausalLM":
        labels = hf_config.get("id2label")
        if labels is not None and not isinstance(labels, dict):
            raise ValueError(f"{config_path}: id2label must be an object. Received: {labels!r}")
        num_labels = len(labels) if labels is not None else None
        num_labels = hf_config.get("num_labels", num_labels)
        want = config.value_bins if config.value_head == "hl-gauss" else 1
        if num_labels != want or isinstance(num_labels, bool):
            raise ValueError(
                f"A critic with the {config.value_head} value head needs a {head[3:]} head "
                f"with num_labels={want}. Received: num_labels={num_labels}"
            )
        if head == "ForSequenceClassification" and config.value_head != "scalar":
            raise ValueError(
                "A reward model's score head loads into the scalar value head only. "
                f"Received: value_head={config.value_head!r}"
            )
    return path, config, head, files


def _fresh_head(config: ModelConfig, rngs: nnx.Rngs | None) -> dict[tuple[str, ...], np.ndarray]:
    head = make_value_head(config, rngs if rngs is not None else nnx.Rngs(0))
    return {("head", *k): np.asarray(v) for k, v in _flat(nnx.state(head, nnx.Param)).items()}


def critic_from_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: str | bool | None = None,
    value_head_init: str | None = None,
    rngs: nnx.Rngs | None = None,
    shardings: Shardings | Callable[[Any], Shardings] | None = None,
    **model_overrides: Any,
) -> Critic:
    """A `Critic` from a Hugging Face Llama / Qwen2 checkpoint directory.

    `...ForSequenceClassification` (reward model): trunk and `score` (no bias; ours is set to 0).
    `...ForTokenClassification`: trunk and `score` with its bias (one label, or `value_bins`
    labels for an exported HL-Gauss critic). `...ForCausalLM`: trunk, a fresh head
    (`value_head_init`, zeros by default) and `lm_head.weight` ignored.

    Args:
      path: directory with `config.json` and `model.safetensors` (or a sharded index).
      dtype: compute dtype ("float32", "bfloat16", "float16"); default "float32".
      param_dtype: parameter dtype; default "float32" whatever the checkpoint stores.
      remat: the remat policy (see `ModelConfig.remat`).
      value_head_init: "zeros" or "normal", for a fresh head (causal-LM checkpoints).
      rngs: seeds a "normal" fresh head; default `nnx.Rngs(0)`.
      shardings: None (parameters on the default device), or the parameters' shardings: a
        pytree like `nnx.state(critic, nnx.Param)` or a function of the abstract parameters
        returning one (e.g. `lambda p: parallel.state_shardings(p, mesh)`). Each device then
        reads only its slice of each tensor from the file.
      **model_overrides: other `ModelConfig` fields (e.g. `attention="xla"`,
        `value_head="hl-gauss"` for a fresh head on a causal LM).

    Returns:
      The critic.

    Raises:
      ValueError: on an unsupported architecture or rope type, an unreadable or incomplete
        `config.json`, the wrong `num_labels`, missing or unexpected tensors, a tensor whose
        shape disagrees with `config.json`, integer / quantised or non-finite weights, or an
        empty or truncated safetensors file.
    """
    path, config, head, files = _prepare(
        path,
        dict(
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            value_head_init=value_head_init,
            **model_overrides,
        ),
    )
    # Shapes and metadata only: every parameter is then set from the file, nothing initialised.
    critic = nnx.eval_shape(lambda: Critic(config, rngs=nnx.Rngs(0)))
    entries = _backbone_entries(config)
    ignore: set[str] = set()
    fixed: dict[tuple[str, ...], np.ndarray] = {}
    if head == "ForCausalLM":
        ignore.add("lm_head.weight")
        fixed = _fresh_head(config, rngs)
    else:
        entries.update(_score_entries(config, bias=head == "ForTokenClassification"))
        if head == "ForSequenceClassification":
            fixed[("head", "proj", "bias")] = np.zeros((1,), np.float32)
    _load_into(critic, path, files, entries, fixed, ignore=ignore, shardings=shardings)
    return critic


def actor_critic_from_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: str | bool | None = None,
    value_head_init: str | None = None,
    stop_value_grad: bool = False,
    rngs: nnx.Rngs | None = None,
    shardings: Shardings | Callable[[Any], Shardings] | None = None,
    **model_overrides: Any,
) -> ActorCritic:
    """An `ActorCritic` from a Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoint:
    trunk and LM head (tied or not) from the file, a fresh value head.

    Arguments as in `critic_from_hf`; `stop_value_grad` as in `ActorCritic`.

    Raises:
      ValueError: if the checkpoint is not a causal LM, and as `critic_from_hf`.
    """
    path, config, head, files = _prepare(
        path,
        dict(
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            value_head_init=value_head_init,
            **model_overrides,
        ),
    )
    if head != "ForCausalLM":
        raise ValueError(
            f"actor_critic_from_hf needs a ...ForCausalLM checkpoint (it has an LM head). "
            f"Received: ...{head}"
        )
    model = nnx.eval_shape(
        lambda: ActorCritic(config, rngs=nnx.Rngs(0), stop_value_grad=stop_value_grad)
    )
    entries = _backbone_entries(config)
    ignore: set[str] = set()
    if config.tie_embeddings:
        ignore.add("lm_head.weight")  # Some tied checkpoints store the copy as well.
    else:
        entries["lm_head.weight"] = _lm_head_entry(config)
    fresh = _fresh_head(config, rngs)
    _load_into(model, path, files, entries, fresh, ignore=ignore, shardings=shardings)
    return model


def critic_to_hf(
    critic: Critic, path: str | os.PathLike, *, architecture: str | None = None
) -> None:
    """Writes `critic` as a Hugging Face `...ForTokenClassification` checkpoint.

    `path` receives `config.json` and `model.safetensors` (parameters in their own dtype).
    `transformers.AutoModelForTokenClassification.from_pretrained(path)(ids).logits[:, t]` is
    the head's unshifted output at position t: for the scalar head (one label) our
    `values[:, t + 1]` for an unpadded row; for the HL-Gauss head (`value_bins` labels, support
    stored under `config.json`'s "critic_jax" key) the logits whose softmax expectation that is.
    (HF positions come from `arange`, ours from the mask: pass `position_ids` to HF for padded
    rows.) `critic_from_hf(path)` gives back the same parameters and config.

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
    entries = {**_backbone_entries(config), **_score_entries(config, bias=True)}
    params = {
        k: np.asarray(jax.device_get(v)) for k, v in _flat(nnx.state(critic, nnx.Param)).items()
    }
    tensors = {}
    for name, entry in entries.items():
        x = params[entry.key] if entry.layer is None else params[entry.key][entry.layer]
        tensors[name] = np.ascontiguousarray(entry.to_hf(x))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_hf_config(config, architecture), indent=2))
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
