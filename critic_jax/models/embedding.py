"""Token embedding lookup that leaves the table where FSDP and tensor parallelism store it.

The table [V, D] is stored split by the logical rules: its vocabulary axis over the mesh axes of
"vocab" (tensor parallelism) and its model axis over those of "embed" (FSDP). Gathering it whole
for a lookup costs every device the whole table, and the lookup's gradient (a scatter-add) the
whole table again, then a reduction of that whole gradient: in the Llama-3-8B plan, several GiB a
chip. `lookup` instead runs in a `shard_map` on each device's own slice:

1. the token ids of the devices that share the model-axis split are gathered (int32, small);
2. each device reads the rows of its vocabulary range for those tokens, for its slice of the
   model axis, zero for tokens outside its range, and the vocabulary shards are summed (exactly
   one of them is nonzero for each token);
3. one all-to-all over the FSDP axes trades the gathered rows' model-axis slices for the
   device's own rows with the whole model axis.

The gradient follows the same path backwards and is scattered into the device's own slice of
the table, so neither the table nor its gradient is ever whole on a device. A table with no
more rows than the tokens a device gathers (a toy vocabulary), no multi-device mesh and rules
in scope, or an axis that does not divide its dimension take a plain `jnp.take` instead (under
a mesh, of the table gathered whole along its model axis: for a small table that moves fewer
bytes than the rows).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd


def _mesh_axes(mesh, names) -> tuple[str, ...]:
    """The axes of `names` (a rule's value: None, one name or a tuple) of size > 1."""
    if names is None:
        return ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(n for n in names if mesh.shape[n] > 1)


def lookup(table_vd: jax.Array, tokens_bt: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`table[tokens]` in `dtype`, [B, T, D], computed on the table's own shards (see above)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(core_spmd.get_logical_axis_rules() or ())
    if mesh.empty or mesh.size == 1 or not rules:
        return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)
    vocab = _mesh_axes(mesh, rules.get("vocab"))
    model = _mesh_axes(mesh, rules.get("embed"))
    batch = _mesh_axes(mesh, rules.get("batch"))
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    (v, d), b = table_vd.shape, tokens_bt.shape[0]
    group_tokens = b // size(batch) * size(model) * tokens_bt.shape[1]
    fits = (
        v > group_tokens  # else gathering the (small) table moves fewer bytes than the rows
        and set(model) <= set(batch)  # the model-axis split is traded for rows
        and not set(vocab) & (set(batch) | set(model))
        and v % size(vocab) == 0
        and d % size(model) == 0
        and b % size(batch) == 0
        and (vocab or model)
    )
    if not fits:
        whole = jax.sharding.PartitionSpec(rules.get("vocab"), None)
        table_vd = jax.lax.with_sharding_constraint(table_vd, whole)
        return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)

    def local(table_vd, tokens_bt):
        if model:
            tokens_bt = jax.lax.all_gather(tokens_bt, model, axis=0, tiled=True)
        rows = table_vd.shape[0]
        shard = 0
        for axis in vocab:
            shard = shard * mesh.shape[axis] + jax.lax.axis_index(axis)
        rel_bt = tokens_bt - shard * rows
        hit_bt = (rel_bt >= 0) & (rel_bt < rows)
        out = jnp.take(table_vd.astype(dtype), jnp.clip(rel_bt, 0, rows - 1), axis=0)
        out = jnp.where(hit_bt[..., None], out, jnp.zeros((), dtype))
        if vocab:
            out = jax.lax.psum(out, vocab)
        if model:
            out = jax.lax.all_to_all(out, model, split_axis=0, concat_axis=2, tiled=True)
        return out

    p = jax.sharding.PartitionSpec
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(p(vocab or None, model or None), p(batch or None, None)),
        out_specs=p(batch or None, None, None),
    )(table_vd, tokens_bt)
