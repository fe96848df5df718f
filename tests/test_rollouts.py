"""Tests of critic_jax.rollouts: the Parquet rollout schema, reading, writing, validation."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from critic_jax import mrp, rollouts

CONFIG = mrp.MRPConfig()


# ------------------------------------------------------------------------------------------
# Parquet files.


def test_parquet_round_trip(tmp_path):
    batch = mrp.sample_mrp(CONFIG, seed=9, batch_size=30, gamma=0.9)
    batch["old_values"] = batch["true_values"] + 0.5 * batch["mask"]
    rollouts.write_rollouts(tmp_path / "a" / "full.parquet", batch)
    back = rollouts.read_rollouts(tmp_path / "a" / "full.parquet")
    assert sorted(back) == sorted(set(batch) - {"sequence_reward"})
    for k, v in back.items():
        assert v.dtype == batch[k].dtype or k in ("attention_mask", "mask"), k
        np.testing.assert_array_equal(v, batch[k], err_msg=k)

    rollouts.write_rollouts(tmp_path / "b.parquet", batch, strip_padding=True)
    widths = pq.read_table(tmp_path / "b.parquet").column("tokens").to_pylist()
    assert len({len(w) for w in widths}) > 1  # variable-length rows on disk
    back = rollouts.read_rollouts(tmp_path / "b.parquet", max_len=CONFIG.seq_len)
    for k, v in back.items():
        np.testing.assert_array_equal(v, batch[k], err_msg=k)
    natural = rollouts.read_rollouts(tmp_path / "b.parquet")
    assert natural["tokens"].shape[1] == max(len(w) for w in widths)

    with pytest.raises(ValueError, match="sequence_reward"):
        rollouts.write_rollouts(
            tmp_path / "c.parquet", {k: batch[k] for k in rollouts.TOKEN_COLUMNS}
        )
    with pytest.raises(ValueError, match="unknown"):
        rollouts.write_rollouts(tmp_path / "c.parquet", {**batch, "values": batch["rewards"]})


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_sequence_reward_and_kl_become_token_rewards(tmp_path, kind, level):
    batch = mrp.sample_mrp(CONFIG, seed=4, batch_size=12)
    drop = "rewards" if level == "sequence" else "sequence_reward"
    rollouts.write_rollouts(tmp_path / "r.parquet", {k: v for k, v in batch.items() if k != drop})
    got = rollouts.read_rollouts(tmp_path / "r.parquet", kl_coef=0.1, kl_kind=kind)["rewards"]

    mask = batch["mask"] > 0
    d = batch["logprobs"].astype(np.float64) - batch["ref_logprobs"]
    kl = d if kind == "k1" else np.exp(-d) - 1 + d
    if level == "sequence":
        want = np.zeros(mask.shape)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        want[np.arange(len(last)), last] = batch["sequence_reward"]
    else:
        want = batch["rewards"].astype(np.float64)
    want = np.where(mask, want - 0.1 * kl, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - np.where(mask, want + 0.1 * kl, 0)).max() > 1e-3  # the KL term matters

    plain = rollouts.read_rollouts(tmp_path / "r.parquet")["rewards"]
    np.testing.assert_allclose(plain, np.where(mask, want + 0.1 * kl, 0), rtol=1e-5, atol=1e-5)


def _good_rows():
    batch = mrp.sample_mrp(CONFIG, seed=0, batch_size=8)
    batch["old_values"] = batch["true_values"]
    keys = ("tokens", "attention_mask", "mask", "rewards", "old_values", "sequence_reward")
    return [{k: batch[k][i].tolist() for k in keys} for i in range(8)]


def _write_rows(path, rows):
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows]) for k in rows[0]}), path)


def _valid_position(rows, r):
    return int(np.flatnonzero(np.asarray(rows[r]["mask"]) != 0)[0])


def _padding_position(rows, r):
    return int(np.flatnonzero(np.asarray(rows[r]["attention_mask"]) == 0)[0])


def _drop(*columns):
    def edit(rows):
        for r in rows:
            for c in columns:
                del r[c]

    return edit


def _convert(column, fn):
    def edit(rows):
        for r in rows:
            r[column] = [fn(x) for x in r[column]] if isinstance(r[column], list) else fn(r[column])

    return edit


def _set(r, column, value, at=_valid_position):
    def edit(rows):
        if at is None:
            rows[r][column] = value
        else:
            rows[r][column][at(rows, r)] = value

    return edit


def _shorten(r, column):
    def edit(rows):
        rows[r][column] = rows[r][column][:-1]

    return edit


BAD_FILES = [  # (name, edit of the good rows, row named in the error or None, pattern)
    ("missing column", _drop("mask"), None, "'mask'.*missing"),
    ("no reward column", _drop("rewards", "sequence_reward"), None, "'sequence_reward'"),
    ("tokens as floats", _convert("tokens", float), None, "'tokens'.*list of integers"),
    ("rewards as ints", _convert("rewards", round), None, "'rewards'.*list of floats"),
    ("mask as strings", _convert("mask", str), None, "'mask'.*type"),
    ("sequence_reward as text", _convert("sequence_reward", str), None, "expected a float"),
    ("ragged row", _shorten(3, "mask"), 3, "'mask'.*ragged"),
    ("token too large", _set(5, "tokens", 99), 5, "'tokens'.*99 >= vocab_size"),
    ("negative token", _set(2, "tokens", -1), 2, "'tokens'.*negative"),
    ("mask on padding", _set(4, "mask", True, at=_padding_position), 4, "marks padding"),
    ("attention mask not 0/1", _set(6, "attention_mask", 2), 6, "'attention_mask'.*not 0 or 1"),
    ("NaN reward", _set(6, "rewards", math.nan), 6, "'rewards'.*nan"),
    ("inf old value", _set(1, "old_values", math.inf), 1, "'old_values'.*inf"),
    ("NaN sequence reward", _set(7, "sequence_reward", math.nan, at=None), 7, "nan"),
    ("null row", _set(2, "rewards", None, at=None), 2, "'rewards'.*null"),
    ("null inside a row", _set(3, "old_values", None), 3, "'old_values'.*null"),
]


@pytest.mark.parametrize(
    "edit,row,pattern", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_files_name_file_row_and_column(tmp_path, edit, row, pattern):
    rows = _good_rows()
    path = tmp_path / "good.parquet"
    _write_rows(path, rows)
    rollouts.read_rollouts(path, vocab_size=CONFIG.vocab_size)  # the unedited rows are fine
    edit(rows)
    path = tmp_path / "bad-rollout.parquet"
    _write_rows(path, rows)
    with pytest.raises(rollouts.RolloutError, match=pattern) as info:
        rollouts.read_rollouts([tmp_path / "good.parquet", path], vocab_size=CONFIG.vocab_size)
    message = str(info.value)
    assert "bad-rollout.parquet" in message
    if row is not None:
        assert f"row {row}," in message
    assert isinstance(info.value, ValueError)


def test_garbage_at_masked_positions_is_ignored(tmp_path):
    rows = _good_rows()
    for r in rows:
        pad = _padding_position(rows, rows.index(r))
        r["rewards"][pad] = math.nan
        r["old_values"][pad] = -math.inf
    path = tmp_path / "ok.parquet"
    _write_rows(path, rows)
    out = rollouts.read_rollouts(path, vocab_size=CONFIG.vocab_size)
    assert np.isfinite(out["rewards"]).all() and np.isfinite(out["old_values"]).all()
    assert (out["rewards"][out["mask"] == 0] == 0).all()


def test_unreadable_and_missing_files(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(rollouts.RolloutError, match="junk.parquet.*Parquet"):
        rollouts.read_rollouts(path)
    with pytest.raises(rollouts.RolloutError, match="No Parquet files match"):
        rollouts.read_rollouts(str(tmp_path / "none-*.parquet"))
    with pytest.raises(rollouts.RolloutError, match="no such file"):
        rollouts.read_rollouts(tmp_path / "absent.parquet")


def test_kl_without_logprobs_and_rows_too_long(tmp_path):
    path = tmp_path / "r.parquet"
    _write_rows(path, _good_rows())
    with pytest.raises(rollouts.RolloutError, match="r.parquet.*'logprobs'.*kl_coef"):
        rollouts.read_rollouts(path, kl_coef=0.1)
    with pytest.raises(rollouts.RolloutError, match="r.parquet: row 0, column 'tokens'.*max_len=8"):
        rollouts.read_rollouts(path, max_len=8)
