"""Tests of critic_jax.data: the synthetic MRP's exact values, Parquet rollouts, the iterator."""

import dataclasses
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from critic_jax import data

CONFIG = data.MRPConfig()
TINY = data.MRPConfig(
    vocab_size=8,
    n_prompt_tokens=1,
    n_obs_tokens=1,
    prompt_min_len=1,
    prompt_max_len=2,
    response_max_len=6,
    obs_len=1,
    eos_prob=0.15,
    tool_prob=0.2,
    table_seed=3,
)


def _discounted_returns(rewards, mask, gamma):
    """[B, T] -> [B, T] Σ_k γ^k r over valid positions from t on (skip semantics); 0 off-mask."""
    out = np.zeros(rewards.shape)
    acc = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        valid = mask[:, t] != 0
        acc = np.where(valid, rewards[:, t] + gamma * acc, acc)
        out[:, t] = np.where(valid, acc, 0.0)
    return out


def _next_valid_values(values, mask):
    """[B, T] -> values at the next valid position after t (0 when there is none)."""
    out = np.zeros(values.shape)
    nxt = np.zeros(values.shape[0])
    for t in range(values.shape[1] - 1, -1, -1):
        out[:, t] = nxt
        nxt = np.where(mask[:, t] != 0, values[:, t], nxt)
    return out


# ------------------------------------------------------------------------------------------
# Exact values.


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_value_table_matches_brute_force_enumeration(gamma):
    tables = data.mrp_tables(TINY)
    r_len = TINY.response_max_len
    # Rewards rebuilt from column 0 (no truncation there), the truncation added by hand.
    base = tables.rewards[0]
    w_lo, w_hi = TINY.word_range

    def enumerate_from(p, j):
        total, stack = 0.0, [(p, j, 1.0, 0.0, 1.0)]
        while stack:
            p, j, prob, ret, disc = stack.pop()
            for x in range(TINY.vocab_size):
                q = tables.probs[j, p, x]
                if q == 0:
                    continue
                assert x == data.EOS or x == data.TOOL or w_lo <= x < w_hi
                r = base[p, x] + (TINY.truncation_reward if j == r_len - 1 and x != 2 else 0)
                if x == data.EOS or j == r_len - 1:
                    total += prob * q * (ret + disc * r)
                elif x == data.TOOL:
                    assert j + 1 + TINY.obs_len <= r_len - 1  # room for the observation
                    stack.append((x, j + 1 + TINY.obs_len, prob * q, ret + disc * r, disc * gamma))
                else:
                    stack.append((x, j + 1, prob * q, ret + disc * r, disc * gamma))
        return total

    values = data.mrp_value_table(TINY, gamma=gamma)
    states = [data.BOS, *range(*TINY.prompt_range), data.TOOL, *range(w_lo, w_hi)]
    for j in range(r_len):
        for p in states:
            np.testing.assert_allclose(values[j, p], enumerate_from(p, j), rtol=1e-12, atol=1e-12)
    assert np.ptp(values[:r_len][:, states]) > 0.5  # not a degenerate table


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_value_table_matches_monte_carlo_rollouts(gamma):
    values = data.mrp_value_table(CONFIG, gamma=gamma)
    w_lo, w_hi = CONFIG.word_range
    p_lo, _ = CONFIG.prompt_range
    states = [(p_lo, 0), (w_lo, 3), (w_hi - 1, 10), (data.TOOL, 12), (w_lo + 1, 20), (w_lo, 23)]
    rng = np.random.default_rng(0)
    n = 20_000
    for p, j in states:
        run = data._simulate(CONFIG, np.full(n, p), j, rng)
        ret = _discounted_returns(run["rewards"], run["mask"], gamma)[:, j]
        assert run["mask"][:, j].all() and (run["state"][:, j] == p).all()
        se = ret.std() / math.sqrt(n)
        assert abs(ret.mean() - values[j, p]) < 4.5 * se + 1e-9, (p, j, ret.mean(), values[j, p])


