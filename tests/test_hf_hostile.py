"""Hostile inputs to the Hugging Face import: `ModelConfig.from_hf` (config.json) and
`critic_from_hf` (config.json + safetensors, optionally sharded onto a mesh).

The README promises, for "a Hugging Face checkpoint of an unsupported architecture or rope type,
an incomplete `config.json`, missing, unexpected, wrongly shaped, integer / quantised or
non-finite tensors, a truncated or empty safetensors file": a `ValueError` naming the file and
the tensor or key. Every case below checks exactly that: a `ValueError` (no other exception, no
hang, no silent acceptance) whose message holds the file (for config.json: "config.json"; for a
tensor: the checkpoint's path) and the key or tensor.

The checkpoints are written here with numpy (1 layer, width 16: about 12 KB), or byte by byte for
corrupt headers; nothing is initialised or trained.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from critic_jax.models import ModelConfig, critic_from_hf

# ----------------------------------------------------------------------------- the checkpoint

CONFIG = {
    "architectures": ["LlamaForTokenClassification"],
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "intermediate_size": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
}
NORM = "model.norm.weight"
IN_NORM = "model.layers.0.input_layernorm.weight"
UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
DELETE = object()


def _tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    p = "model.layers.0."
    return {
        EMBED: w(32, 16),
        NORM: 1 + w(16),
        "score.weight": w(1, 16),
        "score.bias": w(1),
        IN_NORM: 1 + w(16),
        p + "post_attention_layernorm.weight": 1 + w(16),
        Q: w(16, 16),
        p + "self_attn.k_proj.weight": w(8, 16),
        p + "self_attn.v_proj.weight": w(8, 16),
        p + "self_attn.o_proj.weight": w(16, 16),
        p + "mlp.gate_proj.weight": w(32, 16),
        UP: w(32, 16),
        p + "mlp.down_proj.weight": w(16, 32),
    }


TENSORS = _tensors()


def _write(path: Path, config=None, tensors=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    safetensors.numpy.save_file(
        TENSORS if tensors is None else tensors,
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _write(tmp_path / "ckpt")


def _config(path: Path, **changes) -> None:
    config = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))  # NaN / Infinity written as literals


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(file: Path, header, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(file: Path, edit) -> None:
    header, data = _header(file)
    edit(header)
    _write_raw(file, header, data)


def _alternatives(needle: str | tuple[str, ...]) -> tuple[str, ...]:
    return needle if isinstance(needle, tuple) else (needle,)


def expect_value_error(fn, *needles: str | tuple[str, ...]) -> str:
    """`fn()` raises a ValueError whose message holds every needle (a string, or a tuple of
    alternatives: the HF key or our field name); anything else fails."""
    try:
        result = fn()
    except ValueError as e:
        msg = str(e)
        missing = [n for n in needles if not any(a in msg for a in _alternatives(n))]
        assert not missing, f"{type(e).__name__} does not name {missing}: {msg}"
        return msg
    except Exception as e:  # noqa: BLE001 - the point: any other exception is a failure
        pytest.fail(f"{type(e).__name__} instead of ValueError: {e}"[:600], pytrace=False)
    pytest.fail(f"accepted silently: {result!r:.300}", pytrace=False)


LOADERS = {
    "from_hf": lambda path: ModelConfig.from_hf(path),
    "critic_from_hf": lambda path: critic_from_hf(path),
}


@pytest.fixture(params=list(LOADERS))
def load(request):
    return LOADERS[request.param]


# ----------------------------------------------------------------------------- sanity


def test_the_tiny_checkpoint_loads(ckpt):
    critic = critic_from_hf(ckpt)
    np.testing.assert_array_equal(np.asarray(critic.backbone.norm.scale[...]), TENSORS[NORM])
    assert ModelConfig.from_hf(ckpt).d_model == 16


# ------------------------------------------------------------------------- config.json: the file

RAW_CONFIGS = {
    "null": b"null",
    "number": b"3",
    "list": b"[1, 2]",
    "string": b'"LlamaForCausalLM"',
    "empty": b"",
    "not JSON": b"{not json",
    "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps(CONFIG).encode(),
    "not UTF-8 (latin-1 byte)": b'{"model_type": "ll\xe9ma"}',
    "binary garbage": bytes(range(256)) * 4,
    "deeply nested list": b"[" * 100_000,
    "deeply nested object": b'{"a": ' * 100_000,
    "5000-digit integer": b'{"vocab_size": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", RAW_CONFIGS.values(), ids=RAW_CONFIGS.keys())
def test_config_file_content(ckpt, load, raw):
    (ckpt / "config.json").write_bytes(raw)
    expect_value_error(lambda: load(ckpt), "config.json")


def test_directory_without_config(ckpt, load):
    (ckpt / "config.json").unlink()
    expect_value_error(lambda: load(ckpt), "config.json")


def test_config_is_a_directory(ckpt, load):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    expect_value_error(lambda: load(ckpt), "config.json")


def test_config_is_a_broken_symlink(ckpt, load):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(ckpt / "nowhere.json")
    expect_value_error(lambda: load(ckpt), "config.json")


def test_path_does_not_exist(tmp_path, load):
    expect_value_error(lambda: load(tmp_path / "nope"), str(tmp_path / "nope"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_config_unreadable(ckpt, load):
    (ckpt / "config.json").chmod(0)
    expect_value_error(lambda: load(ckpt), "config.json")


def test_checkpoint_path_is_the_config_file(ckpt):
    """critic_from_hf(".../config.json"): the config reads, then the directory listing fails."""
    expect_value_error(lambda: critic_from_hf(ckpt / "config.json"), str(ckpt))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_path_is_the_safetensors_file(ckpt, loader):
    expect_value_error(lambda: LOADERS[loader](ckpt / "model.safetensors"), "model.safetensors")


# ------------------------------------------------------------------------- config.json: keys

# (id, changes, the key the message must name). Expected: a ValueError naming config.json and key.
NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [
    ("architectures missing", dict(architectures=DELETE), "architecture"),
    ("architectures empty", dict(architectures=[]), "architecture"),
    ("architectures unknown", dict(architectures=["MistralForCausalLM"]), "MistralForCausalLM"),
    ("architectures a string", dict(architectures="LlamaForTokenClassification"), "architecture"),
    ("architectures an object", dict(architectures={"a": 1}), "architecture"),
    ("architectures a number", dict(architectures=5), "architecture"),
    ("architectures true", dict(architectures=True), "architecture"),
    ("architectures nested", dict(architectures=[["LlamaForCausalLM"]]), "architecture"),
    ("heads not a multiple of kv heads", dict(num_key_value_heads=3), "num_kv_heads"),
    ("odd head_dim", dict(head_dim=7), "head_dim"),
    ("hidden_act gelu", dict(hidden_act="gelu"), "hidden_act"),
    ("Llama attention_bias", dict(attention_bias=True), "attention_bias"),
    ("Llama mlp_bias", dict(mlp_bias=True), "mlp_bias"),
    (
        "Qwen2 sliding window",
        dict(architectures=["Qwen2ForTokenClassification"], use_sliding_window=True),
        "use_sliding_window",
    ),
    ("critic_jax key a list", dict(critic_jax=["value_head"]), "critic_jax"),
    ("critic_jax key a string", dict(critic_jax="value_head"), "critic_jax"),
    ("critic_jax key a number", dict(critic_jax=5), "critic_jax"),
]
# The integer keys: each wrong value.
for _key in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
):
    for _label, _value in [
        ("a string", "16"),
        ("16.0", 16.0),
        ("true", True),
        ("-16", -16),
        ("0", 0),
        ("NaN", NAN),
        ("Infinity", INF),
        ("a list", [16]),
    ]:
        CONFIG_CASES.append((f"{_key} {_label}", {_key: _value}, _key))
for _key in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
):
    CONFIG_CASES.append((f"{_key} missing", {_key: DELETE}, _key))
    CONFIG_CASES.append((f"{_key} null", {_key: None}, _key))
# A config.json key, or the ModelConfig field it sets (named by the errors of ModelConfig).
OUR_NAME = {
    "initializer_range": ("initializer_range", "init_std"),
    "max_position_embeddings": ("max_position_embeddings", "rope_original_max_position"),
}
# The float keys (and max_position_embeddings, read with int()): each wrong value.
for _key in ("rms_norm_eps", "rope_theta", "initializer_range", "max_position_embeddings"):
    for _label, _value in [
        ("null", None),
        ("not a number", "abc"),
        ("a list", [1]),
        ("NaN", NAN),
        ("Infinity", INF),
        ("-1", -1),
        ("true", True),
    ]:
        CONFIG_CASES.append((f"{_key} {_label}", {_key: _value}, OUR_NAME.get(_key, _key)))
CONFIG_CASES.append(
    (
        "max_position_embeddings 8192.5",
        dict(max_position_embeddings=8192.5),
        OUR_NAME["max_position_embeddings"],
    )
)

LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
ROPE_CASES = [
    ("unknown type yarn", {"rope_type": "yarn", "factor": 2.0}, "yarn"),
    ("unknown type dynamic (legacy 'type')", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ("type null", {"rope_type": None}, "rope_type"),
    ("type a list", {"rope_type": ["linear"]}, "rope_type"),
    ("a string", "linear", "rope_scaling"),
    ("a number", 5, "rope_scaling"),
    ("a list", [1, 2], "rope_scaling"),
    ("a list of one 2-char string", ["ab"], "rope_scaling"),
    ("linear without factor", {"rope_type": "linear"}, "factor"),
    ("linear factor null", {"rope_type": "linear", "factor": None}, "factor"),
    ("linear factor a string", {"rope_type": "linear", "factor": "x"}, "factor"),
    ("linear factor 0", {"rope_type": "linear", "factor": 0}, "factor"),
    ("linear factor -2", {"rope_type": "linear", "factor": -2}, "factor"),
    ("linear factor NaN", {"rope_type": "linear", "factor": NAN}, "factor"),
    ("linear factor Infinity", {"rope_type": "linear", "factor": INF}, "factor"),
    ("rope_theta null inside", {"rope_type": "default", "rope_theta": None}, "rope_theta"),
]
for _key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
    ROPE_CASES.append(
        (f"llama3 without {_key}", {k: v for k, v in LLAMA3.items() if k != _key}, _key)
    )
    ROPE_CASES.append((f"llama3 {_key} null", {**LLAMA3, _key: None}, _key))
    ROPE_CASES.append((f"llama3 {_key} a string", {**LLAMA3, _key: "x"}, _key))
    ROPE_CASES.append((f"llama3 {_key} Infinity", {**LLAMA3, _key: INF}, _key))
ROPE_CASES.append(("llama3 low >= high", {**LLAMA3, "low_freq_factor": 4.0}, "freq_factor"))
for _id, _rope, _key in list(ROPE_CASES):
    CONFIG_CASES.append((f"rope_scaling {_id}", dict(rope_scaling=_rope), _key))
CONFIG_CASES += [
    ("rope_parameters a string", dict(rope_parameters="default"), "rope_parameters"),
    ("rope_parameters unknown type", dict(rope_parameters={"rope_type": "longrope"}), "longrope"),
    (
        "rope_parameters and rope_scaling disagree",
        dict(
            rope_parameters={"rope_type": "linear", "factor": 2.0},
            rope_scaling={"rope_type": "default"},
        ),
        "rope",
    ),
]


@pytest.mark.parametrize(
    "changes, key", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_config_key(ckpt, load, changes, key):
    _config(ckpt, **changes)
    expect_value_error(lambda: load(ckpt), "config.json", key)


def test_tie_word_embeddings_a_string(tmp_path):
    """A causal LM with its own lm_head and `"tie_word_embeddings": "false"` (a string): today
    read as True, so actor_critic_from_hf silently drops lm_head.weight and ties the head to the
    embedding. Either a ValueError naming the key, or the stored lm_head, is fine."""
    from critic_jax.models import actor_critic_from_hf

    config = {**CONFIG, "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": "false"}
    tensors = {n: x for n, x in TENSORS.items() if not n.startswith("score.")}
    tensors["lm_head.weight"] = np.full((32, 16), 0.25, np.float32)
    path = _write(tmp_path / "a", config, tensors)
    try:
        model = actor_critic_from_hf(path)
    except ValueError as e:
        assert "tie_word_embeddings" in str(e), str(e)
        return
    assert model.lm_head is not None, "tie_word_embeddings='false' read as True: lm_head dropped"
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), tensors["lm_head.weight"].T)


def test_hl_gauss_support_must_be_finite():
    """An exported HL-Gauss critic's support (config.json's "critic_jax" key) with Infinity:
    today accepted, and the support becomes [-1, inf, inf]."""
    hf = {**CONFIG, "critic_jax": {"value_head": "hl-gauss", "value_bins": 3, "value_max": INF}}
    expect_value_error(lambda: ModelConfig.from_hf(hf), "config.json", "value_max")


def test_dict_config_names_the_key():
    """A parsed dict (no file): the message still names config.json and the key."""
    expect_value_error(
        lambda: ModelConfig.from_hf({**CONFIG, "rms_norm_eps": None}), "config.json", "rms_norm_eps"
    )


def test_hidden_size_need_not_be_heads_times_head_dim(tmp_path):
    """Llama allows hidden_size != heads * head_dim: a consistent checkpoint of that shape loads,
    and one whose q_proj is [hidden, hidden] is refused, naming the tensor."""
    config = {**CONFIG, "hidden_size": 24}
    d, l0 = 24, "model.layers.0."
    shapes = {
        EMBED: (32, d),
        NORM: (d,),
        "score.weight": (1, d),
        "score.bias": (1,),
        IN_NORM: (d,),
        l0 + "post_attention_layernorm.weight": (d,),
        Q: (16, d),
        l0 + "self_attn.k_proj.weight": (8, d),
        l0 + "self_attn.v_proj.weight": (8, d),
        l0 + "self_attn.o_proj.weight": (d, 16),
        l0 + "mlp.gate_proj.weight": (32, d),
        UP: (32, d),
        l0 + "mlp.down_proj.weight": (d, 32),
    }
    t = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}
    path = _write(tmp_path / "a", config, t)
    assert critic_from_hf(path).config.d_model == 24
    t[Q] = np.zeros((24, 24), np.float32)
    _write(path, config, t)
    expect_value_error(lambda: critic_from_hf(path), str(path), Q)


# ----------------------------------------------------------------------------- the import: config


@pytest.mark.parametrize("id2label", [None, 5, "LABEL_0"], ids=["null", "number", "string"])
def test_id2label_wrong_type(ckpt, id2label):
    _config(ckpt, id2label=id2label)
    expect_value_error(lambda: critic_from_hf(ckpt), ("id2label", "num_labels"))


def test_a_billion_layers_claimed_by_a_one_layer_file(ckpt):
    """A 1-layer checkpoint whose config.json claims 10**9 layers: the missing tensors must be
    reported promptly, not after building a billion per-layer entries (today: ~40 us and
    ~0.5 KB a layer: hours and hundreds of GB before the error). Run in a child process limited
    to 20 s and 1 GiB of data (today it ends in MemoryError after ~10 s)."""
    _config(ckpt, num_hidden_layers=10**9)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (2**30, 2**30))\n"
        "from critic_jax.models import critic_from_hf\n"
        "try:\n"
        "    critic_from_hf(sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print('ValueError', str(e)[:300]); sys.exit(0)\n"
        "except BaseException as e:\n"
        "    print(type(e).__name__, str(e)[:300]); sys.exit(1)\n"
        "print('accepted'); sys.exit(2)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(ckpt)],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("no answer within 20 s (hang): num_hidden_layers=10**9", pytrace=False)
    assert done.returncode == 0, (
        f"no ValueError (exit {done.returncode}): {done.stdout} {done.stderr[-1500:]}"
    )
    assert "model.layers.1." in done.stdout and str(ckpt) in done.stdout, done.stdout


# ----------------------------------------------------------------------------- safetensors header


def _set(name, key, value):
    def edit(h):
        h[name][key] = value

    return edit


def _drop(name, key):
    def edit(h):
        del h[name][key]

    return edit


def _negative_offsets(h):  # the tensor's bytes taken from before the data: the header itself
    begin, end = h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [begin - end, 0]


def _overlap(h):  # two tensors on the same bytes
    h[NORM]["data_offsets"] = list(h[IN_NORM]["data_offsets"])


def _float_offsets(h):
    h[NORM]["data_offsets"] = [float(x) for x in h[NORM]["data_offsets"]]


def _end_past_data(h):
    begin, _ = h[NORM]["data_offsets"]
    h[NORM]["data_offsets"] = [begin, 10**9]


def _reversed(h):
    h[NORM]["data_offsets"] = h[NORM]["data_offsets"][::-1]


HEADER_CASES = [
    ("entry a number", lambda h: h.__setitem__(NORM, 5), NORM),
    ("entry empty", lambda h: h.__setitem__(NORM, {}), NORM),
    ("entry without dtype", _drop(NORM, "dtype"), NORM),
    ("entry without shape", _drop(NORM, "shape"), NORM),
    ("entry without data_offsets", _drop(NORM, "data_offsets"), NORM),
    ("extra entry a list", lambda h: h.__setitem__("junk", [1, 2]), "junk"),
    ("dtype unknown F8_E4M3", _set(NORM, "dtype", "F8_E4M3"), NORM),
    ("dtype lower-case f32", _set(NORM, "dtype", "f32"), NORM),
    ("dtype null", _set(NORM, "dtype", None), NORM),
    ("dtype a list", _set(NORM, "dtype", ["F32"]), NORM),
    ("dtype BOOL", _set(NORM, "dtype", "BOOL"), NORM),
    ("data_offsets one number", _set(NORM, "data_offsets", [1]), NORM),
    ("data_offsets three numbers", _set(NORM, "data_offsets", [0, 64, 128]), NORM),
    ("data_offsets a string", _set(NORM, "data_offsets", "ab"), NORM),
    ("data_offsets with null", _set(NORM, "data_offsets", [0, None]), NORM),
    ("data_offsets floats", _float_offsets, NORM),
    ("data_offsets reversed", _reversed, NORM),
    ("data_offsets end past the data", _end_past_data, NORM),
    ("data_offsets negative (into the header)", _negative_offsets, NORM),
    ("data_offsets overlapping another tensor", _overlap, NORM),
    ("shape a number", _set(NORM, "shape", 16), NORM),
    ("shape null", _set(NORM, "shape", None), NORM),
    ("shape floats", _set(NORM, "shape", [16.0]), NORM),
    ("shape floats (2-d)", _set(Q, "shape", [16.0, 16.0]), Q),
    ("shape negative", _set(NORM, "shape", [-16]), NORM),
    ("shape strings", _set(NORM, "shape", ["16"]), NORM),
    ("wrong rank, same size [4, 4]", _set(NORM, "shape", [4, 4]), NORM),
    ("wrong rank 0-d", _set(NORM, "shape", []), NORM),
]


@pytest.mark.parametrize(
    "edit, name", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_safetensors_header(ckpt, edit, name):
    _edit_header(ckpt / "model.safetensors", edit)
    expect_value_error(lambda: critic_from_hf(ckpt), str(ckpt), name)


def _whole(edit):
    def apply(file: Path):
        file.write_bytes(edit(file.read_bytes()))

    return apply


FILE_CASES = {
    "empty": _whole(lambda b: b""),
    "5 bytes": _whole(lambda b: b[:5]),
    "header length 0": _whole(lambda b: bytes(8) + b[8:]),
    "header length past the end": _whole(lambda b: struct.pack("<Q", len(b)) + b[8:]),
    "header length 2**64-1": _whole(lambda b: b"\xff" * 8 + b[8:]),
    "truncated data": _whole(lambda b: b[:-100]),
    "header not JSON": _whole(lambda b: b[:8] + b"x" * (len(b) - 8)),
    "header a JSON list": lambda f: _write_raw(f, b"[1, 2, 3]", b""),
    "header null": lambda f: _write_raw(f, b"null", b""),
    "header not UTF-8": lambda f: _write_raw(f, b'{"\xe9": 1}', b""),
    "header deeply nested": lambda f: _write_raw(f, b"[" * 100_000, b""),
    "a directory": lambda f: (f.unlink(), f.mkdir()),
}


@pytest.mark.parametrize("edit", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_safetensors_file(ckpt, edit):
    edit(ckpt / "model.safetensors")
    expect_value_error(lambda: critic_from_hf(ckpt), str(ckpt / "model.safetensors"))


# ----------------------------------------------------------------------------- tensor values


def _poison(name, dtype, value):
    x = TENSORS[name].astype(dtype)
    x.reshape(-1)[-1] = value
    return {**TENSORS, name: x}


VALUE_CASES = {
    "int8": ({**TENSORS, UP: TENSORS[UP].astype(np.int8)}, UP),
    "uint8": ({**TENSORS, UP: TENSORS[UP].astype(np.uint8)}, UP),
    "int32": ({**TENSORS, NORM: TENSORS[NORM].astype(np.int32)}, NORM),
    "bool": ({**TENSORS, NORM: TENSORS[NORM] > 0}, NORM),
    "complex": ({**TENSORS, NORM: TENSORS[NORM].astype(np.complex64)}, NORM),
    "F32 NaN": (_poison(UP, np.float32, np.nan), UP),
    "F32 -inf": (_poison(UP, np.float32, -np.inf), UP),
    "F16 inf": (_poison(NORM, np.float16, np.inf), NORM),
    "BF16 NaN": (_poison(Q, ml_dtypes.bfloat16, np.nan), Q),
    "F64 1e300 (overflows float32)": (_poison(EMBED, np.float64, 1e300), EMBED),
    "missing tensor": ({k: v for k, v in TENSORS.items() if k != UP}, UP),
    "unexpected tensor": (
        {**TENSORS, "model.layers.1.mlp.up_proj.weight": TENSORS[UP]},
        "model.layers.1.mlp.up_proj.weight",
    ),
    "transposed": (
        {**TENSORS, "model.layers.0.mlp.down_proj.weight": TENSORS[UP]},
        "model.layers.0.mlp.down_proj.weight",
    ),
    "1-d q_proj": ({**TENSORS, Q: TENSORS[Q].reshape(-1)}, Q),
    "3-d q_proj": ({**TENSORS, Q: TENSORS[Q].reshape(2, 8, 16)}, Q),
}


@pytest.mark.parametrize("tensors, name", VALUE_CASES.values(), ids=VALUE_CASES.keys())
def test_tensor_values(tmp_path, tensors, name):
    path = _write(tmp_path / "a", tensors=tensors)
    expect_value_error(lambda: critic_from_hf(path), str(path), name)


def test_mixed_float_dtypes_load_exactly(tmp_path):
    """bf16, f16, f32 and f64 tensors in one file: each read as its own dtype, cast to float32."""
    t = dict(TENSORS)
    t[UP] = TENSORS[UP].astype(ml_dtypes.bfloat16)
    t[NORM] = TENSORS[NORM].astype(np.float16)
    t[EMBED] = TENSORS[EMBED].astype(np.float64)
    critic = critic_from_hf(_write(tmp_path / "a", tensors=t))
    np.testing.assert_array_equal(
        np.asarray(critic.backbone.layers.mlp.up[...])[0], t[UP].astype(np.float32).T
    )
    np.testing.assert_array_equal(
        np.asarray(critic.backbone.norm.scale[...]), t[NORM].astype(np.float32)
    )
    np.testing.assert_array_equal(
        np.asarray(critic.backbone.embed[...]), t[EMBED].astype(np.float32)
    )


def test_non_finite_value_in_one_device_slice(ckpt):
    """Loaded onto an 8-device mesh (each device reads its slice): a NaN in the last row is
    still refused, naming the tensor and the file."""
    from critic_jax import parallel

    _write(ckpt, tensors=_poison(UP, np.float32, np.nan))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1))
    expect_value_error(
        lambda: critic_from_hf(ckpt, shardings=lambda p: parallel.state_shardings(p, mesh)),
        str(ckpt / "model.safetensors"),
        UP,
    )


def test_negative_offsets_on_a_mesh(ckpt):
    """The same header corruption as 'data_offsets negative', loaded slice by slice."""
    from critic_jax import parallel

    _edit_header(ckpt / "model.safetensors", _negative_offsets)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tensor=1))
    expect_value_error(
        lambda: critic_from_hf(ckpt, shardings=lambda p: parallel.state_shardings(p, mesh)),
        str(ckpt),
        NORM,
    )


# ----------------------------------------------------------------------------- sharded checkpoints

SHARD_A = "model-00001-of-00002.safetensors"
SHARD_B = "model-00002-of-00002.safetensors"
NAMES = sorted(TENSORS)
HALF = len(NAMES) // 2


def _sharded(path: Path, *, a=None, b=None, index=None) -> Path:
    """Two shards (the first and second half of the names) and their index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    a = {n: TENSORS[n] for n in NAMES[:HALF]} if a is None else a
    b = {n: TENSORS[n] for n in NAMES[HALF:]} if b is None else b
    safetensors.numpy.save_file(a, path / SHARD_A)
    safetensors.numpy.save_file(b, path / SHARD_B)
    if index is None:
        index = {"weight_map": {n: SHARD_A for n in a} | {n: SHARD_B for n in b}}
    text = index if isinstance(index, bytes) else json.dumps(index).encode()
    (path / "model.safetensors.index.json").write_bytes(text)
    return path


