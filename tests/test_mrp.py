"""Tests of critic_jax.mrp: the synthetic MRP's exact values and its sampling conventions."""

import math
import time

import numpy as np
import pytest
import references

from critic_jax import data, mrp

CONFIG = mrp.MRPConfig()
TINY = mrp.MRPConfig(
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


# ------------------------------------------------------------------------------------------
# Exact values.


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_value_table_matches_brute_force_enumeration(gamma):
    tables = mrp.mrp_tables(TINY)
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
                assert x == mrp.EOS or x == mrp.TOOL or w_lo <= x < w_hi
                r = base[p, x] + (TINY.truncation_reward if j == r_len - 1 and x != 2 else 0)
                if x == mrp.EOS or j == r_len - 1:
                    total += prob * q * (ret + disc * r)
                elif x == mrp.TOOL:
                    assert j + 1 + TINY.obs_len <= r_len - 1  # room for the observation
                    stack.append((x, j + 1 + TINY.obs_len, prob * q, ret + disc * r, disc * gamma))
                else:
                    stack.append((x, j + 1, prob * q, ret + disc * r, disc * gamma))
        return total

    values = mrp.mrp_value_table(TINY, gamma=gamma)
    states = [mrp.BOS, *range(*TINY.prompt_range), mrp.TOOL, *range(w_lo, w_hi)]
    for j in range(r_len):
        for p in states:
            np.testing.assert_allclose(values[j, p], enumerate_from(p, j), rtol=1e-12, atol=1e-12)
    assert np.ptp(values[:r_len][:, states]) > 0.5  # not a degenerate table


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_value_table_matches_monte_carlo_rollouts(gamma):
    values = mrp.mrp_value_table(CONFIG, gamma=gamma)
    w_lo, w_hi = CONFIG.word_range
    p_lo, _ = CONFIG.prompt_range
    states = [(p_lo, 0), (w_lo, 3), (w_hi - 1, 10), (mrp.TOOL, 12), (w_lo + 1, 20), (w_lo, 23)]
    rng = np.random.default_rng(0)
    n = 20_000
    for p, j in states:
        run = mrp._simulate(CONFIG, np.full(n, p), j, rng)
        ret = references.discounted_returns(run["rewards"], run["mask"], gamma)[:, j]
        assert run["mask"][:, j].all() and (run["state"][:, j] == p).all()
        se = ret.std() / math.sqrt(n)
        assert abs(ret.mean() - values[j, p]) < 4.5 * se + 1e-9, (p, j, ret.mean(), values[j, p])


def test_first_action_values_match_returns_of_sampled_rows():
    gamma = 0.95
    batch = mrp.sample_mrp(CONFIG, seed=11, batch_size=20_000, gamma=gamma)
    first = CONFIG.prompt_max_len
    ret = references.discounted_returns(batch["rewards"], batch["mask"], gamma)[:, first]
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
    residual = batch["rewards"] + gamma * references.next_valid_values(values, mask) - values
    o_lo, o_hi = CONFIG.obs_range
    is_state = (tokens != mrp.PAD) & ~((tokens >= o_lo) & (tokens < o_hi))
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
    batch = mrp.sample_mrp(CONFIG, seed=5, batch_size=20_000, gamma=gamma)
    z = _bellman_z_scores(batch, batch["true_values"], gamma)
    # Each state's mean residual is 0 within noise: z² averages about 1 over the states.
    assert len(z) > 100 and z.max() < 5.0 and np.mean(z**2) < 2.0
    # The check has power: values for another discount fail it.
    wrong = mrp.mrp_true_values(CONFIG, batch["tokens"], gamma=gamma - 0.1)
    assert np.mean(_bellman_z_scores(batch, wrong, gamma) ** 2) > 5.0


def test_mrp_true_values_of_a_sampled_batch_match_the_sampler():
    batch = mrp.sample_mrp(CONFIG, seed=2, batch_size=500, gamma=0.9)
    np.testing.assert_array_equal(
        mrp.mrp_true_values(CONFIG, batch["tokens"], gamma=0.9), batch["true_values"]
    )
    with pytest.raises(ValueError, match="seq_len"):
        mrp.mrp_true_values(CONFIG, batch["tokens"][:, 1:])


def test_default_values_vary_by_several_units():
    v = data.held_out_batch(data.DataConfig(), seed=0, gamma=1.0, n=4096)
    vals = v["true_values"][v["mask"] > 0]
    assert vals.std() > 1.0 and np.ptp(vals) > 4.0
    text = mrp.describe_mrp(CONFIG, gamma=1.0)
    assert "V*" in text and "std" in text


# ------------------------------------------------------------------------------------------
# Sampling conventions.


def test_sample_layout_and_conventions():
    batch = mrp.sample_mrp(CONFIG, seed=0, batch_size=2000, gamma=1.0)
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
    np.testing.assert_array_equal(att, tokens != mrp.PAD)
    # Left-padded prompts that start with BOS, right-padded responses.
    assert (np.diff(att[:, :p_len], axis=1) >= 0).all()
    assert (np.diff(att[:, p_len:], axis=1) <= 0).all()
    first = np.argmax(att, axis=1)
    assert (tokens[np.arange(rows), first] == mrp.BOS).all()
    lengths = att[:, :p_len].sum(1)
    assert lengths.min() == CONFIG.prompt_min_len and lengths.max() == CONFIG.prompt_max_len
    # The mask covers response actions only, never padding or observations.
    assert (mask[:, :p_len] == 0).all() and ((mask != 0) <= (att != 0)).all()
    o_lo, o_hi = CONFIG.obs_range
    obs = (tokens >= o_lo) & (tokens < o_hi)
    assert obs.any() and (mask[obs] == 0).all() and (obs[:, :p_len] == 0).all()
    np.testing.assert_array_equal(mask != 0, (att != 0) & ~obs & (np.arange(width) >= p_len))
    # Each TOOL action is followed by exactly obs_len observation tokens.
    for b, t in zip(*np.nonzero(tokens == mrp.TOOL), strict=True):
        assert obs[b, t + 1 : t + 1 + CONFIG.obs_len].all() and not obs[b, t + 1 + CONFIG.obs_len]
    # A response ends with EOS, or fills the budget.
    resp_len = att[:, p_len:].sum(1)
    last = tokens[np.arange(rows), p_len + resp_len - 1]
    assert ((last == mrp.EOS) | (resp_len == CONFIG.response_max_len)).all()
    assert (tokens == mrp.EOS).sum(1).max() == 1
    for k in ("rewards", "true_values", "logprobs", "ref_logprobs"):
        assert (batch[k][mask == 0] == 0).all(), k
    assert (batch["logprobs"][mask > 0] < 0).all()
    np.testing.assert_allclose(batch["sequence_reward"], batch["rewards"].sum(1), atol=1e-5)


def test_sampling_is_deterministic_and_fast():
    a = mrp.sample_mrp(CONFIG, seed=7, batch_size=64)
    b = mrp.sample_mrp(CONFIG, seed=7, batch_size=64)
    c = mrp.sample_mrp(CONFIG, seed=8, batch_size=64)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], c["tokens"])
    start = time.perf_counter()
    mrp.sample_mrp(CONFIG, seed=0, batch_size=10_000)
    assert time.perf_counter() - start < 2.0


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        mrp.sample_mrp(CONFIG, seed=0, batch_size=4, gamma=1.5)
    with pytest.raises(ValueError, match="Received"):
        mrp.sample_mrp(CONFIG, seed=-1, batch_size=4)


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
        mrp.MRPConfig(**overrides)


def test_remaining_actions_match_monte_carlo_counts():
    """E[N(s_first action)] over sampled rows equals the mean number of actions per row."""
    batch = mrp.sample_mrp(CONFIG, seed=13, batch_size=20_000)
    n = mrp.mrp_remaining_actions(CONFIG, batch["tokens"])
    mask = batch["mask"] > 0
    assert (n[mask] >= 1).all() and (n[~mask] == 0).all()
    first = np.argmax(mask, axis=1)
    counts = mask.sum(1)
    se = counts.std() / math.sqrt(len(counts))
    assert abs(n[np.arange(len(first)), first].mean() - counts.mean()) < 4 * se