def test_first_action_values_match_returns_of_sampled_rows():
    gamma = 0.95
    batch = data.sample_mrp(CONFIG, seed=11, batch_size=20_000, gamma=gamma)
    first = CONFIG.prompt_max_len
    ret = _discounted_returns(batch["rewards"], batch["mask"], gamma)[:, first]
    v = batch["true_values"][:, first]
    last_prompt = batch["tokens"][:, first - 1]
    for p in np.unique(last_prompt):
        rows = last_prompt == p
        se = ret[rows].std() / math.sqrt(rows.sum())
        assert abs(ret[rows].mean() - v[rows][0]) < 4.5 * se
        assert np.all(v[rows] == v[rows][0])  # V* depends only on the state


def _bellman_z_scores(batch, values, gamma):
    """|mean| / standard error of r_t + γ·V[t'] − V[t] per state (p, column), t' the next action."""
    mask, tokens = batch["mask"], batch["tokens"]
    values = values.astype(np.float64)
    residual = batch["rewards"] + gamma * _next_valid_values(values, mask) - values
    o_lo, o_hi = CONFIG.obs_range
    is_state = (tokens != data.PAD) & ~((tokens >= o_lo) & (tokens < o_hi))
    prev_state = np.zeros_like(tokens)  # the Markov token p of each position
    last = np.zeros(tokens.shape[0], tokens.dtype)
    for t in range(tokens.shape[1]):
        prev_state[:, t] = last
        last = np.where(is_state[:, t], tokens[:, t], last)
    col = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    key = (prev_state * 100 + col)[mask > 0]
    res = residual[mask > 0]
    z = []
    for k in np.unique(key):
        r = res[key == k]
        if r.size >= 200:
            z.append(abs(r.mean()) / (r.std() / math.sqrt(r.size) + 1e-6))
    return np.array(z)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_true_values_satisfy_bellman_equation_with_skip_semantics(gamma):
    batch = data.sample_mrp(CONFIG, seed=5, batch_size=20_000, gamma=gamma)
    z = _bellman_z_scores(batch, batch["true_values"], gamma)
    # Each state's mean residual is 0 within noise: z² averages about 1 over the states.
    assert len(z) > 100 and z.max() < 5.0 and np.mean(z**2) < 2.0
    # The check has power: values for another discount fail it.
    wrong = data.mrp_true_values(CONFIG, batch["tokens"], gamma=gamma - 0.1)
    assert np.mean(_bellman_z_scores(batch, wrong, gamma) ** 2) > 5.0


def test_mrp_true_values_of_a_sampled_batch_match_the_sampler():
    batch = data.sample_mrp(CONFIG, seed=2, batch_size=500, gamma=0.9)
    np.testing.assert_array_equal(
        data.mrp_true_values(CONFIG, batch["tokens"], gamma=0.9), batch["true_values"]
    )
    with pytest.raises(ValueError, match="seq_len"):
        data.mrp_true_values(CONFIG, batch["tokens"][:, 1:])


def test_default_values_vary_by_several_units():
    v = data.held_out_batch(data.DataConfig(), seed=0, gamma=1.0, n=4096)
    vals = v["true_values"][v["mask"] > 0]
    assert vals.std() > 1.0 and np.ptp(vals) > 4.0
    text = data.describe_mrp(CONFIG, gamma=1.0)
    assert "V*" in text and "std" in text


# ------------------------------------------------------------------------------------------
# Sampling conventions.