def test_sharded_checkpoint_loads(tmp_path):
    critic = critic_from_hf(_sharded(tmp_path / "a"))
    np.testing.assert_array_equal(np.asarray(critic.backbone.norm.scale[...]), TENSORS[NORM])


def test_duplicate_tensor_across_shards(tmp_path):
    """The same tensor in both shards, with different values (the index names the first):
    today the second file silently wins."""
    dup = NAMES[0]
    b = {n: TENSORS[n] for n in NAMES[HALF:]} | {dup: TENSORS[dup] + 1}
    index = {"weight_map": {n: SHARD_A if i < HALF else SHARD_B for i, n in enumerate(NAMES)}}
    path = _sharded(tmp_path / "a", b=b, index=index)
    expect_value_error(lambda: critic_from_hf(path), str(path), dup)


INDEX_CASES = {
    "missing shard": (lambda p: (p / SHARD_B).unlink(), SHARD_B),
    "not JSON": (lambda p: (p / "model.safetensors.index.json").write_text("{"), "index"),
    "no weight_map": (lambda p: (p / "model.safetensors.index.json").write_text("{}"), "index"),
    "a JSON list": (lambda p: (p / "model.safetensors.index.json").write_text("[]"), "index"),
    "weight_map a list": (
        lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'),
        "weight_map",
    ),
    "weight_map values numbers": (
        lambda p: (p / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: 5 for n in NAMES}})
        ),
        "weight_map",
    ),
    "weight_map values null": (
        lambda p: (p / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: None for n in NAMES}})
        ),
        "weight_map",
    ),
    "not UTF-8": (
        lambda p: (p / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xe9": 1}}'),
        "index",
    ),
    "deeply nested": (
        lambda p: (p / "model.safetensors.index.json").write_bytes(b"[" * 100_000),
        "index",
    ),
    "empty weight_map": (
        lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {}}'),
        EMBED,
    ),
    "a corrupt shard": (lambda p: (p / SHARD_A).write_bytes(b"\x00" * 4), SHARD_A),
}


@pytest.mark.parametrize("edit, needle", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_sharded_index(tmp_path, edit, needle):
    path = _sharded(tmp_path / "a")
    edit(path)
    expect_value_error(lambda: critic_from_hf(path), str(path), needle)
