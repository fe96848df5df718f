"""Segment ids of padded and packed rows: where each token sits in its own sequence.

Sequences are described by segment ids: int [B, T], 0 on padding, and tokens with the same
nonzero id form one sequence (a packed row holds several). A 0/1 attention mask is the
one-segment case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
