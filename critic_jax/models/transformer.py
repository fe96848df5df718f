"""A Llama-family decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

The same code covers Llama 2/3 (with linear and Llama-3 rope scaling) and Qwen2 (q/k/v bias).
Every parameter names its axes with the logical names of `critic_jax.parallel.LOGICAL_AXIS_RULES`,
so one rule table places the model on any mesh. Parameters are stored in `param_dtype`, the
activations are computed in `dtype`; the norms, the attention softmax statistics, the rotary
angles and the final hidden states are float32.

The decoder blocks are one `Block` whose parameters are stacked on a leading "layers" axis;
`Transformer.__call__` runs them with one `jax.lax.scan` over a pure block function (split/merge),
so a block is traced and compiled once whatever the depth (`ModelConfig.layer_loop` may write the
scan out for shallow stacks), and `jax.checkpoint` with the configured policy
(`ModelConfig.remat`) wraps that pure function. `ModelConfig` lives in `config`, the segment
helpers in `segments`; both are re-exported here.

Sequences are described by segment ids: int [B, T], 0 on padding, and tokens with the same
nonzero id form one sequence (a packed row holds several). A 0/1 attention mask is the one-segment
case. Attention is causal within a segment; positions count the earlier tokens of the same
segment, so a left-padded, right-padded, unpadded or packed sequence gives the same hidden states
on its real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.ad_checkpoint import checkpoint_name

from critic_jax.models.attention import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from critic_jax.models.config import (
    DTYPES,
    LAYER_LOOPS,
    PRESETS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    UNROLL_MAX_LAYERS,
    VALUE_HEAD_INITS,
    VALUE_HEADS,
    ModelConfig,
)
from critic_jax.models.embedding import lookup
from critic_jax.models.segments import prepare_inputs, segment_ids_from, segment_layout

# Re-exported: the config and segment helpers were first defined here.
__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "DTYPES",
    "LAYER_LOOPS",
    "PRESETS",
    "REMAT_POLICIES",
    "ROPE_SCALINGS",
    "UNROLL_MAX_LAYERS",
    "VALUE_HEADS",
    "VALUE_HEAD_INITS",
    "Attention",
    "Block",
    "MLP",
    "ModelConfig",
    "RMSNorm",
    "Transformer",
    "make_param",
    "partitioned",
    "prepare_inputs",
    "rope_frequencies",
    "run_blocks",
    "segment_ids_from",
    "segment_layout",
]


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
        h_btd = lookup(self.embed[...], tokens_bt, c.compute_dtype)
        h_btd = run_blocks(
            self.layers, h_btd, cos_btk, sin_btk, segment_ids_bt, remat=c.remat, unroll=c.unrolled
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
