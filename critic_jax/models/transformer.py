"""A Llama-family decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

The same code covers Llama 2/3 (with linear and Llama-3 rope scaling) and Qwen2 (q/k/v bias).
Every parameter names its axes with the logical names of `critic_jax.parallel.LOGICAL_AXIS_RULES`,
so one rule table places the model on any mesh. Parameters are stored in `param_dtype`, the
activations are computed in `dtype`; the norms, the attention softmax statistics, the rotary
angles and the final hidden states are float32.

The decoder blocks are one `Block` whose parameters are stacked on a leading "layers" axis;
`Transformer.__call__` runs them with one `jax.lax.scan` over a pure block function (split/merge),
so a block is traced and compiled once whatever the depth, and `jax.checkpoint` with the
configured policy (`ModelConfig.remat`) wraps that pure function.

Sequences are described by segment ids: int [B, T], 0 on padding, and tokens with the same
nonzero id form one sequence (a packed row holds several). A 0/1 attention mask is the one-segment
case. Attention is causal within a segment; positions count the earlier tokens of the same
segment, so a left-padded, right-padded, unpadded or packed sequence gives the same hidden states
on its real tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.ad_checkpoint import checkpoint_name

from critic_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from critic_jax.models.hf_config import model_fields

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
        "bfloat16" compute is the mixed-precision setting).
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
            if not value > 0:
                raise ValueError(f"model.{name} must be positive. Received: {value!r}")
        if self.rope_scaling == "llama3" and not (
            0 < self.rope_low_freq_factor < self.rope_high_freq_factor
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


def partitioned(init: nnx.Initializer, names: Sequence[str | None]) -> nnx.Initializer:
    """`nnx.with_partitioning`, sharding eagerly only where a mesh and axis rules are in scope.

    Under `jax.set_mesh(mesh)` + `nnx.logical_axis_rules(rules)` each parameter is created in its
    sharded layout; without them (unit tests, checkpoint conversion) the model still builds, and
    the names stay on the parameters for `parallel.state_shardings`.
    """
    eager = not jax.sharding.get_abstract_mesh().empty and bool(core_spmd.get_logical_axis_rules())
    return nnx.with_partitioning(init, tuple(names), eager_sharding=eager)


def make_param(
    rngs: nnx.Rngs,
    init: nnx.Initializer,
    shape: tuple[int, ...],
    names: Sequence[str | None],
    dtype: jnp.dtype,
    *,
    layers: int | None = None,
) -> nnx.Param:
    """A parameter of `shape` with logical axis `names`; with `layers`, one per layer stacked on
    a leading axis named "layers" (each layer's slice drawn independently)."""
    if layers is not None:
        shape, names = (layers, *shape), ("layers", *names)
    return nnx.Param(partitioned(init, names)(rngs.params(), shape, dtype))


# ----------------------------------------------------------------------------- segments


def segment_ids_from(
    tokens_shape: tuple[int, ...],
    attention_mask: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> jax.Array | None:
    """int32 [B, T] segment ids of a batch, or None when every token is one sequence.

    A bool or float `attention_mask` means one segment (id 1) on its nonzero entries; an integer
    one is taken as segment ids itself (a 0/1 mask is the one-segment case). `segment_ids`
    (int, 0 = padding) describes packed rows; given both, positions where the mask is 0 become
    padding.

    Raises:
      ValueError: on a shape other than `tokens_shape`, or non-integer `segment_ids`.
    """
    out = None
    for name, x in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
        if x is None:
            continue
        x = jnp.asarray(x)
        if x.shape != tuple(tokens_shape):
            raise ValueError(
                f"Shape mismatch: tokens and {name} must have the same shape, got "
                f"{tuple(tokens_shape)} and {x.shape}. Received: {x.shape}"
            )
        if name == "segment_ids" and not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an integer array. Received: {x.dtype}")
        if jnp.issubdtype(x.dtype, jnp.integer):
            ids = x.astype(jnp.int32)
        else:
            ids = (x != 0).astype(jnp.int32)
        out = ids if out is None else jnp.where(out != 0, ids, 0)
    return out


def prepare_inputs(
    tokens: jax.typing.ArrayLike,
    attention_mask: jax.typing.ArrayLike | None = None,
    segment_ids: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Validated (int [B, T] tokens, int32 [B, T] segment ids or None) of a model call.

    Raises:
      ValueError: if `tokens` is not 2-D integer, or a mask / segment ids of another shape.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an integer [B, T] array. Received: {tokens.dtype}{tokens.shape}"
        )
    return tokens, segment_ids_from(tokens.shape, attention_mask, segment_ids)


def segment_layout(
    segment_ids_bt: jax.Array | None, shape: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Where each token sits in its own sequence.

    Args:
      segment_ids_bt: int [B, T] (0 = padding), or None (each row one unpadded sequence).
      shape: (B, T).

    Returns:
      (positions, previous), int32 [B, T]: the number of earlier tokens of the same segment, and
      the index of the previous token of the same segment (-1 at each segment's first token).
      On padding, positions are 0 and `previous` is the last real token before it (-1 if none).
      Segments need not be contiguous (a padding hole inside a sequence is skipped, and an id
      may come back after another one).

    Padding masks and packed rows whose nonzero ids never decrease along the row (what a packer
    writes: 1, 1, 2, 2, 2, 0, 0) take a linear path of cumulative sums; a batch with any other
    order falls back to a stable sort of the ids (one `lax.cond` on the whole batch).
    """
    b, t = shape
    idx_t = jnp.arange(t, dtype=jnp.int32)
    if segment_ids_bt is None:
        return jnp.broadcast_to(idx_t, shape), jnp.broadcast_to(idx_t - 1, shape)
    seg_bt = segment_ids_bt
    real_bt = seg_bt != 0
    last_real_bt = jax.lax.cummax(jnp.where(real_bt, idx_t, -1), axis=1)
    last_real_before_bt = jnp.pad(last_real_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    prev_id_bt = jnp.where(
        last_real_before_bt >= 0,
        jnp.take_along_axis(seg_bt, jnp.maximum(last_real_before_bt, 0), axis=-1),
        0,
    )
    # Nonzero ids never decrease along each row: every segment is one run of real tokens.
    runs = jnp.all(~real_bt | (prev_id_bt <= seg_bt))

    def by_runs():
        first_bt = real_bt & (prev_id_bt != seg_bt)
        count_bt = jnp.cumsum(real_bt, axis=1, dtype=jnp.int32)  # real tokens up to t
        start_bt = jax.lax.cummax(jnp.where(first_bt, count_bt - 1, 0), axis=1)
        return count_bt - 1 - start_bt, jnp.where(first_bt, -1, last_real_before_bt)

    def by_sort():
        order_bt = jnp.argsort(seg_bt, axis=-1, stable=True).astype(jnp.int32)
        sorted_bt = jnp.take_along_axis(seg_bt, order_bt, axis=-1)
        first_bt = jnp.concatenate(
            [jnp.ones((b, 1), bool), sorted_bt[:, 1:] != sorted_bt[:, :-1]], axis=-1
        )
        start_bt = jax.lax.cummax(jnp.where(first_bt, idx_t, 0), axis=1)
        prev_order_bt = jnp.pad(order_bt[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        inverse_bt = jnp.argsort(order_bt, axis=-1).astype(jnp.int32)
        positions_bt = jnp.take_along_axis(idx_t - start_bt, inverse_bt, axis=-1)
        previous_bt = jnp.take_along_axis(
            jnp.where(first_bt, -1, prev_order_bt), inverse_bt, axis=-1
        )
        return positions_bt, previous_bt

    positions_bt, previous_bt = jax.lax.cond(runs, by_runs, by_sort)
    return (
        jnp.where(real_bt, positions_bt, 0),
        jnp.where(real_bt, previous_bt, last_real_before_bt),
    )


# ----------------------------------------------------------------------------- layers


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, after the configured rope scaling."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_scaling == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between the
        # two thresholds interpolated smoothly (Llama 3.1).
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        original = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / config.rope_factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > original / low,
            inv_freq / config.rope_factor,
            np.where(wavelen < original / high, inv_freq, interpolated),
        )
    return inv_freq.astype(np.float32)


def _rotate(x_bthk: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout: pairs are (x[i], x[i + head_dim/2]).

    Written as x * [cos, cos] + swap(x) * [-sin, sin], where swap exchanges the two halves (a
    reverse of an axis of 2): no split or concatenate, which XLA:CPU runs several times slower.
    """
    b, t, n, h = x_bthk.shape
    x = x_bthk.astype(jnp.float32).reshape(b, t, n, 2, h // 2)
    cos = cos_btk[:, :, None, None, :]
    sin = jnp.stack([-sin_btk, sin_btk], axis=-2)[:, :, None]
    out = x * cos + jnp.flip(x, axis=-2) * sin
    return out.reshape(b, t, n, h).astype(x_bthk.dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, normalised in float32, returned in `out_dtype`
    (default: the input's dtype)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        layers: int | None = None,
        out_dtype: jnp.dtype | None = None,
    ):
        self.eps = eps
        self.out_dtype = out_dtype
        self.scale = make_param(
            rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype, layers=layers
        )

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.out_dtype or x_btd.dtype
        x = x_btd.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x.astype(dt) * self.scale[...].astype(dt)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings, within segments.

    Kernels: q [D, N, H], k and v [D, K, H], o [N, H, D] (N query heads, K kv heads, head dim H);
    optional biases q [N, H], k and v [K, H]; each with a leading layer axis when `layers` is set.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        c = config
        normal = nnx.initializers.normal(c.init_std)
        zeros = nnx.initializers.zeros_init()
        pd = c.storage_dtype
        self.config = c

        def param(init, shape, names):
            return make_param(rngs, init, shape, names, pd, layers=layers)

        self.q = param(normal, (c.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"))
        kv_shape = (c.d_model, c.num_kv_heads, c.head_dim)
        self.k = param(normal, kv_shape, ("embed", "kv_heads", "head_dim"))
        self.v = param(normal, kv_shape, ("embed", "kv_heads", "head_dim"))
        self.o = param(normal, (c.num_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"))
        if c.qkv_bias:
            self.q_bias = param(zeros, (c.num_heads, c.head_dim), ("heads", "head_dim"))
            self.k_bias = param(zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))
            self.v_bias = param(zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))

    def __call__(
        self, x_btd: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array, segment_ids_bt: jax.Array
    ) -> jax.Array:
        c = self.config
        dt = c.compute_dtype
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q[...].astype(dt))
        k_bsgh = jnp.einsum("btd,dgh->btgh", x_btd, self.k[...].astype(dt))
        v_bsgh = jnp.einsum("btd,dgh->btgh", x_btd, self.v[...].astype(dt))
        if c.qkv_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(dt)
            k_bsgh = k_bsgh + self.k_bias[...].astype(dt)
            v_bsgh = v_bsgh + self.v_bias[...].astype(dt)
        q_btnh = _rotate(q_btnh, cos_btk, sin_btk)
        k_bsgh = _rotate(k_bsgh, cos_btk, sin_btk)
        out_btnh = dot_product_attention(
            q_btnh,
            k_bsgh,
            v_bsgh,
            segment_ids_bt,
            implementation=c.attention,
            block_size=c.attention_block_size,
        )
        out_btnh = checkpoint_name(out_btnh, "attention_out")
        return jnp.einsum("btnh,nhd->btd", out_btnh, self.o[...].astype(dt))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up [D, F], down [F, D]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        c = config
        normal = nnx.initializers.normal(c.init_std)
        pd = c.storage_dtype

        def param(shape, names):
            return make_param(rngs, normal, shape, names, pd, layers=layers)

        self.gate = param((c.d_model, c.mlp_dim), ("embed", "mlp"))
        self.up = param((c.d_model, c.mlp_dim), ("embed", "mlp"))
        self.down = param((c.mlp_dim, c.d_model), ("mlp", "embed"))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = x_btd.dtype
        gate_btf = x_btd @ self.gate[...].astype(dt)
        up_btf = x_btd @ self.up[...].astype(dt)
        return (jax.nn.silu(gate_btf) * up_btf) @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h)).

    With `layers=L` every parameter has a leading axis of L (logical name "layers"): the module
    then holds all L blocks, and calling it needs one layer's slice (see `run_blocks`).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        c = config
        norm = dict(eps=c.rms_norm_eps, param_dtype=c.storage_dtype, rngs=rngs, layers=layers)
        self.attn_norm = RMSNorm(c.d_model, **norm)
        self.attn = Attention(c, rngs=rngs, layers=layers)
        self.mlp_norm = RMSNorm(c.d_model, **norm)
        self.mlp = MLP(c, rngs=rngs, layers=layers)

    def __call__(
        self, h_btd: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array, segment_ids_bt: jax.Array
    ) -> jax.Array:
        h_btd = h_btd + self.attn(self.attn_norm(h_btd), cos_btk, sin_btk, segment_ids_bt)
        return h_btd + self.mlp(self.mlp_norm(h_btd))


def _constrain_rows(x: jax.Array) -> jax.Array:
    """`x` [B, ...] split by rows as the logical axis "batch" says, the rest whole, when a mesh and
    logical-axis rules are in scope (the trainer's update); unchanged otherwise. Without it the
    partitioner may split the residual stream's model axis like the FSDP-split weights and
    reshuffle activations between devices in every layer."""
    rules = dict(core_spmd.get_logical_axis_rules() or ())
    if jax.sharding.get_abstract_mesh().empty or "batch" not in rules:
        return x
    spec = jax.sharding.PartitionSpec(rules["batch"], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def run_blocks(
    blocks: Block,
    h_btd: jax.Array,
    cos_btk: jax.Array,
    sin_btk: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    remat: str = "none",
    unroll: bool = False,
) -> jax.Array:
    """Applies stacked blocks in order: one `jax.lax.scan` over their leading layer axis.

    The scanned function is pure (`nnx.merge` of one layer's slice of the parameters), and with a
    remat policy it is wrapped in `jax.checkpoint`; no NNX transform sees the outer parameters, so
    this runs under any outer trace (`jit`, `grad`, `lax.map`, `vmap`). `unroll` writes the
    scan out layer by layer (see `ModelConfig.layer_loop`).
    """
    graphdef, stacked = nnx.split(blocks)

    def one_block(h_btd, layer):
        h_btd = nnx.merge(graphdef, layer)(h_btd, cos_btk, sin_btk, segment_ids_bt)
        return _constrain_rows(h_btd), None

    policy = REMAT_POLICIES[remat]
    if policy is not None:
        # Inside a scan loop the compiler cannot merge the recomputation with the forward pass;
        # written out (unrolled) it could, so the optimisation barrier stays on.
        one_block = jax.checkpoint(one_block, policy=policy, prevent_cse=unroll)
    h_btd, _ = jax.lax.scan(one_block, h_btd, stacked, unroll=unroll)
    return h_btd


class Transformer(nnx.Module):
    """Decoder backbone: token ids [B, T] -> final-normed float32 hidden states [B, T, D].

    Attributes:
      embed: [V, D] token embedding (also the LM head when `config.tie_embeddings`).
      layers: the `config.num_layers` decoder blocks, one `Block` with stacked parameters.
      norm: the final RMSNorm (float32 output).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = make_param(
            rngs,
            nnx.initializers.normal(c.init_std),
            (c.vocab_size, c.d_model),
            ("vocab", "embed"),
            c.storage_dtype,
        )
        self.layers = Block(c, rngs=rngs, layers=c.num_layers)
        self.norm = RMSNorm(
            c.d_model,
            eps=c.rms_norm_eps,
            param_dtype=c.storage_dtype,
            rngs=rngs,
            out_dtype=jnp.dtype(jnp.float32),
        )

    def __call__(
        self,
        tokens: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike | None = None,
        *,
        segment_ids: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Hidden states of every position.

        Args:
          tokens: int [B, T] token ids.
          attention_mask: [B, T], nonzero on real tokens, 0 on padding (left, right or holes);
            an integer mask may hold segment ids (see `segment_ids_from`). None: all real.
          segment_ids: int [B, T] ids of the packed sequences of each row, 0 on padding.

        Returns:
          float32 [B, T, D] hidden states after the final norm. Rows of padding positions are
          finite but meaningless.

        Raises:
          ValueError: if `tokens` is not 2-D integer, or a mask / segment ids of another shape.
        """
        tokens_bt, seg_bt = prepare_inputs(tokens, attention_mask, segment_ids)
        return self.hidden(tokens_bt, seg_bt)

    def hidden(self, tokens_bt: jax.Array, segment_ids_bt: jax.Array | None) -> jax.Array:
        """`__call__` on validated inputs: int [B, T] tokens and segment ids (None: no padding)."""
        c = self.config
        pos_bt, _ = segment_layout(segment_ids_bt, tokens_bt.shape)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones(tokens_bt.shape, jnp.int32)
        angles_btk = pos_bt[..., None].astype(jnp.float32) * rope_frequencies(c)
        cos_btk, sin_btk = jnp.cos(angles_btk), jnp.sin(angles_btk)
        h_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(c.compute_dtype)
        unroll = c.layer_loop == "unroll" or (
            c.layer_loop == "auto" and c.remat == "none" and c.num_layers <= UNROLL_MAX_LAYERS
        )
        h_btd = run_blocks(
            self.layers, h_btd, cos_btk, sin_btk, segment_ids_bt, remat=c.remat, unroll=unroll
        )
        return self.norm(h_btd)

    def logits(self, h_btd: jax.Array, lm_head: nnx.Param | None = None) -> jax.Array:
        """float32 [B, T, V] next-token logits from hidden states, by `lm_head` [D, V] or, when
        None, the tied embedding; the product runs in the compute dtype."""
        dt = self.config.compute_dtype
        h_btd = h_btd.astype(dt)
        if lm_head is None:
            w_vd = self.embed[...].astype(dt)
            return jnp.einsum("btd,vd->btv", h_btd, w_vd, preferred_element_type=jnp.float32)
        w_dv = lm_head[...].astype(dt)
        return jnp.einsum("btd,dv->btv", h_btd, w_dv, preferred_element_type=jnp.float32)