def test_sample_layout_and_conventions():
    batch = data.sample_mrp(CONFIG, seed=0, batch_size=2000, gamma=1.0)
    rows, width = 2000, CONFIG.seq_len
    want = {
        "tokens": np.int32,
        "attention_mask": np.int32,
        "mask": np.float32,
        "rewards": np.float32,
        "true_values": np.float32,
        "logprobs": np.float32,
        "ref_logprobs": np.float32,
    }
    for k, dtype in want.items():
        assert batch[k].shape == (rows, width) and batch[k].dtype == dtype, k
    assert batch["sequence_reward"].shape == (rows,)
    tokens, att, mask = batch["tokens"], batch["attention_mask"], batch["mask"]
    p_len = CONFIG.prompt_max_len
    assert ((tokens >= 0) & (tokens < CONFIG.vocab_size)).all()
    np.testing.assert_array_equal(att, tokens != data.PAD)
    # Left-padded prompts that start with BOS, right-padded responses.
    assert (np.diff(att[:, :p_len], axis=1) >= 0).all()
    assert (np.diff(att[:, p_len:], axis=1) <= 0).all()
    first = np.argmax(att, axis=1)
    assert (tokens[np.arange(rows), first] == data.BOS).all()
    lengths = att[:, :p_len].sum(1)
    assert lengths.min() == CONFIG.prompt_min_len and lengths.max() == CONFIG.prompt_max_len
    # The mask covers response actions only, never padding or observations.
    assert (mask[:, :p_len] == 0).all() and ((mask != 0) <= (att != 0)).all()
    o_lo, o_hi = CONFIG.obs_range
    obs = (tokens >= o_lo) & (tokens < o_hi)
    assert obs.any() and (mask[obs] == 0).all() and (obs[:, :p_len] == 0).all()
    np.testing.assert_array_equal(mask != 0, (att != 0) & ~obs & (np.arange(width) >= p_len))
    # Each TOOL action is followed by exactly obs_len observation tokens.
    for b, t in zip(*np.nonzero(tokens == data.TOOL), strict=True):
        assert obs[b, t + 1 : t + 1 + CONFIG.obs_len].all() and not obs[b, t + 1 + CONFIG.obs_len]
    # A response ends with EOS, or fills the budget.
    resp_len = att[:, p_len:].sum(1)
    last = tokens[np.arange(rows), p_len + resp_len - 1]
    assert ((last == data.EOS) | (resp_len == CONFIG.response_max_len)).all()
    assert (tokens == data.EOS).sum(1).max() == 1
    for k in ("rewards", "true_values", "logprobs", "ref_logprobs"):
        assert (batch[k][mask == 0] == 0).all(), k
    assert (batch["logprobs"][mask > 0] < 0).all()
    np.testing.assert_allclose(batch["sequence_reward"], batch["rewards"].sum(1), atol=1e-5)


def test_sampling_is_deterministic_and_fast():
    a = data.sample_mrp(CONFIG, seed=7, batch_size=64)
    b = data.sample_mrp(CONFIG, seed=7, batch_size=64)
    c = data.sample_mrp(CONFIG, seed=8, batch_size=64)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], c["tokens"])
    start = time.perf_counter()
    data.sample_mrp(CONFIG, seed=0, batch_size=10_000)
    assert time.perf_counter() - start < 2.0


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        data.sample_mrp(CONFIG, seed=0, batch_size=4, gamma=1.5)
    with pytest.raises(ValueError, match="Received"):
        data.sample_mrp(CONFIG, seed=-1, batch_size=4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vocab_size=12),
        dict(prompt_min_len=0),
        dict(prompt_min_len=5, prompt_max_len=4),
        dict(response_max_len=0),
        dict(obs_len=-1),
        dict(n_obs_tokens=0),
        dict(eos_prob=0.0),
        dict(eos_prob=0.5, tool_prob=0.5),
        dict(stickiness=math.inf),
        dict(truncation_reward=math.nan),
    ],
)
def test_mrp_config_validation(overrides):
    with pytest.raises(ValueError, match="Received: "):
        data.MRPConfig(**overrides)


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
    assert sorted(first[0]) == ["attention_mask", "mask", "rewards", "tokens", "true_values"]
    want = data.sample_mrp(config.mrp, seed=(3, 0, 1), batch_size=8, gamma=0.9)
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
    batch = data.sample_mrp(CONFIG, seed=1, batch_size=48, gamma=1.0)
    rows = {k: v for k, v in batch.items() if k != "sequence_reward"}
    data.write_rollouts(tmp_path / "part-0.parquet", {k: v[:20] for k, v in rows.items()})
    data.write_rollouts(tmp_path / "part-1.parquet", {k: v[20:] for k, v in rows.items()})
    return tmp_path, batch


def test_parquet_iterator_epochs_resume_and_shard(rollout_files):
    folder, batch = rollout_files
    config = data.DataConfig(path=str(folder / "*.parquet"), batch_size=16)
    it = data.make_rollout_iterator(config, seed=4, gamma=1.0)
    epochs = _take(it, 6)  # 48 rows: 3 batches per epoch
    assert sorted(epochs[0]) == ["attention_mask", "mask", "rewards", "tokens", "true_values"]
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
# Parquet files.


