"""Tests of critic_jax.data: the data config and the checkpointable rollout iterators."""

import collections
import dataclasses
import json

import helpers
import numpy as np
import pytest

from critic_jax import data, mrp, rollouts

CONFIG = mrp.MRPConfig()
# The arrays of a batch of the synthetic MRP (and of Parquet rollouts written from one).
MRP_KEYS = ["attention_mask", "mask", "rewards", "tokens", "true_advantages", "true_values"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(batch_size=0),
        dict(max_len=0),
        dict(kl_coef=-1.0),
        dict(kl_kind="k4"),
        dict(kl_clamp=0.0),
        dict(kl_coef=0.1),  # synthetic data carries no KL term
        dict(path=""),
    ],
)
def test_data_config_validation(overrides):
    with pytest.raises(ValueError, match="Received: "):
        data.DataConfig(**overrides)


# ------------------------------------------------------------------------------------------
# The iterator.


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_synthetic_iterator_batches_resume_and_shard():
    config = data.DataConfig(batch_size=8)
    it = data.make_rollout_iterator(config, seed=3, gamma=0.9)
    first = _take(it, 3)
    assert sorted(first[0]) == MRP_KEYS
    want = mrp.sample_mrp(config.mrp, seed=(3, 0, 1), batch_size=8, gamma=0.9)
    for k in first[1]:
        np.testing.assert_array_equal(first[1][k], want[k])
    state = json.loads(json.dumps(it.get_state()))
    after = _take(it, 3)
    resumed = data.make_rollout_iterator(config, seed=3, gamma=0.9)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), after)
    assert not np.array_equal(after[0]["tokens"], after[1]["tokens"])

    halves = [
        _take(
            data.make_rollout_iterator(config, seed=3, gamma=0.9, process_index=i, process_count=2),
            3,
        )
        for i in range(2)
    ]
    for step in range(3):
        assert halves[0][step]["tokens"].shape == (4, CONFIG.seq_len)
        joined = {k: np.concatenate([h[step][k] for h in halves]) for k in first[step]}
        _assert_batches_equal([joined], [first[step]])


def test_iterator_rejects_bad_sharding_and_states():
    config = data.DataConfig(batch_size=6)
    with pytest.raises(ValueError, match="divisible"):
        data.make_rollout_iterator(config, seed=0, gamma=1.0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.make_rollout_iterator(config, seed=0, gamma=1.0, process_index=2, process_count=2)
    it = data.make_rollout_iterator(config, seed=0, gamma=1.0)
    with pytest.raises(ValueError, match="Received"):
        it.set_state({"source": "parquet", "rows": 3, "grain": {}})


def test_held_out_batch_is_disjoint_from_training():
    config = data.DataConfig(batch_size=16)
    held = data.held_out_batch(config, seed=0, gamma=1.0, n=16)
    assert held["true_values"].shape == (16, CONFIG.seq_len)
    train = _take(data.make_rollout_iterator(config, seed=0, gamma=1.0), 4)
    for batch in train:
        assert not np.array_equal(batch["tokens"], held["tokens"])
    with pytest.raises(ValueError, match="synthetic"):
        data.held_out_batch(dataclasses.replace(config, path="x.parquet"), seed=0, gamma=1, n=4)


@pytest.fixture
def rollout_files(tmp_path):
    batch = mrp.sample_mrp(CONFIG, seed=1, batch_size=48, gamma=1.0)
    rows = {k: v for k, v in batch.items() if k != "sequence_reward"}
    rollouts.write_rollouts(tmp_path / "part-0.parquet", {k: v[:20] for k, v in rows.items()})
    rollouts.write_rollouts(tmp_path / "part-1.parquet", {k: v[20:] for k, v in rows.items()})
    return tmp_path, batch


def test_parquet_iterator_epochs_resume_and_shard(rollout_files):
    folder, batch = rollout_files
    config = data.DataConfig(path=str(folder / "*.parquet"), batch_size=16, packing=False)
    it = data.make_rollout_iterator(config, seed=4, gamma=1.0)
    epochs = _take(it, 6)  # 48 rows: 3 batches per epoch
    assert sorted(epochs[0]) == MRP_KEYS
    assert all(b["tokens"].shape == (16, CONFIG.seq_len) for b in epochs)
    tokens = np.concatenate([b["tokens"] for b in epochs])
    rows = {r.tobytes() for r in batch["tokens"]}
    for e in range(2):
        seen = tokens[48 * e : 48 * (e + 1)]
        assert {r.tobytes() for r in seen} == rows and len(seen) == 48
    assert not np.array_equal(tokens[:48], tokens[48:])  # a new order each epoch
    assert not np.array_equal(tokens[:48], batch["tokens"])  # shuffled

    it = data.make_rollout_iterator(config, seed=4, gamma=1.0)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.make_rollout_iterator(config, seed=4, gamma=1.0)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), epochs[2:6])

    halves = [
        _take(
            data.make_rollout_iterator(config, seed=4, gamma=1.0, process_index=i, process_count=2),
            4,
        )
        for i in range(2)
    ]
    for step in range(4):
        joined = {k: np.concatenate([h[step][k] for h in halves]) for k in epochs[step]}
        _assert_batches_equal([joined], [epochs[step]])

    ordered = data.make_rollout_iterator(
        dataclasses.replace(config, shuffle=False), seed=4, gamma=1.0
    )
    np.testing.assert_array_equal(next(ordered)["tokens"], batch["tokens"][:16])

    fewer = data.DataConfig(path=str(folder / "part-0.parquet"), batch_size=16)
    with pytest.raises(ValueError, match="48 rollout rows"):
        data.make_rollout_iterator(fewer, seed=4, gamma=1.0).set_state(state)


