"""Causal grouped-query attention over packed or padded sequences, with several kernels.

One function, `dot_product_attention`, serves padded and packed batches: a padding mask is the
special case of segment ids where every real token is in segment 1. Token t attends key s iff

    s <= t  and  seg[s] == seg[t] != 0,

and out_t = softmax_s(q_t · k_s / sqrt(H)) · v_s over those keys; queries with no key (padding)
return 0. Query head n reads kv head n // (N / G).

Implementations (all give the same numbers up to float rounding):

- "xla": query blocks of `block_size` against the keys up to their own end, all in one XLA graph.
  Fastest on CPU for short sequences; the backward keeps every block's scores, O(T²) memory.
- "xla-flash": a flash-attention loop in pure XLA (online softmax over key blocks; the blocks
  of the future and of other segments of a packed row are skipped) under a `jax.custom_vjp`
  whose backward recomputes the scores block by block from the output and the per-query
  logsumexp: memory linear in T, forward and backward. On CPU it is up to ~2x slower than "xla"
  on one long segment (it computes exp twice) and several times faster on packed rows.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only), causal
  with the segment mask passed as a boolean [B, 1, T, T] mask (cuDNN adds it as a bias).
- "splash": Pallas splash attention (TPU): a causal mask with `SegmentIds`, one MQA kernel per
  kv head (the query heads of a group share its keys), vmapped over kv heads and the batch, in
  a `shard_map` when a multi-device mesh is set (`jax.set_mesh`): Mosaic kernels cannot be
  partitioned by the compiler.
- "auto": cudnn on GPU for 16-bit inputs (xla-flash for float32), splash on TPU; on CPU "xla"
  up to `XLA_MAX_SEQ_LEN` tokens, else "xla-flash".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd as core_spmd

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "xla-flash", "cudnn", "splash")

# "auto" on CPU: the longest sequence for which the block-causal "xla" path is used; longer ones
# take "xla-flash", whose memory is linear in T. Measured (B=1, N=4, G=2, H=64, fwd+bwd, one
# segment): "xla" is faster up to T=1024 (5 vs 9 ms at 512, 17 vs 30 ms at 1024), the two are
# even at 2048, while "xla" keeps O(N·T²) scores per layer (87 MiB at 2048, 1.3 GiB at 8192).
XLA_MAX_SEQ_LEN = 1024

# Finite stand-in for -inf: a fully masked row stays NaN-free (exp(-1e30 - m) underflows to 0).
_NEG = -1e30
_SPLASH_LANES = 128  # splash attention's blocks are multiples of the TPU lane width


def dot_product_attention(
    q_btnh: jax.Array,
    k_bsgh: jax.Array,
    v_bsgh: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    implementation: str = "auto",
    block_size: int = 128,
) -> jax.Array:
    """Causal softmax attention within segments, grouped-query.

    out[b, t, n] = Σ_s p[b, n, t, s] · v[b, s, n // R],
    p[b, n, t, :] = softmax_s(q[b, t, n] · k[b, s, n // R] / sqrt(H)) over the keys s <= t with
    seg[b, s] == seg[b, t] != 0 (R = N / G). Softmax statistics are float32; the two products run
    in the inputs' dtype with float32 accumulation.

    Args:
      q_btnh: [B, T, N, H] queries, rotary applied, not pre-scaled.
      k_bsgh: [B, T, G, H] keys; G divides N.
      v_bsgh: [B, T, G, H] values.
      segment_ids_bt: int [B, T] segment of each token; 0 is padding. A 0/1 padding mask (left,
        right or with holes) is a valid argument. Whatever q, k and v hold at padding tokens
        (NaN and inf included) changes neither the output nor the gradients elsewhere.
      implementation: one of `ATTENTION_IMPLEMENTATIONS` (see the module docstring).
      block_size: query and key block length of "xla", "xla-flash" and "splash" ("splash"
        rounds it to a multiple of 128); 0 means one block of T.

    Returns:
      [B, T, N, H] in q's dtype; 0 at padding queries (segment 0).

    Raises:
      ValueError: on mismatched shapes or dtypes, N not a multiple of G, an unknown
        implementation, or "cudnn" with float32 inputs.
    """
    _check_inputs(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, block_size)
    seg_bt = jnp.asarray(segment_ids_bt).astype(jnp.int32)
    # Padding tokens are never read, but a NaN or inf there would still reach other rows through
    # the products and their gradients (0 · inf) or an additive mask; zeroed, it cannot.
    real_bt11 = (seg_bt != 0)[:, :, None, None]
    q_btnh = jnp.where(real_bt11, q_btnh, 0).astype(q_btnh.dtype)
    k_bsgh = jnp.where(real_bt11, k_bsgh, 0).astype(k_bsgh.dtype)
    v_bsgh = jnp.where(real_bt11, v_bsgh, 0).astype(v_bsgh.dtype)
    impl = choose_implementation(
        implementation, seq_len=q_btnh.shape[1], dtype=q_btnh.dtype, backend=None
    )
    if impl == "xla":
        return _xla_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, block_size=block_size)
    if impl == "xla-flash":
        # A block longer than the rows would only pad them (a block of T already reads all).
        block = block_size if 0 < block_size < q_btnh.shape[1] else q_btnh.shape[1]
        return _flash_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, block)
    if impl == "cudnn":
        return _cudnn_attention(q_btnh, k_bsgh, v_bsgh, seg_bt)
    return _splash_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, block_size=block_size)


def choose_implementation(
    implementation: str, *, seq_len: int, dtype: jnp.dtype, backend: str | None = None
) -> str:
    """The concrete implementation that `implementation` means for this shape and backend.

    "auto" resolves to "cudnn" on GPU for bfloat16/float16 inputs ("xla-flash" for float32,
    which cuDNN does not take), "splash" on TPU, and on CPU "xla" when `seq_len <=
    XLA_MAX_SEQ_LEN`, else "xla-flash". `backend` defaults to `jax.default_backend()`.

    Raises:
      ValueError: if `implementation` is not one of `ATTENTION_IMPLEMENTATIONS`, or is "cudnn"
        with an input dtype cuDNN does not support.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; valid: "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}. Received: {implementation!r}"
        )
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if implementation == "cudnn" and not sixteen_bit:
        raise ValueError(
            "The cudnn attention takes bfloat16 or float16 inputs only. "
            f"Received: {jnp.dtype(dtype)}"
        )
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "cudnn" if sixteen_bit and backend != "rocm" else "xla-flash"
    if backend == "tpu":
        return "splash"
    return "xla" if seq_len <= XLA_MAX_SEQ_LEN else "xla-flash"


def _check_inputs(q_btnh, k_bsgh, v_bsgh, segment_ids_bt, block_size) -> None:
    shapes = (
        f"q={tuple(q_btnh.shape)}, k={tuple(k_bsgh.shape)}, v={tuple(v_bsgh.shape)}, "
        f"segment_ids={tuple(np.shape(segment_ids_bt))}"
    )
    if q_btnh.ndim != 4 or k_bsgh.ndim != 4 or v_bsgh.shape != k_bsgh.shape:
        raise ValueError(
            "Shape mismatch: q must be [B, T, N, H] and k, v the same [B, T, G, H]. "
            f"Received: {shapes}"
        )
    b, t, n, h = q_btnh.shape
    if k_bsgh.shape[0] != b or k_bsgh.shape[1] != t or k_bsgh.shape[3] != h:
        raise ValueError(
            f"Shape mismatch: k and v must share q's batch, length and head dim. Received: {shapes}"
        )
    if n % k_bsgh.shape[2]:
        raise ValueError(
            f"The query heads N must be a multiple of the kv heads G. Received: {shapes}"
        )
    if tuple(np.shape(segment_ids_bt)) != (b, t):
        raise ValueError(f"Shape mismatch: segment_ids must be [B, T]. Received: {shapes}")
    seg_dtype = jnp.asarray(segment_ids_bt).dtype
    if not (jnp.issubdtype(seg_dtype, jnp.integer) or seg_dtype == jnp.bool_):
        raise ValueError(f"segment_ids must be integers. Received: {seg_dtype}")
    if not (q_btnh.dtype == k_bsgh.dtype == v_bsgh.dtype) or not jnp.issubdtype(
        q_btnh.dtype, jnp.floating
    ):
        raise ValueError(
            "q, k and v must share one floating dtype. "
            f"Received: {q_btnh.dtype}, {k_bsgh.dtype}, {v_bsgh.dtype}"
        )
    if not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"block_size must be a non-negative integer. Received: {block_size!r}")


def _zero_padding_queries(out_btnh: jax.Array, seg_bt: jax.Array) -> jax.Array:
    return jnp.where((seg_bt != 0)[:, :, None, None], out_btnh, 0).astype(out_btnh.dtype)


# ----------------------------------------------------------------------------- xla


def _attend(
    q_bgrth: jax.Array, k_bgsh: jax.Array, v_bgsh: jax.Array, bias_bts: jax.Array
) -> jax.Array:
    """Softmax attention of queries [B, G, R, Tq, H] over keys/values [B, G, S, H].

    `bias_bts` [B, Tq, S] is added to the scores: 0 where a query may read a key, `_NEG` where it
    may not. An addition (rather than a select on a boolean mask) fuses into the score product on
    XLA:CPU, and its gradient is the identity, so neither pass writes the [.., Tq, S] scores an
    extra time (5% of a train step in `experiments/bench_train_step.py`). Queries are scaled
    before the product ([.., Tq, H] numbers, not [.., Tq, S]). The probabilities are left
    unnormalised (exp(s - max)) through the value product and the [.., Tq, H] output is divided
    by their sum afterwards, for the same reason. The scores, max and sum are float32; the two
    products run in the inputs' dtype.
    """
    b, g, r, tq, h = q_bgrth.shape
    q_bgrth = q_bgrth * jnp.asarray(1.0 / math.sqrt(h), q_bgrth.dtype)
    scores_bgqs = jnp.einsum(
        "bgqh,bgsh->bgqs",
        q_bgrth.reshape(b, g, r * tq, h),
        k_bgsh,
        preferred_element_type=jnp.float32,
    )
    scores_bgrts = scores_bgqs.reshape(b, g, r, tq, -1) + bias_bts[:, None, None]
    # Shifting by the row max changes nothing mathematically, so it carries no gradient.
    shift_bgrt1 = jax.lax.stop_gradient(jnp.max(scores_bgrts, axis=-1, keepdims=True))
    weights_bgrts = jnp.exp(scores_bgrts - shift_bgrt1)
    total_bgrt1 = jnp.sum(weights_bgrts, axis=-1, keepdims=True)
    out_bgqh = jnp.einsum(
        "bgqs,bgsh->bgqh",
        weights_bgrts.astype(v_bgsh.dtype).reshape(b, g, r * tq, -1),
        v_bgsh,
        preferred_element_type=jnp.float32,
    )
    out_bgrth = out_bgqh.reshape(b, g, r, tq, h) / total_bgrt1
    return out_bgrth.astype(v_bgsh.dtype)


def _xla_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, *, block_size: int) -> jax.Array:
    # Heads lead and each group's queries are stacked along one axis (q = r*Tq + t), so both
    # products are plain batched matmuls over (b, g): on CPU this layout runs ~1.5-1.8x faster
    # than 5-D einsums over (t, g, r).
    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    q_bgrth = q_btnh.reshape(b, t, g, n // g, h).transpose(0, 2, 3, 1, 4)
    k_bgsh = k_bsgh.transpose(0, 2, 1, 3)
    v_bgsh = v_bsgh.transpose(0, 2, 1, 3)
    pos_t = jnp.arange(t)
    block = block_size if 0 < block_size < t else t
    outs = []
    # Query block [lo, hi) reads keys [0, hi) only: the rest is masked by causality.
    for lo in range(0, t, block):
        hi = min(lo + block, t)
        seg_q_bt = seg_bt[:, lo:hi]
        valid_bts = (
            (seg_q_bt[:, :, None] == seg_bt[:, None, :hi])
            & (seg_q_bt != 0)[:, :, None]
            & (pos_t[lo:hi, None] >= pos_t[None, :hi])[None]
        )
        bias_bts = jnp.where(valid_bts, 0.0, _NEG).astype(jnp.float32)
        outs.append(
            _attend(q_bgrth[:, :, :, lo:hi], k_bgsh[:, :, :hi], v_bgsh[:, :, :hi], bias_bts)
        )
    out_bgrth = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out_btnh = out_bgrth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return _zero_padding_queries(out_btnh, seg_bt)


# ----------------------------------------------------------------------------- xla-flash
#
# Layout: sequences are padded to nb * block tokens (padding in segment 0) and cut into blocks
# that lead, [nb, B, G, R*block, H] for queries (the R heads of a group stacked, row r*block + t)
# and [nb, B, G, block, H] for keys and values, so a block is one dynamic index and both
# products are batched matmuls over (b, g). Query block i reads key blocks lo[i]..i only, where
# lo[i] is the block of the earliest token of any segment present in block i: future blocks are
# skipped, and so are the blocks of earlier segments of a packed row.


def _flash_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, block: int) -> jax.Array:
    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    r = n // g
    nb = -(-t // block)
    pad = nb * block - t
    if pad:
        q_btnh = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k_bsgh = jnp.pad(k_bsgh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_bsgh = jnp.pad(v_bsgh, ((0, 0), (0, pad), (0, 0), (0, 0)))
        seg_bt = jnp.pad(seg_bt, ((0, 0), (0, pad)))
    q_xbgqh = (
        q_btnh.reshape(b, nb, block, g, r, h)
        .transpose(1, 0, 3, 4, 2, 5)
        .reshape(nb, b, g, r * block, h)
    )
    k_xbgkh = k_bsgh.reshape(b, nb, block, g, h).transpose(1, 0, 3, 2, 4)
    v_xbgkh = v_bsgh.reshape(b, nb, block, g, h).transpose(1, 0, 3, 2, 4)
    seg_xbk = seg_bt.reshape(b, nb, block).transpose(1, 0, 2)
    out_xbgqh = _flash(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk)
    out_btnh = (
        out_xbgqh.reshape(nb, b, g, r, block, h)
        .transpose(1, 0, 4, 2, 3, 5)
        .reshape(b, nb * block, n, h)
    )
    return out_btnh[:, :t]


def _segment_extents(seg_xbk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 [nb]: first key block read by each query block, and 1 + last query block reading
    each key block, over the whole batch (a loop bound is one scalar).

    Each token's segment reaches from the first to the last occurrence of its id in its row
    (holes included), found by one stable sort: O(T log T), not O(T²).
    """
    nb, b, block = seg_xbk.shape
    t = nb * block
    seg_bt = seg_xbk.transpose(1, 0, 2).reshape(b, t)
    order_bt = jnp.argsort(seg_bt, axis=-1, stable=True)
    sorted_bt = jnp.take_along_axis(seg_bt, order_bt, axis=-1)
    rank_t = jnp.arange(t)
    change_bt = sorted_bt[:, 1:] != sorted_bt[:, :-1]
    starts_bt = jnp.concatenate([jnp.ones((b, 1), bool), change_bt], axis=-1)
    ends_bt = jnp.concatenate([change_bt, jnp.ones((b, 1), bool)], axis=-1)
    # Within a run of equal ids the stable sort keeps positions ascending: the run's first rank
    # holds the earliest position, its last rank the latest.
    start_rank_bt = jax.lax.cummax(jnp.where(starts_bt, rank_t, 0), axis=1)
    end_rank_bt = jax.lax.cummin(jnp.where(ends_bt, rank_t, t), axis=1, reverse=True)
    first_sorted_bt = jnp.take_along_axis(order_bt, start_rank_bt, axis=-1)
    last_sorted_bt = jnp.take_along_axis(order_bt, end_rank_bt, axis=-1)
    inverse_bt = jnp.argsort(order_bt, axis=-1)
    first_bt = jnp.take_along_axis(first_sorted_bt, inverse_bt, axis=-1)
    last_bt = jnp.take_along_axis(last_sorted_bt, inverse_bt, axis=-1)
    real_bt = seg_bt != 0  # padding neither reads nor is read
    first_x = jnp.min(jnp.where(real_bt, first_bt, t).reshape(b, nb, block), axis=(0, 2))
    last_x = jnp.max(jnp.where(real_bt, last_bt, -1).reshape(b, nb, block), axis=(0, 2))
    x = jnp.arange(nb, dtype=jnp.int32)
    lo_x = jnp.minimum(first_x // block, x + 1)  # x + 1: a block of padding reads nothing
    hi_x = jnp.maximum(jnp.where(last_x >= 0, last_x // block + 1, 0), x)
    return lo_x.astype(jnp.int32), jnp.minimum(hi_x, nb).astype(jnp.int32)


def _block_mask(seg_xbk: jax.Array, i: jax.Array, j: jax.Array, r: int) -> jax.Array:
    """bool [B, 1, R*block, block]: may query row (r, t) of block i read key s of block j."""
    seg_q_bk = jax.lax.dynamic_index_in_dim(seg_xbk, i, keepdims=False)
    seg_k_bk = jax.lax.dynamic_index_in_dim(seg_xbk, j, keepdims=False)
    block = seg_q_bk.shape[-1]
    seg_q_bq = jnp.tile(seg_q_bk, (1, r))
    pos_q = i * block + jnp.tile(jnp.arange(block), r)
    pos_k = j * block + jnp.arange(block)
    valid_bqk = (
        (seg_q_bq[:, :, None] == seg_k_bk[:, None, :])
        & (seg_q_bq != 0)[:, :, None]
        & (pos_q[:, None] >= pos_k[None, :])[None]
    )
    return valid_bqk[:, None]


def _scores(q_bgqh, k_bgkh) -> jax.Array:
    s_bgqk = jnp.einsum("bgqh,bgkh->bgqk", q_bgqh, k_bgkh, preferred_element_type=jnp.float32)
    return s_bgqk * (1.0 / math.sqrt(q_bgqh.shape[-1]))


def _flash_forward(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk):
    """Online softmax over key blocks.

    Returns (out [nb, B, G, Q, H] in q's dtype, float32 logsumexp [nb, B, G, Q]).
    """
    nb, b, g, rq, h = q_xbgqh.shape
    r = rq // k_xbgkh.shape[3]

    lo_x, _ = _segment_extents(seg_xbk)

    def query_block(_, i):
        q_bgqh = jax.lax.dynamic_index_in_dim(q_xbgqh, i, keepdims=False)

        def key_block(j, carry):
            m_bgq, l_bgq, acc_bgqh = carry
            k_bgkh = jax.lax.dynamic_index_in_dim(k_xbgkh, j, keepdims=False)
            v_bgkh = jax.lax.dynamic_index_in_dim(v_xbgkh, j, keepdims=False)
            valid = _block_mask(seg_xbk, i, j, r)
            s_bgqk = jnp.where(valid, _scores(q_bgqh, k_bgkh), _NEG)
            m_new = jnp.maximum(m_bgq, jnp.max(s_bgqk, axis=-1))
            p_bgqk = jnp.where(valid, jnp.exp(s_bgqk - m_new[..., None]), 0.0)
            alpha = jnp.exp(m_bgq - m_new)
            l_new = alpha * l_bgq + jnp.sum(p_bgqk, axis=-1)
            pv_bgqh = jnp.einsum(
                "bgqk,bgkh->bgqh",
                p_bgqk.astype(v_bgkh.dtype),
                v_bgkh,
                preferred_element_type=jnp.float32,
            )
            return m_new, l_new, alpha[..., None] * acc_bgqh + pv_bgqh

        init = (
            jnp.full((b, g, rq), _NEG, jnp.float32),
            jnp.zeros((b, g, rq), jnp.float32),
            jnp.zeros((b, g, rq, h), jnp.float32),
        )
        # Key blocks after i are in the future, those before lo[i] in other segments: skipped.
        m_bgq, l_bgq, acc_bgqh = jax.lax.fori_loop(lo_x[i], i + 1, key_block, init)
        seen = l_bgq > 0  # False only for padding queries
        out_bgqh = jnp.where(seen[..., None], acc_bgqh / jnp.where(seen, l_bgq, 1.0)[..., None], 0)
        lse_bgq = jnp.where(seen, m_bgq + jnp.log(jnp.where(seen, l_bgq, 1.0)), 0.0)
        return None, (out_bgqh.astype(q_xbgqh.dtype), lse_bgq)

    _, (out_xbgqh, lse_xbgq) = jax.lax.scan(query_block, None, jnp.arange(nb, dtype=jnp.int32))
    return out_xbgqh, lse_xbgq


@jax.custom_vjp
def _flash(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk):
    return _flash_forward(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk)[0]


def _flash_fwd(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk):
    out_xbgqh, lse_xbgq = _flash_forward(q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk)
    return out_xbgqh, (q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk, out_xbgqh, lse_xbgq)


def _flash_bwd(res, dout_xbgqh):
    """FlashAttention-2 backward: key blocks outside, the query blocks that read them inside.

    p = exp(s - lse), dv_j = Σ_i pᵀ do_i, dp = do_i v_jᵀ, ds = p (dp - Σ_h do_i o_i) / sqrt(H),
    dk_j = Σ_i dsᵀ q_i, dq_i = Σ_j ds k_j. dq is a float32 carry; dk_j, dv_j are the scan's outputs.
    """
    q_xbgqh, k_xbgkh, v_xbgkh, seg_xbk, out_xbgqh, lse_xbgq = res
    nb, b, g, rq, h = q_xbgqh.shape
    block = k_xbgkh.shape[3]
    r = rq // block
    scale = 1.0 / math.sqrt(h)
    dt = q_xbgqh.dtype
    delta_xbgq = jnp.sum(dout_xbgqh.astype(jnp.float32) * out_xbgqh.astype(jnp.float32), axis=-1)

    _, hi_x = _segment_extents(seg_xbk)

    def key_block(dq_xbgqh, j):
        k_bgkh = jax.lax.dynamic_index_in_dim(k_xbgkh, j, keepdims=False)
        v_bgkh = jax.lax.dynamic_index_in_dim(v_xbgkh, j, keepdims=False)

        def query_block(i, carry):
            dq_xbgqh, dk_bgkh, dv_bgkh = carry
            q_bgqh = jax.lax.dynamic_index_in_dim(q_xbgqh, i, keepdims=False)
            do_bgqh = jax.lax.dynamic_index_in_dim(dout_xbgqh, i, keepdims=False)
            lse_bgq = jax.lax.dynamic_index_in_dim(lse_xbgq, i, keepdims=False)
            delta_bgq = jax.lax.dynamic_index_in_dim(delta_xbgq, i, keepdims=False)
            valid = _block_mask(seg_xbk, i, j, r)
            s_bgqk = _scores(q_bgqh, k_bgkh)
            p_bgqk = jnp.where(valid, jnp.exp(s_bgqk - lse_bgq[..., None]), 0.0)
            dv_bgkh += jnp.einsum(
                "bgqk,bgqh->bgkh", p_bgqk.astype(dt), do_bgqh, preferred_element_type=jnp.float32
            )
            dp_bgqk = jnp.einsum(
                "bgqh,bgkh->bgqk", do_bgqh, v_bgkh, preferred_element_type=jnp.float32
            )
            ds_bgqk = (p_bgqk * (dp_bgqk - delta_bgq[..., None]) * scale).astype(dt)
            dk_bgkh += jnp.einsum(
                "bgqk,bgqh->bgkh", ds_bgqk, q_bgqh, preferred_element_type=jnp.float32
            )
            dq_bgqh = jnp.einsum(
                "bgqk,bgkh->bgqh", ds_bgqk, k_bgkh, preferred_element_type=jnp.float32
            )
            dq_i = jax.lax.dynamic_index_in_dim(dq_xbgqh, i, keepdims=False) + dq_bgqh
            dq_xbgqh = jax.lax.dynamic_update_index_in_dim(dq_xbgqh, dq_i, i, 0)
            return dq_xbgqh, dk_bgkh, dv_bgkh

        zeros_bgkh = jnp.zeros((b, g, block, h), jnp.float32)
        # Query blocks before j cannot see key block j, those from hi[j] on are in later
        # segments: skipped.
        dq_xbgqh, dk_bgkh, dv_bgkh = jax.lax.fori_loop(
            j, hi_x[j], query_block, (dq_xbgqh, zeros_bgkh, zeros_bgkh)
        )
        return dq_xbgqh, (dk_bgkh.astype(k_xbgkh.dtype), dv_bgkh.astype(v_xbgkh.dtype))

    dq_xbgqh = jnp.zeros(q_xbgqh.shape, jnp.float32)
    blocks = jnp.arange(nb, dtype=jnp.int32)  # int32 loop bounds, with or without x64
    dq_xbgqh, (dk_xbgkh, dv_xbgkh) = jax.lax.scan(key_block, dq_xbgqh, blocks)
    dseg = np.zeros(seg_xbk.shape, jax.dtypes.float0)
    return dq_xbgqh.astype(dt), dk_xbgkh, dv_xbgkh, dseg


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cudnn


def _cudnn_attention(q_btnh, k_bsgh, v_bsgh, seg_bt) -> jax.Array:
    # jax.nn.dot_product_attention takes no segment ids; its packed-sequence route (q_offsets /
    # q_seqlen of jax._src.cudnn) needs contiguous segments and a static segment count, which a
    # padding mask with holes breaks. A boolean [B, 1, T, T] mask covers every case; it costs
    # B·T² bytes (one per batch row, not per head), far below the per-head scores it avoids.
    mask_b1ts = ((seg_bt[:, :, None] == seg_bt[:, None, :]) & (seg_bt != 0)[:, :, None])[:, None]
    out_btnh = jax.nn.dot_product_attention(
        q_btnh, k_bsgh, v_bsgh, mask=mask_b1ts, is_causal=True, implementation="cudnn"
    )
    return _zero_padding_queries(out_btnh, seg_bt)


# ----------------------------------------------------------------------------- splash


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, seq_len: int, block: int):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes)


def _splash_attention(q_btnh, k_bsgh, v_bsgh, seg_bt, *, block_size: int) -> jax.Array:
    """Splash attention, inside a `shard_map` when a multi-device mesh is in scope.

    Mosaic kernels cannot be partitioned by the compiler, so under `jax.set_mesh(mesh)` each
    device runs the kernel on its own batch rows and kv heads: the batch is split over the mesh
    axes of the logical name "batch" and the heads over those of "kv_heads" (the rules of
    `nnx.logical_axis_rules` in scope; without rules, the batch over every mesh axis). An axis
    whose size does not divide the dimension is dropped, so that dimension is replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q_btnh, k_bsgh, v_bsgh, seg_bt, block_size=block_size)
    rules = dict(core_spmd.get_logical_axis_rules() or ())
    if rules:
        batch_axes, head_axes = rules.get("batch"), rules.get("kv_heads")
    else:
        batch_axes, head_axes = mesh.axis_names, None
    batch = _dividing_axes(mesh, batch_axes, q_btnh.shape[0])
    heads = _dividing_axes(mesh, head_axes, k_bsgh.shape[2])
    qkv_spec = jax.P(batch, None, heads, None)
    local = functools.partial(_splash_local, block_size=block_size)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, jax.P(batch, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q_btnh, k_bsgh, v_bsgh, seg_bt)


def _dividing_axes(mesh, names, size: int) -> tuple[str, ...] | None:
    """The mesh axes among `names` (one name or several) whose product of sizes divides `size`."""
    if names is None:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    names = tuple(a for a in names if a in mesh.axis_names)
    parts = math.prod(mesh.shape[a] for a in names)
    return names if names and size % parts == 0 else None


def _splash_local(q_btnh, k_bsgh, v_bsgh, seg_bt, *, block_size: int) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_btnh.shape
    g = k_bsgh.shape[2]
    r = n // g
    # The kernel needs whole blocks of a lane multiple; padded tokens are segment 0, which real
    # tokens never read (padding queries read padding keys, so no softmax row is empty).
    block = max(_SPLASH_LANES, -(-(block_size or t) // _SPLASH_LANES) * _SPLASH_LANES)
    tp = -(-t // _SPLASH_LANES) * _SPLASH_LANES
    block = math.gcd(min(block, tp), tp)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    scale = np.asarray(1.0 / math.sqrt(h), q_btnh.dtype)
    q_bgrth = jnp.pad(q_btnh * scale, pad).reshape(b, tp, g, r, h).transpose(0, 2, 3, 1, 4)
    k_bgsh = jnp.pad(k_bsgh, pad).transpose(0, 2, 1, 3)
    v_bgsh = jnp.pad(v_bsgh, pad).transpose(0, 2, 1, 3)
    seg_bt = jnp.pad(seg_bt, ((0, 0), (0, tp - t)))
    kernel = _splash_kernel(r, tp, block)

    def one_group(q_rth, k_sh, v_sh, seg_t):
        return kernel(q_rth, k_sh, v_sh, splash.SegmentIds(q=seg_t, kv=seg_t))

    per_group = jax.vmap(one_group, in_axes=(0, 0, 0, None))
    out_bgrth = jax.vmap(per_group)(q_bgrth, k_bgsh, v_bgsh, seg_bt)
    out_btnh = out_bgrth.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]
    return _zero_padding_queries(out_btnh.astype(q_btnh.dtype), seg_bt[:, :t])
