"""`ModelConfig`: the shape and numerics of the critic's decoder and value head, and the presets.

The published shapes of a few Hugging Face checkpoints (`PRESETS`), the tiny CPU model, and the
options the model code reads (dtypes, rope scaling, remat policies, the layer loop, attention
implementations, value heads), each checked when a config is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from critic_jax.models.hf_config import is_finite_number, model_fields

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_SCALINGS = ("none", "linear", "llama3")
VALUE_HEAD_INITS = ("zeros", "normal")
VALUE_HEADS = ("scalar", "hl-gauss")
LAYER_LOOPS = ("auto", "scan", "unroll")
# "auto" unrolls the layer loop up to this depth (without remat) and scans deeper stacks. Measured
# on CPU (the train-step benchmark, 4 layers, width 256): unrolled ~7% faster a step; the compile
# time of an unrolled stack grows with depth (28 s at 4 layers, 103 s at 32), a scanned one's does
# not; and the CPU compiler keeps the memory that remat saves only when the layers are scanned.
UNROLL_MAX_LAYERS = 4
# How the model runs, not what it computes: a run that starts from a checkpoint (`init_from`)
# takes the checkpoint's architecture and keeps its own values of these.
EXECUTION_FIELDS = (
    "dtype", "param_dtype", "remat", "layer_loop", "attention", "attention_block_size"
)  # fmt: skip
# What the backward pass keeps of each block (everything else is recomputed from the block's
# input, which the layer scan keeps anyway). None: no `jax.checkpoint` at all.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention-out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}

# The shape fields of ModelConfig, as the columns of the table of shapes below (then rope scaling).
_SHAPE_COLUMNS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_original_max_position",
    "qkv_bias",
    "tie_embeddings",
)
_NO_ROPE_SCALING = dict(
    rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0
)


def _shape(row: tuple, **rope_scaling: Any) -> dict[str, Any]:
    return {**dict(zip(_SHAPE_COLUMNS, row, strict=True)), **_NO_ROPE_SCALING, **rope_scaling}


# A shape field left None takes its value from `preset`, or from the tiny CPU model without one.
_TINY = _shape((256, 64, 2, 4, 2, 16, 128, 1e-6, 1e4, 8192, False, False))
# The published shapes of the Hugging Face checkpoints of these names (config.json); random init.
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B (no rope scaling; Llama 3.1 added it)
    "llama3-8b": _shape((128256, 4096, 32, 32, 8, 128, 14336, 1e-5, 5e5, 8192, False, False)),
    # meta-llama/Llama-3.2-1B
    "llama3.2-1b": _shape(
        (128256, 2048, 16, 32, 8, 64, 8192, 1e-5, 5e5, 8192, False, True),
        rope_scaling="llama3",
        rope_factor=32.0,
    ),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": _shape((151936, 896, 24, 14, 2, 64, 4864, 1e-6, 1e6, 32768, True, True)),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": _shape((152064, 3584, 28, 28, 4, 128, 18944, 1e-6, 1e6, 131072, True, False)),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of the decoder and its value head.

    Shape fields (from `vocab_size` to `tie_embeddings`) left None are filled in `__post_init__`:
    from `PRESETS[preset]` when `preset` is set, else from the tiny CPU model (2 layers, width 64).
    A field given explicitly always wins, so `ModelConfig(preset="llama3.2-1b", num_layers=2)` is
    a 2-layer model of Llama-3.2-1B's width. On the command line `--model.preset NAME` must build
    the default model as `ModelConfig.from_preset(NAME)` before the other `--model.*` flags are
    parsed (tyro passes every field of its default), so each of them overrides one field.
    `num_heads * head_dim` need not equal `d_model` (Llama allows it).

    Attributes:
      preset: one of `PRESETS` ("llama3-8b", "llama3.2-1b", "qwen2.5-0.5b", "qwen2.5-7b") or None.
      vocab_size: number of token ids.
      d_model: width of the residual stream.
      num_layers: decoder blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); divides `num_heads`.
      head_dim: width of one attention head.
      mlp_dim: hidden width of the SwiGLU MLP.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: rotary base.
      rope_scaling: "none", "linear" (positions divided by `rope_factor`) or "llama3" (the
        Llama-3.1 frequency-dependent rule using every `rope_*` field below).
      rope_factor: scaling factor of "linear" and "llama3".
      rope_low_freq_factor: "llama3" only.
      rope_high_freq_factor: "llama3" only.
      rope_original_max_position: "llama3" only: the pre-training context length.
      qkv_bias: bias on the q, k and v projections (Qwen2).
      tie_embeddings: the LM head reuses the token embedding (only `ActorCritic` has an LM head).
      dtype: compute dtype, one of "float32", "bfloat16", "float16".
      param_dtype: storage dtype of the parameters, same choices ("float32" master weights with
        "bfloat16" compute is the mixed-precision setting). Training refuses "float16" (AdamW's
        moments take this dtype, and float16 cannot hold them); it still serves evaluation.
      remat: what the backward pass keeps of each block: "none" (everything), "full" (only the
        block's input; the rest is recomputed), "dots" (the outputs of the weight matmuls:
        projections and MLP; attention and elementwise ops are recomputed), "attention-out" (the
        attention output before its projection). True and False (or "true" / "false") are read as
        "full" and "none".
      layer_loop: how the stacked blocks run: "scan" (one `jax.lax.scan`: one block traced and
        compiled at any depth), "unroll" (the same scan fully unrolled: the blocks written out,
        which XLA schedules across layers; compile time grows with depth) or "auto" ("unroll" up
        to `UNROLL_MAX_LAYERS` layers without remat, "scan" otherwise). The numbers are the
        same either way.
      attention: attention implementation, one of `ATTENTION_IMPLEMENTATIONS` (see
        `critic_jax.models.attention`); "auto" picks the fused kernel of the backend (cuDNN on
        GPU, splash on TPU) and an XLA path on CPU.
      attention_block_size: block length of the "xla", "xla-flash" and "splash" attention
        paths (see `critic_jax.models.attention`); 0 means one block of T. The result is the
        same either way.
      value_head: "scalar" (Linear(d_model -> 1)) or "hl-gauss" (Linear(d_model -> value_bins)
        logits over a fixed support; the value is their softmax's expectation).
      value_bins: number of bins of "hl-gauss" (>= 2).
      value_min: centre of the first bin.
      value_max: centre of the last bin.
      value_sigma_ratio: the HL-Gauss target's std in bin widths (`sigma = ratio * width`).
      value_head_init: "zeros" (V = 0 at step 0; uniform bins for "hl-gauss") or "normal"
        (std 1 / (d_model + 1)).
      init_std: std of the normal initialiser of the backbone's matrices.
    """

    preset: str | None = None
    vocab_size: int | None = None
    d_model: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: str | None = None
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position: int | None = None
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    layer_loop: str = "auto"
    attention: str = "auto"
    attention_block_size: int = 128
    value_head: str = "scalar"
    value_bins: int = 51
    value_min: float = -1.0
    value_max: float = 1.0
    value_sigma_ratio: float = 0.75
    value_head_init: str = "zeros"
    init_std: float = 0.02

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(
                f"Unknown model.preset {self.preset!r}; valid: {', '.join(PRESETS)}. "
                f"Received: {self.preset!r}"
            )
        defaults = {**_TINY, **PRESETS.get(self.preset, {})}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        # The boolean flag of earlier configs (and its spelling on a command line).
        if isinstance(self.remat, bool) or str(self.remat).lower() in ("true", "false"):
            on = self.remat is True or str(self.remat).lower() == "true"
            object.__setattr__(self, "remat", "full" if on else "none")
        for name in _SHAPE_COLUMNS[:7] + ("rope_original_max_position",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer. Received: {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                "model.num_heads must be a multiple of model.num_kv_heads. "
                f"Received: num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim must be even (rotary pairs). Received: {self.head_dim}"
            )
        if not isinstance(self.attention_block_size, int) or self.attention_block_size < 0:
            raise ValueError(
                "model.attention_block_size must be a non-negative integer. "
                f"Received: {self.attention_block_size!r}"
            )
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "init_std", "value_sigma_ratio"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value > 0):
                raise ValueError(f"model.{name} must be positive and finite. Received: {value!r}")
        if self.rope_scaling == "llama3" and not (
            is_finite_number(self.rope_high_freq_factor)
            and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        ):
            raise ValueError(
                "model.rope_low_freq_factor must be positive and below rope_high_freq_factor. "
                f"Received: low={self.rope_low_freq_factor}, high={self.rope_high_freq_factor}"
            )
        if self.value_head == "hl-gauss":
            if not isinstance(self.value_bins, int) or self.value_bins < 2:
                raise ValueError(
                    f"model.value_bins must be an integer >= 2. Received: {self.value_bins!r}"
                )
            if not (is_finite_number(self.value_min) and is_finite_number(self.value_max)):
                raise ValueError(
                    "model.value_min and model.value_max must be finite. "
                    f"Received: value_min={self.value_min!r}, value_max={self.value_max!r}"
                )
            if not self.value_min < self.value_max:
                raise ValueError(
                    "model.value_min must be below model.value_max. "
                    f"Received: value_min={self.value_min}, value_max={self.value_max}"
                )
        for name, valid in (
            ("dtype", tuple(DTYPES)),
            ("param_dtype", tuple(DTYPES)),
            ("rope_scaling", ROPE_SCALINGS),
            ("value_head_init", VALUE_HEAD_INITS),
            ("value_head", VALUE_HEADS),
            ("remat", tuple(REMAT_POLICIES)),
            ("layer_loop", LAYER_LOOPS),
            ("attention", ATTENTION_IMPLEMENTATIONS),
        ):
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(
                    f"Unknown model.{name} {value!r}; valid: {', '.join(valid)}. "
                    f"Received: {value!r}"
                )

    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides) -> ModelConfig:
        """A 2-layer, 64-wide model that trains in about a minute on a laptop CPU."""
        return cls(**{**_TINY, "vocab_size": vocab_size, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """The published shape of `name` (see `PRESETS`), with `overrides` on single fields.

        Raises:
          ValueError: on an unknown preset name or an invalid field.
        """
        return cls(preset=name, **overrides)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any] | str | Any, **overrides) -> ModelConfig:
        """The config of a Hugging Face Llama / Qwen2 `config.json`: a parsed dict, the file, or
        the checkpoint directory holding it. `overrides` set single fields (e.g. dtype).

        Raises:
          ValueError: on an unreadable file, a missing key, an unsupported architecture or
            option (see `hf_config.model_fields`), or an invalid value (each
            naming the file).
        """
        fields, where = model_fields(hf_config)
        try:
            return cls(**{**fields, **overrides})
        except (TypeError, ValueError) as e:  # a wrongly typed or invalid value: name the file
            raise ValueError(f"{where}: {e}") from None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.dtype])

    @property
    def unrolled(self) -> bool:
        """Whether the blocks run written out: `layer_loop` "unroll", or "auto" at no more than
        `UNROLL_MAX_LAYERS` layers without remat."""
        return self.layer_loop == "unroll" or (
            self.layer_loop == "auto"
            and self.remat == "none"
            and self.num_layers <= UNROLL_MAX_LAYERS
        )

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.param_dtype])

    @property
    def value_support(self) -> np.ndarray:
        """float32 [value_bins] bin centres of the "hl-gauss" head: linspace(min, max, bins)."""
        return np.linspace(self.value_min, self.value_max, self.value_bins, dtype=np.float32)

    @property
    def value_sigma(self) -> float:
        """Std of the HL-Gauss target: `value_sigma_ratio` times the distance between centres."""
        return self.value_sigma_ratio * (self.value_max - self.value_min) / (self.value_bins - 1)