# ------------------------------------------------------------------------------------------
# Packed Parquet rollouts: grain's first-fit packing into rows with segment ids.

PACKED_WIDTH = 20  # the longest rollout of `packed_files`
PACKED_KEYS = ["attention_mask", "mask", "old_values", "rewards", "segment_ids", "tokens"]
ROLLOUT_KEYS = ("tokens", "mask", "rewards", "old_values")  # what a packed segment carries


def _unpadded(batch) -> list[dict[str, np.ndarray]]:
    """The rollouts of a written [N, T] batch as packing must keep them, in row order: each row's
    attended tokens, with mask, rewards and old_values (zeroed off the mask, as `read_rollouts`
    does); a row with no attended token is no rollout."""
    out = []
    for i in range(batch["tokens"].shape[0]):
        keep = batch["attention_mask"][i] != 0
        action = batch["mask"][i] != 0
        if keep.any():
            row = {k: batch[k][i] for k in ("tokens", "mask")}
            row.update({k: np.where(action, batch[k][i], 0) for k in ("rewards", "old_values")})
            out.append({k: v[keep] for k, v in row.items()})
    return out


def _key(rollout) -> tuple[bytes, ...]:
    """A rollout's exact contents, hashable."""
    dtypes = {"tokens": np.int32}
    return tuple(np.asarray(rollout[k], dtypes.get(k, np.float32)).tobytes() for k in ROLLOUT_KEYS)


@pytest.fixture
def packed_files(tmp_path):
    """Two files of random rollouts of mixed lengths (1..20 attended tokens, some left-padded):
    part-0 stores each row without its trailing padding, part-1 at the full width with two rows
    that attend to nothing. Returns (glob, the 38 rollouts packing must keep)."""
    a = helpers.random_rollouts(1, 28, PACKED_WIDTH)
    b = helpers.random_rollouts(2, 12, PACKED_WIDTH)
    for k in ("tokens", "attention_mask", "mask"):
        b[k][[3, 7]] = 0
    rollouts.write_rollouts(tmp_path / "part-0.parquet", a, strip_padding=True)
    rollouts.write_rollouts(tmp_path / "part-1.parquet", b)
    want = _unpadded({k: np.concatenate([a[k], b[k]]) for k in a})
    assert len(want) == 38 and len({_key(r) for r in want}) == 38  # distinct rollouts
    return str(tmp_path / "*.parquet"), want


def _check_packed_rows(batch, shape):
    """The invariants of a packed batch: arrays of `shape`; per row, segment ids 1..k in
    ascending contiguous runs from the start, then 0 exactly where attention_mask is 0, and
    every token column 0 there."""
    assert sorted(batch) == PACKED_KEYS
    for k, v in batch.items():
        want = np.int32 if k in ("tokens", "attention_mask", "segment_ids") else np.float32
        assert v.shape == shape and v.dtype == want, (k, v.shape, v.dtype)
    ids = batch["segment_ids"]
    np.testing.assert_array_equal(batch["attention_mask"], (ids != 0).astype(np.int32))
    for row in ids:
        n = np.count_nonzero(row)
        assert n > 0 and not row[n:].any(), row  # tokens first, padding after
        steps = np.diff(np.concatenate([[0], row[:n]]))
        assert np.isin(steps, [0, 1]).all() and steps[0] == 1, row  # runs of 1, 2, ..., k
    for k in ("tokens", "mask", "rewards", "old_values"):
        assert not batch[k][ids == 0].any(), k


def _segments(batches) -> list[dict[str, np.ndarray]]:
    """Every packed segment of `batches`, as a rollout (its positions' ROLLOUT_KEYS)."""
    out = []
    for batch in batches:
        for r, row in enumerate(batch["segment_ids"]):
            for s in range(1, row.max() + 1):
                at = row == s
                out.append({k: batch[k][r][at] for k in ROLLOUT_KEYS})
    return out