def test_parquet_round_trip(tmp_path):
    batch = data.sample_mrp(CONFIG, seed=9, batch_size=30, gamma=0.9)
    batch["old_values"] = batch["true_values"] + 0.5 * batch["mask"]
    data.write_rollouts(tmp_path / "a" / "full.parquet", batch)
    back = data.read_rollouts(tmp_path / "a" / "full.parquet")
    assert sorted(back) == sorted(set(batch) - {"sequence_reward"})
    for k, v in back.items():
        assert v.dtype == batch[k].dtype or k in ("attention_mask", "mask"), k
        np.testing.assert_array_equal(v, batch[k], err_msg=k)

    data.write_rollouts(tmp_path / "b.parquet", batch, strip_padding=True)
    widths = pq.read_table(tmp_path / "b.parquet").column("tokens").to_pylist()
    assert len({len(w) for w in widths}) > 1  # variable-length rows on disk
    back = data.read_rollouts(tmp_path / "b.parquet", max_len=CONFIG.seq_len)
    for k, v in back.items():
        np.testing.assert_array_equal(v, batch[k], err_msg=k)
    natural = data.read_rollouts(tmp_path / "b.parquet")
    assert natural["tokens"].shape[1] == max(len(w) for w in widths)

    with pytest.raises(ValueError, match="sequence_reward"):
        data.write_rollouts(tmp_path / "c.parquet", {k: batch[k] for k in data.TOKEN_COLUMNS})
    with pytest.raises(ValueError, match="unknown"):
        data.write_rollouts(tmp_path / "c.parquet", {**batch, "values": batch["rewards"]})


@pytest.mark.parametrize("kind", ["k1", "k3"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_sequence_reward_and_kl_become_token_rewards(tmp_path, kind, level):
    batch = data.sample_mrp(CONFIG, seed=4, batch_size=12)
    drop = "rewards" if level == "sequence" else "sequence_reward"
    data.write_rollouts(tmp_path / "r.parquet", {k: v for k, v in batch.items() if k != drop})
    got = data.read_rollouts(tmp_path / "r.parquet", kl_coef=0.1, kl_kind=kind)["rewards"]

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

    plain = data.read_rollouts(tmp_path / "r.parquet")["rewards"]
    np.testing.assert_allclose(plain, np.where(mask, want + 0.1 * kl, 0), rtol=1e-5, atol=1e-5)


def _good_rows():
    batch = data.sample_mrp(CONFIG, seed=0, batch_size=8)
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
    data.read_rollouts(path, vocab_size=CONFIG.vocab_size)  # the unedited rows are fine
    edit(rows)
    path = tmp_path / "bad-rollout.parquet"
    _write_rows(path, rows)
    with pytest.raises(data.RolloutError, match=pattern) as info:
        data.read_rollouts([tmp_path / "good.parquet", path], vocab_size=CONFIG.vocab_size)
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
    out = data.read_rollouts(path, vocab_size=CONFIG.vocab_size)
    assert np.isfinite(out["rewards"]).all() and np.isfinite(out["old_values"]).all()
    assert (out["rewards"][out["mask"] == 0] == 0).all()


def test_unreadable_and_missing_files(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(data.RolloutError, match="junk.parquet.*Parquet"):
        data.read_rollouts(path)
    with pytest.raises(data.RolloutError, match="No Parquet files match"):
        data.read_rollouts(str(tmp_path / "none-*.parquet"))
    with pytest.raises(data.RolloutError, match="no such file"):
        data.read_rollouts(tmp_path / "absent.parquet")


def test_kl_without_logprobs_and_rows_too_long(tmp_path):
    path = tmp_path / "r.parquet"
    _write_rows(path, _good_rows())
    with pytest.raises(data.RolloutError, match="r.parquet.*'logprobs'.*kl_coef"):
        data.read_rollouts(path, kl_coef=0.1)
    with pytest.raises(data.RolloutError, match="r.parquet: row 0, column 'tokens'.*max_len=8"):
        data.read_rollouts(path, max_len=8)
