"""Tests of critic_jax.data: the data config and the checkpointable rollout iterators."""

import dataclasses
import json

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