def _assert_epochs(seen, want, *, ordered):
    """`seen` is a prefix of the stream of `want` repeated epoch after epoch: of its
    L = k * len(want) + r rollouts, each of `want` is there k times and r distinct ones once more
    (with `ordered`, the first r); nothing else, and nothing altered."""
    keys = [_key(x) for x in want]
    counts = collections.Counter(_key(x) for x in seen)
    assert set(counts) <= set(keys), "a packed segment is no rollout of the files"
    k, r = divmod(len(seen), len(keys))
    got = [counts[x] for x in keys]
    if ordered:
        assert got == [k + (i < r) for i in range(len(keys))]
    else:
        assert sorted(got) == [k] * (len(keys) - r) + [k + 1] * r


def test_packed_rows_hold_every_rollout_once_per_epoch(packed_files):
    path, want = packed_files
    first = {}
    for shuffle in (False, True):
        config = data.DataConfig(path=path, batch_size=4, max_len=24, shuffle=shuffle)
        assert config.packed  # the default for Parquet rollouts
        batches = _take(data.make_rollout_iterator(config, seed=5, gamma=1.0), 14)
        for batch in batches:
            _check_packed_rows(batch, (4, 24))
        seen = _segments(batches)
        assert len(seen) > 2 * len(want)  # more than two epochs
        _assert_epochs(seen, want, ordered=not shuffle)
        first[shuffle] = batches[0]["tokens"]
        # Packing pays: fewer rows than one rollout a row would need.
        assert 14 * 4 < len(seen)
    assert not np.array_equal(first[False], first[True])


def test_packed_iterator_resumes_exactly_across_epochs(packed_files):
    path, want = packed_files
    config = data.DataConfig(path=path, batch_size=4)  # max_len None: the longest rollout
    it = data.make_rollout_iterator(config, seed=2, gamma=1.0)
    states, batches = [], []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))  # a checkpoint stores it as JSON
        batches.append(next(it))
    assert batches[0]["tokens"].shape == (4, PACKED_WIDTH)
    # The batch that holds the end of the first epoch and the start of the second.
    done = np.cumsum([len(_segments([b])) for b in batches])
    across = int(np.flatnonzero(done > len(want))[0])
    assert 1 < across < 10
    for start in (1, across, across + 1):
        resumed = data.make_rollout_iterator(config, seed=2, gamma=1.0)
        resumed.set_state(states[start])
        _assert_batches_equal(_take(resumed, 12 - start), batches[start:])
    it.set_state(states[2])  # back, on the iterator that went past it
    _assert_batches_equal(_take(it, 3), batches[2:5])

    padded = data.make_rollout_iterator(
        dataclasses.replace(config, packing=False), seed=2, gamma=1.0
    )
    with pytest.raises(ValueError, match="packing on, but packing is now off"):
        padded.set_state(states[3])
    with pytest.raises(ValueError, match="packing off, but packing is now on"):
        it.set_state(padded.get_state())
    old_format = {k: v for k, v in padded.get_state().items() if k != "packed"}
    with pytest.raises(ValueError, match="does not fit this pipeline"):
        it.set_state(old_format)


def test_packed_batches_split_across_processes(packed_files):
    path, want = packed_files
    config = data.DataConfig(path=path, batch_size=4)
    whole = _take(data.make_rollout_iterator(config, seed=7, gamma=1.0), 12)
    halves = [
        _take(
            data.make_rollout_iterator(config, seed=7, gamma=1.0, process_index=i, process_count=2),
            12,
        )
        for i in range(2)
    ]
    for step in range(12):
        for h in halves:
            _check_packed_rows(h[step], (2, PACKED_WIDTH))
        joined = {k: np.concatenate([h[step][k] for h in halves]) for k in whole[step]}
        _assert_batches_equal([joined], [whole[step]])
    # Together the processes read each rollout once per epoch, and nothing twice.
    together = _segments(halves[0]) + _segments(halves[1])
    assert len(together) > 2 * len(want)
    _assert_epochs(together, want, ordered=False)


def test_packed_rollout_longer_than_the_row_is_an_error(tmp_path):
    batch = {k: v[::-1] for k, v in helpers.random_rollouts(3, 10, PACKED_WIDTH).items()}
    path = tmp_path / "long.parquet"
    rollouts.write_rollouts(path, batch, strip_padding=True)
    # Stored without its trailing padding, a row runs to its last attended token.
    stored = [int(np.flatnonzero(row)[-1]) + 1 for row in batch["attention_mask"]]
    longest = max(stored)
    config = data.DataConfig(path=str(path), batch_size=4, max_len=longest - 1)
    assert config.packed
    with pytest.raises(
        ValueError,
        match=rf"long\.parquet: row {stored.index(longest)}, .*: {longest} tokens do not fit "
        rf"max_len={longest - 1}",
    ):
        data.make_rollout_iterator(config, seed=0, gamma=1.0)
    exact = dataclasses.replace(config, max_len=longest)
    _check_packed_rows(next(data.make_rollout_iterator(exact, seed=0, gamma=1.0)), (4, longest))
