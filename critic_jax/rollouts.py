"""The Parquet rollout schema: write, read and validate rollouts from any RL system.

One row per sequence; token columns are list columns whose lists may have any length as long as
the columns of one row agree:

| column | type | meaning |
|---|---|---|
| `tokens` | list<int> | token ids (prompt then response) |
| `attention_mask` | list<int or bool> | 1 on real tokens, 0 on padding |
| `mask` | list<bool, int or float> | 1 where token t is an action whose loss counts |
| `rewards` | list<float> | reward for emitting token t (or use `sequence_reward`) |
| `sequence_reward` | float | one reward per row, placed on its last action |
| `old_values` | list<float>, optional | the critic's values at rollout time |
| `logprobs`, `ref_logprobs` | list<float>, optional | for the KL penalty (`data.kl_coef`) |
| `true_values`, `true_advantages` | list<float>, optional | known V*, A* (synthetic data) |

`read_rollouts` validates every row and right-pads all rows to one width `T` (the longest row, or
`max_len`). `write_rollouts` writes this schema. Only this module and `data` import pyarrow.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from critic_jax.rewards import KL_KINDS, kl_penalty, token_rewards

TOKEN_COLUMNS = ("tokens", "attention_mask", "mask")
FLOAT_COLUMNS = (
    "rewards",
    "old_values",
    "logprobs",
    "ref_logprobs",
    "true_values",
    "true_advantages",
)
_LIST_COLUMNS = TOKEN_COLUMNS + FLOAT_COLUMNS
_WRITE_TYPES = {
    "tokens": pa.int32(),
    "attention_mask": pa.int8(),
    "mask": pa.bool_(),
    **{name: pa.float32() for name in FLOAT_COLUMNS},
}


class RolloutError(ValueError):
    """A rollout file that cannot be trained on; the message names the file, row and column."""


def write_rollouts(
    path: str | os.PathLike,
    batch: Mapping[str, np.ndarray],
    *,
    strip_padding: bool = False,
    compression: str = "zstd",
) -> None:
    """Writes a rollout batch as a Parquet file in the rollout schema.

    Token columns become list columns: `tokens` list<int32>, `attention_mask` list<int8>,
    `mask` list<bool>, and `rewards`, `old_values`, `logprobs`, `ref_logprobs`, `true_values`
    list<float32> when present; `sequence_reward` is a float32 column. Every row's lists have the
    full width T unless `strip_padding` drops each row's trailing padding (attention_mask 0), which
    `read_rollouts(..., max_len=T)` pads back. The file is written beside its destination and
    renamed into place, so a reader never sees half a file.

    Args:
      path: destination file; parent folders are created.
      batch: tokens [B, T], attention_mask [B, T], mask [B, T], and rewards [B, T] and/or
        sequence_reward [B]; optionally old_values, logprobs, ref_logprobs, true_values [B, T].
      strip_padding: store each row only up to its last attended token.
      compression: Parquet compression codec.

    Raises:
      ValueError: on a missing or unknown key, no reward column, or mismatched shapes.
    """
    known = set(_LIST_COLUMNS) | {"sequence_reward"}
    unknown = sorted(set(batch) - known)
    missing = [k for k in TOKEN_COLUMNS if k not in batch]
    if unknown or missing:
        raise ValueError(
            f"write_rollouts: batch keys must include {list(TOKEN_COLUMNS)} and may add "
            f"{sorted(known - set(TOKEN_COLUMNS))}. Received: missing {missing}, unknown {unknown}"
        )
    if "rewards" not in batch and "sequence_reward" not in batch:
        raise ValueError(
            "write_rollouts: batch needs 'rewards' [B, T] or 'sequence_reward' [B]. "
            f"Received keys: {sorted(batch)}"
        )
    tokens = np.asarray(batch["tokens"])
    if tokens.ndim != 2:
        raise ValueError(f"write_rollouts: tokens must be [B, T]. Received: shape {tokens.shape}")
    rows, width = tokens.shape
    for k, v in batch.items():
        want = (rows,) if k == "sequence_reward" else (rows, width)
        if np.shape(v) != want:
            raise ValueError(
                f"Shape mismatch: write_rollouts got tokens {tokens.shape} and {k} "
                f"{np.shape(v)}; expected {want}."
            )
    attention = np.asarray(batch["attention_mask"]) != 0
    if strip_padding:
        col = np.arange(width)
        lengths = np.where(attention.any(-1), (np.where(attention, col, -1)).max(-1) + 1, 0)
    else:
        lengths = np.full(rows, width)
    keep = np.arange(width)[None, :] < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    columns = {}
    for k in _LIST_COLUMNS:
        if k in batch:
            values = np.asarray(batch[k])
            if k in ("attention_mask", "mask"):
                values = values != 0
            flat = pa.array(values[keep]).cast(_WRITE_TYPES[k])
            columns[k] = pa.ListArray.from_arrays(pa.array(offsets), flat)
    if "sequence_reward" in batch:
        columns["sequence_reward"] = pa.array(
            np.asarray(batch["sequence_reward"]), type=pa.float32()
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(columns), tmp, compression=compression)
    os.replace(tmp, path)


def _resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise RolloutError(f"No rollout files given (an empty list of paths). Received: {paths!r}")
    files: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.parquet")))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
        else:
            found = [item]
        if not found:
            raise RolloutError(f"No Parquet files match {item!r}.")
        files.extend(found)
    for f in files:
        if not os.path.isfile(f):
            raise RolloutError(f"{f}: no such file.")
    return files


def _list_type_ok(name: str, value_type: pa.DataType) -> bool:
    if name == "tokens":
        return pa.types.is_integer(value_type)
    if name == "attention_mask":
        return pa.types.is_integer(value_type) or pa.types.is_boolean(value_type)
    if name == "mask":
        return (
            pa.types.is_integer(value_type)
            or pa.types.is_boolean(value_type)
            or pa.types.is_floating(value_type)
        )
    return pa.types.is_floating(value_type)


_EXPECTED_TYPE = {
    "tokens": "a list of integers",
    "attention_mask": "a list of integers or booleans",
    "mask": "a list of booleans, integers or floats",
    **{name: "a list of floats" for name in FLOAT_COLUMNS},
}


def _read_file(
    file: str, *, vocab_size: int | None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """Reads and validates one file: (row lengths [N], flat token columns [sum N], seq reward)."""
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as e:
        raise RolloutError(f"{file}: cannot be read as Parquet ({e}).") from e

    def fail(row: int | None, column: str, what: str):
        where = f"{file}: " + (f"row {row}, " if row is not None else "") + f"column {column!r}"
        raise RolloutError(f"{where}: {what}")

    names = set(table.column_names)
    for name in TOKEN_COLUMNS:
        if name not in names:
            fail(None, name, f"missing (the file has columns {sorted(names)}).")
    if "rewards" not in names and "sequence_reward" not in names:
        raise RolloutError(
            f"{file}: needs a 'rewards' column (token-level) or a 'sequence_reward' column; it "
            f"has columns {sorted(names)}."
        )

    lengths = None
    flat: dict[str, np.ndarray] = {}
    for name in _LIST_COLUMNS:
        if name not in names:
            continue
        column = table.column(name).combine_chunks()
        kind = column.type
        if not (
            pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
        ):
            fail(None, name, f"has type {kind}; expected {_EXPECTED_TYPE[name]}.")
        if not _list_type_ok(name, kind.value_type):
            fail(None, name, f"has type {kind}; expected {_EXPECTED_TYPE[name]}.")
        if column.null_count:
            fail(int(np.flatnonzero(column.is_null())[0]), name, "is null.")
        n = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(column)
        if values.null_count:
            first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            row = int(np.searchsorted(np.cumsum(n), first, side="right"))
            fail(row, name, "holds a null value.")
        if lengths is None:
            lengths = n
        elif (bad := np.flatnonzero(n != lengths)).size:
            r = int(bad[0])
            fail(r, name, f"has {n[r]} entries but 'tokens' has {lengths[r]} (ragged row).")
        flat[name] = values.to_numpy(zero_copy_only=False)
    assert lengths is not None
    if len(lengths) == 0:
        raise RolloutError(f"{file}: the file has no rows (an empty rollout file).")
    if (empty := np.flatnonzero(lengths == 0)).size:
        fail(int(empty[0]), "tokens", "is an empty list (a rollout needs at least one token).")
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def fail_at(column: str, bad: np.ndarray, what: str):
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(starts, i, side="right") - 1)
        fail(row, column, f"position {i - starts[row]}: {what}")

    tokens = flat["tokens"]
    low = tokens < 0
    if low.any():
        fail_at("tokens", low, f"token id {tokens[low][0]} is negative.")
    if vocab_size is None:
        if (high := tokens > np.iinfo(np.int32).max).any():
            fail_at("tokens", high, f"token id {tokens[high][0]} does not fit int32.")
    elif (high := tokens >= vocab_size).any():
        fail_at(
            "tokens",
            high,
            f"token id {tokens[high][0]} >= vocab_size {vocab_size}: outside the model's "
            f"vocabulary [0, {vocab_size}).",
        )
    attention = flat["attention_mask"].astype(np.int64)
    if (bad := (attention != 0) & (attention != 1)).any():
        fail_at("attention_mask", bad, f"value {attention[bad][0]} is not 0 or 1.")
    mask = flat["mask"].astype(np.float64)
    if (bad := ~np.isfinite(mask)).any():
        fail_at("mask", bad, "is not finite.")
    if (bad := (mask != 0) & (attention == 0)).any():
        fail_at("mask", bad, "marks padding (attention_mask 0) as an action.")
    valid = mask != 0
    if not valid.any():
        raise RolloutError(
            f"{file}: column 'mask' is 0 in every row: the file holds no action token, so "
            "nothing in it can be trained on."
        )
    for name in FLOAT_COLUMNS:
        if name in flat:
            x = flat[name].astype(np.float32)
            if (bad := valid & ~np.isfinite(x)).any():
                fail_at(name, bad, f"value {x[bad][0]} at an action position.")
            flat[name] = np.where(valid, x, np.float32(0))
    flat["mask"] = valid.astype(np.float32)
    flat["attention_mask"] = attention.astype(np.int32)
    flat["tokens"] = tokens.astype(np.int32)

    sequence_reward = None
    if "sequence_reward" in names:
        column = table.column("sequence_reward").combine_chunks()
        if not pa.types.is_floating(column.type):
            fail(None, "sequence_reward", f"has type {column.type}; expected a float.")
        if column.null_count:
            fail(int(np.flatnonzero(column.is_null())[0]), "sequence_reward", "is null.")
        sequence_reward = column.to_numpy(zero_copy_only=False).astype(np.float32)
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        row_valid = np.bincount(row_of[valid], minlength=len(lengths)) > 0
        if (bad := row_valid & ~np.isfinite(sequence_reward)).any():
            r = int(np.flatnonzero(bad)[0])
            fail(r, "sequence_reward", f"value {sequence_reward[r]} in a row with actions.")
        sequence_reward = np.where(row_valid, sequence_reward, np.float32(0))
    return lengths, flat, sequence_reward


def read_rollouts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    vocab_size: int | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
    kl_clamp: float | None = None,
    max_len: int | None = None,
) -> dict[str, np.ndarray]:
    """Reads and validates Parquet rollouts into fixed-width token-level arrays.

    Every row is checked, and the first problem raises an error naming the file, the row and the
    column: a missing column, a wrong type, a null, lists of different lengths within a row, a
    token id < 0 or >= vocab_size, an attention_mask other than 0/1, a mask that marks padding
    as an action, or NaN/inf at an action position. Non-finite values off the mask are zeroed.

    Rewards: a `rewards` column is used as is; otherwise `sequence_reward` goes on each row's
    last action (`critic_jax.token_rewards`). With kl_coef > 0 the files need `logprobs` and
    `ref_logprobs`, and `kl_coef * kl_penalty(logprobs, ref_logprobs)` is subtracted at every
    action in either case.

    Args:
      paths: a file, a folder of `*.parquet`, a glob, or a list of these.
      vocab_size: if given, token ids must be below it.
      kl_coef: weight of the KL penalty (>= 0).
      kl_kind: "k1", "k2" or "k3" (see `critic_jax.kl_penalty`).
      kl_clamp: optional bound on the per-token KL estimate.
      max_len: width T of the output; rows must fit. None: the longest row of all files.

    Returns:
      tokens int32 [N, T] (right-padded with PAD = 0), attention_mask int32 [N, T], mask
      float32 [N, T], rewards float32 [N, T] (0 off the mask), and old_values, logprobs,
      ref_logprobs, true_values float32 [N, T] when every file has them.

    Raises:
      RolloutError (a ValueError): on any invalid file, row or column (an empty row, a token
        outside the vocabulary, a shaped reward that overflows), no paths, or a file with no
        rows or no action token.
    """
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}. Received: {kl_kind!r}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be finite and >= 0. Received: {kl_coef}")
    files = _resolve_paths(paths)
    parts = [(f, *_read_file(f, vocab_size=vocab_size)) for f in files]
    longest = max((int(p[1].max()) if len(p[1]) else 0) for p in parts)
    width = longest if max_len is None else max_len
    if max_len is not None:
        for file, lengths, _, _ in parts:
            if (too_long := np.flatnonzero(lengths > max_len)).size:
                r = int(too_long[0])
                raise RolloutError(
                    f"{file}: row {r}, column 'tokens': {lengths[r]} tokens do not fit "
                    f"max_len={max_len}."
                )
    optional = ("old_values", "logprobs", "ref_logprobs", "true_values", "true_advantages")
    if kl_coef > 0:
        for file, _, flat, _ in parts:
            for k in ("logprobs", "ref_logprobs"):
                if k not in flat:
                    raise RolloutError(f"{file}: column {k!r}: missing, and kl_coef={kl_coef} > 0.")
    shared = [k for k in optional if all(k in p[2] for p in parts)]

    out: dict[str, list[np.ndarray]] = {}
    for file, lengths, flat, sequence_reward in parts:
        rows = len(lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        row_of = np.repeat(np.arange(rows), lengths)
        col_of = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)

        def pad(x: np.ndarray, rows=rows, row_of=row_of, col_of=col_of) -> np.ndarray:
            full = np.zeros((rows, width), x.dtype)
            full[row_of, col_of] = x
            return full

        arrays = {k: pad(flat[k]) for k in (*TOKEN_COLUMNS, *shared)}
        mask = arrays["mask"]
        kl = None
        if kl_coef > 0:
            kl = kl_penalty(
                pad(flat["logprobs"]), pad(flat["ref_logprobs"]), kind=kl_kind, clamp=kl_clamp
            )
        if "rewards" in flat:
            rewards = pad(flat["rewards"])
            if kl is not None:
                rewards = rewards - np.float32(kl_coef) * np.asarray(kl)
        else:
            rewards = token_rewards(sequence_reward, mask, kl=kl, kl_coef=kl_coef)
        rewards = np.asarray(rewards, np.float32)
        if (bad := (mask != 0) & ~np.isfinite(rewards)).any():
            r, t = (int(i[0]) for i in np.nonzero(bad))
            raise RolloutError(
                f"{file}: row {r}, column 'rewards': position {t}: the shaped reward is "
                f"{rewards[r, t]} (kl_kind={kl_kind}, kl_coef={kl_coef}); the KL estimate "
                "overflows: set data.kl_clamp or use kl_kind k1."
            )
        arrays["rewards"] = np.where(mask != 0, rewards, 0).astype(np.float32)
        for k, v in arrays.items():
            out.setdefault(k, []).append(v)
    result = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    if result["tokens"].shape[0] == 0:
        raise RolloutError(f"No rows in {files}.")
    if not (result["mask"] != 0).any():
        raise RolloutError(
            f"No action token in {files}: column 'mask' is 0 everywhere, so there is nothing "
            "to train on."
        )
    return result


def write_scored(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    columns: Mapping[str, np.ndarray],
    *,
    compression: str = "zstd",
) -> int:
    """Writes the rows of `paths` (in `read_rollouts`' order) with new list columns beside theirs.

    Each new column is a float32 [N, T] array laid out as `read_rollouts` returned the rows
    (right-padded); each row keeps the length of its own lists. The file is written beside its
    destination and renamed into place.

    Args:
      paths: the rollout files, exactly as given to `read_rollouts`.
      out: the Parquet file to write.
      columns: name -> float32 [N, T]; existing columns of the same name are replaced.

    Returns:
      The number of rows written.

    Raises:
      RolloutError: if the files cannot be read or do not have N rows.
    """
    files = _resolve_paths(paths)
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    except (OSError, pa.ArrowException) as e:
        raise RolloutError(f"Cannot read {files} again to add the scored columns: {e}") from e
    lengths = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)
    for name, values in columns.items():
        values = np.asarray(values, np.float32)
        if values.shape[0] != table.num_rows:
            raise RolloutError(
                f"{name} has {values.shape[0]} rows but {files} hold {table.num_rows}."
            )
        keep = np.arange(values.shape[1])[None, :] < lengths[:, None]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep]))
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, column)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, out)
    return table.num_rows
