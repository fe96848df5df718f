"""Hugging Face `config.json` of a Llama / Qwen2 checkpoint -> the fields of a `ModelConfig`.

A leaf module: `config.ModelConfig.from_hf` and the checkpoint import/export of `hf` both read
it, and it imports neither.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = {"Llama": "llama", "Qwen2": "qwen2"}
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
SUPPORTED_ARCHITECTURES = tuple(f + h for f in FAMILIES for h in HEADS)
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# The key of config.json under which an export records what HF has no field for.
OWN_KEY = "critic_jax"
VALUE_HEAD_FIELDS = ("value_head", "value_bins", "value_min", "value_max", "value_sigma_ratio")


# ----------------------------------------------------------------------------- config.json


def split_architecture(hf_config: dict[str, Any], where: str = "config.json") -> tuple[str, str]:
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(
            f"{where}: architectures must be a list of names such as "
            f"['LlamaForCausalLM']. Received: {archs!r}"
        )
    if len(archs) > 1:
        raise ValueError(
            f"{where} lists several architectures; a checkpoint for one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} lists exactly one. Received: {archs}"
        )
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported architecture {arch!r} in {where}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}. Received: {archs}"
        )
    family = next(f for f in FAMILIES if arch.startswith(f) and arch[len(f) :] in HEADS)
    return family, arch[len(family) :]


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool, string, list or None) that is neither NaN nor infinite."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def _number(where: str, key: str, value: Any, *, integer: bool = False) -> float | int:
    """`value` of `key` as a positive finite number (an integer when `integer`).

    JSON's true / false, strings, lists, null, NaN and Infinity are refused, not converted.
    """
    ok = is_finite_number(value) and (not integer or isinstance(value, numbers.Integral))
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{where}: {key} must be {kind}. Received: {value!r}")
    return value


def _rope_parameters(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions write
    # `rope_theta` and an optional `rope_scaling` dict.
    params, legacy = hf_config.get("rope_parameters"), hf_config.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{where}: {key} must be an object or null. Received: {value!r}")
        for name in ("rope_type", "type"):
            if name in (value or {}) and not isinstance(value[name], str):
                raise ValueError(
                    f"{where}: {key}.{name} must be a rope type name. Received: {value[name]!r}"
                )
    if params and legacy:  # both written: they must agree, or which one applies is unknown

        def kind(r):
            return r.get("rope_type", r.get("type", "default"))

        if kind(params) != kind(legacy):
            raise ValueError(
                f"{where}'s rope_parameters and rope_scaling disagree on the rope type "
                f"({kind(params)!r} vs {kind(legacy)!r}). Received: rope_parameters={params}, "
                f"rope_scaling={legacy}"
            )
    rope = dict(params or legacy or {})
    rope.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def read_config_json(source: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        hf_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ValueError(f"Cannot read {path}: {reason}. Received: {str(source)!r}") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} does not hold a JSON object. Received: {type(hf_config)}")
    return hf_config, path


def model_fields(hf_config: dict[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The `ModelConfig` fields of a Hugging Face Llama / Qwen2 `config.json`, and where it came
    from (its path, or "config.json" for a parsed dict). `ModelConfig.from_hf` builds the config.

    Args:
      hf_config: the parsed `config.json`, its path, or the checkpoint directory holding it.

    Raises:
      ValueError: on an unreadable file, a missing key (named, with the file), an unsupported
        architecture, rope type, activation or attention variant (Llama `attention_bias` /
        `mlp_bias`, Qwen2 sliding windows).
    """
    where = "config.json"
    if not isinstance(hf_config, dict):
        hf_config, path = read_config_json(hf_config)
        where = str(path)
    family, _ = split_architecture(hf_config, where)
    for key in _REQUIRED_KEYS:
        if key not in hf_config:
            raise ValueError(
                f"{where} has no {key!r}, which a {family} config needs. "
                f"Received: keys {sorted(hf_config)}"
            )
    for key in (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim"):
        value = hf_config.get(key)
        if key in ("num_key_value_heads", "head_dim") and value is None:
            continue
        _number(where, key, value, integer=True)
    rope = _rope_parameters(hf_config, where)
    if rope["rope_type"] not in _ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope type {rope['rope_type']!r} in {where}; supported: "
            f"{', '.join(_ROPE_TYPES)}. Received: {rope}"
        )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(
            f"Unsupported hidden_act {act!r} in {where}; only 'silu'. Received: {act!r}"
        )
    if family == "Llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf_config.get(key) not in (None, False):
                raise ValueError(
                    f"Unsupported Llama option {key} in {where} (only false). "
                    f"Received: {key}={hf_config.get(key)!r}"
                )
    if family == "Qwen2" and hf_config.get("use_sliding_window") not in (None, False):
        raise ValueError(
            f"Unsupported Qwen2 option use_sliding_window in {where} (only full attention). "
            f"Received: use_sliding_window={hf_config.get('use_sliding_window')!r}, "
            f"sliding_window={hf_config.get('sliding_window')!r}"
        )
    tie = hf_config.get("tie_word_embeddings", False)
    if tie is not None and not isinstance(tie, bool):
        raise ValueError(f"{where}: tie_word_embeddings must be true or false. Received: {tie!r}")

    def number(key: str, default: float) -> float:
        # Absent: the default; present, it must be valid (null included: transformers would
        # keep the null and fail in the model).
        return float(_number(where, key, hf_config[key])) if key in hf_config else default

    heads = hf_config["num_attention_heads"]
    d_model = hf_config["hidden_size"]
    scaling = _ROPE_TYPES[rope["rope_type"]]
    max_position = hf_config.get("max_position_embeddings", 8192)
    max_position = _number(where, "max_position_embeddings", max_position, integer=True)
    factor = 1.0
    if scaling != "none":
        if "factor" not in rope:
            raise ValueError(f"{where}: the {scaling} rope has no 'factor'. Received: {rope}")
        factor = float(_number(where, "rope factor", rope["factor"]))
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        d_model=d_model,
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or d_model // heads,
        mlp_dim=hf_config["intermediate_size"],
        rms_norm_eps=number("rms_norm_eps", 1e-6),
        rope_theta=float(_number(where, "rope_theta", rope["rope_theta"])),
        rope_scaling=scaling,
        rope_factor=factor,
        qkv_bias=family == "Qwen2",
        tie_embeddings=bool(tie),
        rope_original_max_position=int(max_position),
        init_std=number("initializer_range", 0.02),
    )
    if scaling == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope:
                raise ValueError(
                    f"{where}: the llama3 rope scaling has no {key!r}. Received: {rope}"
                )
        original = rope["original_max_position_embeddings"]
        fields.update(
            rope_low_freq_factor=float(_number(where, "low_freq_factor", rope["low_freq_factor"])),
            rope_high_freq_factor=float(
                _number(where, "high_freq_factor", rope["high_freq_factor"])
            ),
            rope_original_max_position=int(
                _number(where, "original_max_position_embeddings", original, integer=True)
            ),
        )
    own = hf_config.get(OWN_KEY) or {}
    if not isinstance(own, dict):
        raise ValueError(f"{where}: {OWN_KEY} must be an object. Received: {own!r}")
    fields.update({k: own[k] for k in VALUE_HEAD_FIELDS if k in own})
    return fields, where
