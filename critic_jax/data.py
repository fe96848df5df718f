"""Rollout data: the synthetic token MRP with exact values, Parquet rollouts, and the iterator.

Every batch is a dict of NumPy arrays aligned to token positions (time axis last):

- `tokens` int32 [B, T]: left-padded prompt, then a right-padded response; PAD = 0.
- `attention_mask` int32 [B, T]: 1 on prompt and response tokens, 0 on padding.
- `mask` float32 [B, T]: 1 where token t is an action (a generated response token whose loss
  counts); 0 on the prompt, padding and observation tokens inside a response.
- `rewards` float32 [B, T]: reward for emitting token t; 0 off the mask.
- `old_values` float32 [B, T] (when the rollout has them) and `true_values` float32 [B, T]
  (the exact V*(s_t) of the synthetic MRP, 0 off the mask).

**The synthetic MRP.** A fixed stochastic "actor" writes a response after a random prompt; the
process is Markov in (last non-observation token `p`, response column `j`), so V* of every
action position is computed exactly by dynamic programming (`mrp_value_table`). See
`describe_mrp` for the details.

**Parquet rollouts.** One row per sequence; token columns are list columns (`tokens`,
`attention_mask`, `mask`, and optional `rewards`, `old_values`, `logprobs`, `ref_logprobs`,
`true_values`) whose lists may have any length as long as the columns of one row agree; a scalar
`sequence_reward` column may replace `rewards`. `read_rollouts` validates every row and right-pads
all rows to one width `T` (the longest row, or `max_len`). `write_rollouts` writes this schema.

**The iterator.** `make_rollout_iterator` yields this process's rows of each global batch with a
fixed shape and has a JSON-ready `get_state` / `set_state`, so a checkpoint can store its position.
This is the only module of the package that imports grain or pyarrow.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from critic_jax.rewards import kl_penalty, token_rewards

PAD, BOS, EOS, TOOL = 0, 1, 2, 3
KL_KINDS = ("k1", "k2", "k3")

# Fixed reward scales of the synthetic MRP (the seeded tables draw around them).
_WORD_REWARD_LOW, _WORD_REWARD_HIGH = 0.2, 0.8
_EOS_REWARD_STD = 1.0
_TOOL_REWARD = -0.2
_EOS_PROB_SPREAD = 0.5

# Seed-sequence tags keep training batches and the held-out batch on disjoint random streams.
_TRAIN_STREAM, _HELD_OUT_STREAM = 0, 1

TOKEN_COLUMNS = ("tokens", "attention_mask", "mask")
FLOAT_COLUMNS = ("rewards", "old_values", "logprobs", "ref_logprobs", "true_values")
_LIST_COLUMNS = TOKEN_COLUMNS + FLOAT_COLUMNS
_WRITE_TYPES = {
    "tokens": pa.int32(),
    "attention_mask": pa.int8(),
    "mask": pa.bool_(),
    **{name: pa.float32() for name in FLOAT_COLUMNS},
}


class RolloutError(ValueError):
    """A rollout file that cannot be trained on; the message names the file, row and column."""


# --------------------------------------------------------------------------------------------
# The synthetic token MRP.


@dataclasses.dataclass(frozen=True, kw_only=True)
class MRPConfig:
    """A synthetic token Markov reward process whose true values are known exactly.

    Vocabulary layout: PAD=0, BOS=1, EOS=2, TOOL=3, then `n_obs_tokens` observation tokens,
    `n_prompt_tokens` prompt words, and the remaining `vocab_size - 4 - n_obs_tokens -
    n_prompt_tokens` response words. Sequences have `T = prompt_max_len + response_max_len`
    columns: the prompt (BOS and 0 or more prompt words, `prompt_min_len..prompt_max_len`
    tokens) is left-padded into the first `prompt_max_len` columns, the response is right-padded
    into the last `response_max_len`.

    Attributes:
      vocab_size: size of the vocabulary, including the special, observation and prompt tokens.
      n_prompt_tokens: number of prompt words (disjoint from the response words, so the critic
        can see where the response starts).
      n_obs_tokens: number of observation tokens (what a tool returns).
      prompt_min_len: shortest prompt, BOS included (>= 1).
      prompt_max_len: longest prompt, BOS included: the prompt columns of every sequence.
      response_max_len: the response budget: columns of the response, observations included.
      obs_len: observation tokens after each TOOL action (0 disables tool calls).
      eos_prob: typical probability of EOS at each step (it varies with the previous token).
      tool_prob: probability of TOOL at each step where an observation and one more action fit.
      stickiness: logit bonus for a response word of the same reward cluster as the previous
        token, which makes good or bad stretches persist and values depend on the state.
      truncation_reward: added to the last action when the response runs out of budget
        without EOS.
      table_seed: seeds the actor's transition and reward tables (the fixed world).
    """

    vocab_size: int = 32
    n_prompt_tokens: int = 8
    n_obs_tokens: int = 4
    prompt_min_len: int = 2
    prompt_max_len: int = 8
    response_max_len: int = 24
    obs_len: int = 2
    eos_prob: float = 0.06
    tool_prob: float = 0.06
    stickiness: float = 4.0
    truncation_reward: float = -1.0
    table_seed: int = 0

    def __post_init__(self):
        def check(ok: bool, what: str, received: str):
            if not ok:
                raise ValueError(f"MRPConfig: {what}. Received: {received}")

        words = self.vocab_size - 4 - self.n_obs_tokens - self.n_prompt_tokens
        check(
            self.n_prompt_tokens >= 1 and self.n_obs_tokens >= 0,
            "n_prompt_tokens must be >= 1 and n_obs_tokens >= 0",
            f"n_prompt_tokens={self.n_prompt_tokens}, n_obs_tokens={self.n_obs_tokens}",
        )
        check(
            words >= 2,
            "vocab_size must leave at least 2 response words after the 4 special tokens, the "
            "observation tokens and the prompt words",
            f"vocab_size={self.vocab_size}, n_obs_tokens={self.n_obs_tokens}, "
            f"n_prompt_tokens={self.n_prompt_tokens}",
        )
        check(
            1 <= self.prompt_min_len <= self.prompt_max_len,
            "need 1 <= prompt_min_len <= prompt_max_len",
            f"prompt_min_len={self.prompt_min_len}, prompt_max_len={self.prompt_max_len}",
        )
        check(
            self.response_max_len >= 1,
            "response_max_len must be >= 1",
            f"response_max_len={self.response_max_len}",
        )
        check(self.obs_len >= 0, "obs_len must be >= 0", f"obs_len={self.obs_len}")
        check(
            self.obs_len == 0 or self.n_obs_tokens >= 1,
            "obs_len > 0 needs n_obs_tokens >= 1",
            f"obs_len={self.obs_len}, n_obs_tokens={self.n_obs_tokens}",
        )
        check(0.0 < self.eos_prob < 1.0, "eos_prob must be in (0, 1)", f"{self.eos_prob}")
        check(0.0 <= self.tool_prob < 1.0, "tool_prob must be in [0, 1)", f"{self.tool_prob}")
        check(
            self.eos_prob + self.tool_prob < 0.9,
            "eos_prob + tool_prob must be < 0.9 so that words stay likely",
            f"eos_prob={self.eos_prob}, tool_prob={self.tool_prob}",
        )
        check(
            math.isfinite(self.stickiness) and self.stickiness >= 0,
            "stickiness must be finite and >= 0",
            f"{self.stickiness}",
        )
        check(
            math.isfinite(self.truncation_reward),
            "truncation_reward must be finite",
            f"{self.truncation_reward}",
        )
        check(self.table_seed >= 0, "table_seed must be >= 0", f"{self.table_seed}")

    @property
    def seq_len(self) -> int:
        """T = prompt_max_len + response_max_len, the width of every sampled batch."""
        return self.prompt_max_len + self.response_max_len

    @property
    def obs_range(self) -> tuple[int, int]:
        """[lo, hi) token ids of the observation tokens."""
        return 4, 4 + self.n_obs_tokens

    @property
    def prompt_range(self) -> tuple[int, int]:
        """[lo, hi) token ids of the prompt words."""
        lo = 4 + self.n_obs_tokens
        return lo, lo + self.n_prompt_tokens

    @property
    def word_range(self) -> tuple[int, int]:
        """[lo, hi) token ids of the response words."""
        return 4 + self.n_obs_tokens + self.n_prompt_tokens, self.vocab_size


@dataclasses.dataclass(frozen=True)
class MRPTables:
    """The fixed actor of an `MRPConfig`, as arrays (V = vocab_size, R = response_max_len).

    Attributes:
      probs: float64 [R, V, V]; probs[j, p, x] = P(next action x | previous non-observation
        token p, response column j). Zero for every x that is not a response word, EOS or TOOL.
      ref_probs: float64 [R, V, V]; a flatter reference policy on the same support (source of
        the synthetic `ref_logprobs`).
      rewards: float64 [R, V, V]; reward for emitting x in state (p, j), the truncation reward
        included at j = R - 1.
      cluster: int64 [V]; reward cluster (0 good, 1 bad, -1 none) of each token.
    """

    probs: np.ndarray
    ref_probs: np.ndarray
    rewards: np.ndarray
    cluster: np.ndarray


@functools.lru_cache(maxsize=16)
def mrp_tables(config: MRPConfig) -> MRPTables:
    """The seeded transition and reward tables of `config` (cached; treat as read-only).

    Returns:
      `MRPTables` with arrays [R, V, V] indexed (response column, previous token, next token).
    """
    rng = np.random.default_rng(config.table_seed)
    vocab, r_len = config.vocab_size, config.response_max_len
    w_lo, w_hi = config.word_range
    p_lo, p_hi = config.prompt_range

    cluster = np.full(vocab, -1, np.int64)
    cluster[w_lo:w_hi] = rng.permutation(np.arange(w_hi - w_lo) % 2)
    cluster[p_lo:p_hi] = rng.integers(0, 2, p_hi - p_lo)
    word_reward = np.zeros(vocab)
    magnitude = rng.uniform(_WORD_REWARD_LOW, _WORD_REWARD_HIGH, w_hi - w_lo)
    word_reward[w_lo:w_hi] = np.where(cluster[w_lo:w_hi] == 0, magnitude, -magnitude)
    eos_reward = rng.normal(0.0, _EOS_REWARD_STD, vocab)

    logits = rng.normal(0.0, 1.0, (vocab, w_hi - w_lo))
    same = (cluster[:, None] == cluster[None, w_lo:w_hi]) & (cluster[:, None] >= 0)
    logits = logits + config.stickiness * same
    eos_p = np.clip(config.eos_prob * np.exp(_EOS_PROB_SPREAD * rng.normal(size=vocab)), 0.005, 0.5)

    def policy(word_logits: np.ndarray) -> np.ndarray:
        word_p = np.exp(word_logits - word_logits.max(-1, keepdims=True))
        word_p /= word_p.sum(-1, keepdims=True)
        out = np.zeros((r_len, vocab, vocab))
        for j in range(r_len):
            tool_ok = config.obs_len > 0 and j + 1 + config.obs_len <= r_len - 1
            tool_p = config.tool_prob if tool_ok else 0.0
            out[j, :, w_lo:w_hi] = (1.0 - eos_p - tool_p)[:, None] * word_p
            out[j, :, EOS] = eos_p
            out[j, :, TOOL] = tool_p
        return out

    rewards = np.zeros((r_len, vocab, vocab))
    rewards[:, :, w_lo:w_hi] = word_reward[w_lo:w_hi]
    rewards[:, :, EOS] = eos_reward
    rewards[:, :, TOOL] = _TOOL_REWARD
    not_eos = np.arange(vocab) != EOS
    rewards[r_len - 1, :, not_eos] += config.truncation_reward
    tables = MRPTables(
        probs=policy(logits),
        ref_probs=policy(0.5 * logits),
        rewards=rewards,
        cluster=cluster,
    )
    for a in (tables.probs, tables.ref_probs, tables.rewards, tables.cluster):
        a.flags.writeable = False
    return tables


@functools.lru_cache(maxsize=64)
def _value_table(config: MRPConfig, gamma: float) -> np.ndarray:
    tables = mrp_tables(config)
    r_len, vocab = config.response_max_len, config.vocab_size
    values = np.zeros((r_len + 1, vocab))
    for j in range(r_len - 1, -1, -1):
        # After a word x the state is (x, j + 1); after TOOL it is (TOOL, j + 1 + obs_len): the
        # observation tokens are transparent, so they are not discounted. EOS and the last
        # column end the episode.
        cont = np.zeros(vocab)
        if j < r_len - 1:
            cont[:] = gamma * values[j + 1]
            cont[TOOL] = gamma * values[min(j + 1 + config.obs_len, r_len), TOOL]
        cont[EOS] = 0.0
        values[j] = (tables.probs[j] * (tables.rewards[j] + cont[None, :])).sum(-1)
    values.flags.writeable = False
    return values


def mrp_value_table(config: MRPConfig, *, gamma: float = 1.0) -> np.ndarray:
    """Exact state values of the synthetic MRP by backward dynamic programming.

    V(j, p) = Σ_x P(x | p, j) · [r(p, x, j) + γ · V(next state)], where the next state after a
    word x is (x, j + 1), after TOOL it is (TOOL, j + 1 + obs_len) (observation tokens neither
    discount nor reward), and EOS or the last column (j = R - 1) ends the episode.

    Args:
      config: the MRP.
      gamma: discount in [0, 1], applied once between consecutive action tokens.

    Returns:
      float64 [R + 1, V]; values[j, p] = V* of choosing the action at response column j after
      previous non-observation token p. Row R is 0.

    Raises:
      ValueError: if gamma is outside [0, 1].
    """
    _check_gamma(gamma)
    return _value_table(config, float(gamma))


def _check_gamma(gamma: float):
    if not (0.0 <= float(gamma) <= 1.0):
        raise ValueError(f"gamma must be in [0, 1]. Received: gamma={gamma}")


def _simulate(
    config: MRPConfig, p0: np.ndarray, j0: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Runs the actor from states (p0[b], j0) to the end of the response.

    Returns [B, R] response-column arrays: tokens, mask (bool), state (the p of each action),
    rewards, logprobs, ref_logprobs; columns before j0 hold PAD.
    """
    tables = mrp_tables(config)
    rows, r_len = p0.shape[0], config.response_max_len
    o_lo, o_hi = config.obs_range
    out = {
        "tokens": np.zeros((rows, r_len), np.int32),
        "mask": np.zeros((rows, r_len), bool),
        "state": np.zeros((rows, r_len), np.int64),
        "rewards": np.zeros((rows, r_len)),
        "logprobs": np.zeros((rows, r_len)),
        "ref_logprobs": np.zeros((rows, r_len)),
    }
    p = p0.astype(np.int64).copy()
    alive = np.ones(rows, bool)
    obs_left = np.zeros(rows, np.int64)
    for j in range(j0, r_len):
        u = rng.random(rows)
        obs_token = rng.integers(o_lo, max(o_hi, o_lo + 1), rows)
        in_obs = alive & (obs_left > 0)
        out["tokens"][in_obs, j] = obs_token[in_obs]
        obs_left[in_obs] -= 1
        act = alive & ~in_obs
        cdf = np.cumsum(tables.probs[j, p], axis=-1)
        x = np.minimum((u[:, None] >= cdf).sum(-1), config.vocab_size - 1)
        out["tokens"][act, j] = x[act]
        out["mask"][act, j] = True
        out["state"][act, j] = p[act]
        out["rewards"][act, j] = tables.rewards[j, p[act], x[act]]
        out["logprobs"][act, j] = np.log(tables.probs[j, p[act], x[act]])
        out["ref_logprobs"][act, j] = np.log(tables.ref_probs[j, p[act], x[act]])
        obs_left[act & (x == TOOL)] = config.obs_len
        alive &= ~(act & (x == EOS))
        p = np.where(act, x, p)
    return out


def sample_mrp(
    config: MRPConfig,
    *,
    seed: int | Sequence[int],
    batch_size: int,
    gamma: float = 1.0,
) -> dict[str, np.ndarray]:
    """Samples a batch of sequences from the synthetic MRP, with their exact values.

    Deterministic given (config, seed, batch_size); vectorised over rows.

    Args:
      config: the MRP.
      seed: a non-negative int or a sequence of them (the entropy of a `np.random.SeedSequence`).
      batch_size: rows B.
      gamma: discount in [0, 1] that `true_values` are computed for.

    Returns:
      With T = config.seq_len:
      tokens int32 [B, T]; attention_mask int32 [B, T]; mask float32 [B, T] (1 on actions);
      rewards float32 [B, T] (0 off the mask); true_values float32 [B, T] (V*(s_t) for these
      token-level rewards and gamma, 0 off the mask); sequence_reward float32 [B] (each row's
      sum of rewards); logprobs, ref_logprobs float32 [B, T] (log-probabilities of each action
      under the actor and a flatter reference policy, 0 off the mask).

    Raises:
      ValueError: on a negative seed or batch size, or gamma outside [0, 1].
    """
    _check_gamma(gamma)
    seeds = [seed] if isinstance(seed, int | np.integer) else list(seed)
    if batch_size < 0 or any(int(s) < 0 for s in seeds):
        raise ValueError(
            f"sample_mrp needs batch_size >= 0 and non-negative seeds. Received: "
            f"batch_size={batch_size}, seed={seed}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(s) for s in seeds]))
    p_len, r_len = config.prompt_max_len, config.response_max_len
    pw_lo, pw_hi = config.prompt_range

    lengths = rng.integers(config.prompt_min_len, config.prompt_max_len + 1, batch_size)
    words = rng.integers(pw_lo, pw_hi, (batch_size, p_len))
    col = np.arange(p_len)
    start = p_len - lengths[:, None]
    prompt = np.where(col > start, words, np.where(col == start, BOS, PAD)).astype(np.int32)

    resp = _simulate(config, prompt[:, -1], 0, rng)
    values = _value_table(config, float(gamma))
    j = np.broadcast_to(np.arange(r_len), resp["state"].shape)
    resp_values = np.where(resp["mask"], values[j, resp["state"]], 0.0)

    def full(x: np.ndarray, dtype) -> np.ndarray:
        return np.concatenate([np.zeros((batch_size, p_len), dtype), x.astype(dtype)], axis=1)

    tokens = np.concatenate([prompt, resp["tokens"]], axis=1)
    rewards = full(resp["rewards"], np.float32)
    return {
        "tokens": tokens,
        "attention_mask": (tokens != PAD).astype(np.int32),
        "mask": full(resp["mask"], np.float32),
        "rewards": rewards,
        "true_values": full(resp_values, np.float32),
        "sequence_reward": resp["rewards"].sum(-1).astype(np.float32),
        "logprobs": full(resp["logprobs"], np.float32),
        "ref_logprobs": full(resp["ref_logprobs"], np.float32),
    }


def mrp_true_values(config: MRPConfig, tokens: np.ndarray, *, gamma: float = 1.0) -> np.ndarray:
    """V* of every action position of sequences already sampled from `config`.

    The state of the action at column t is (p, j): p is the last token before t that is neither
    padding nor an observation token (a prompt token or an earlier action), j = t - prompt_max_len.

    Args:
      config: the MRP the tokens were sampled from.
      tokens: int [..., T] with T = config.seq_len, laid out as `sample_mrp` lays them out.
      gamma: discount in [0, 1].

    Returns:
      float32 [..., T]: V*(s_t) at action positions (response tokens other than padding and
      observations), 0 elsewhere.

    Raises:
      ValueError: on a last axis other than config.seq_len or gamma outside [0, 1].
    """
    values = mrp_value_table(config, gamma=gamma)
    tokens = np.asarray(tokens)
    if tokens.shape[-1] != config.seq_len:
        raise ValueError(
            f"tokens must have seq_len = {config.seq_len} columns. Received: shape {tokens.shape}"
        )
    o_lo, o_hi = config.obs_range
    is_obs = (tokens >= o_lo) & (tokens < o_hi)
    is_state = (tokens != PAD) & ~is_obs
    t_idx = np.arange(tokens.shape[-1])
    last = np.maximum.accumulate(np.where(is_state, t_idx, 0), axis=-1)
    prev = np.concatenate([np.zeros_like(last[..., :1]), last[..., :-1]], axis=-1)
    p = np.take_along_axis(tokens, prev, axis=-1)
    j = np.clip(t_idx - config.prompt_max_len, 0, config.response_max_len - 1)
    action = is_state & (t_idx >= config.prompt_max_len)
    return np.where(action, values[j, p], 0.0).astype(np.float32)


def describe_mrp(config: MRPConfig | None = None, *, gamma: float = 1.0) -> str:
    """A human-readable description of the synthetic MRP with statistics of its V*.

    Returns:
      Several lines of text: the vocabulary layout, the dynamics, the rewards, and the mean and
      standard deviation of V* over action tokens of 4096 sampled rows (seed 0).
    """
    config = config or MRPConfig()
    batch = sample_mrp(config, seed=0, batch_size=4096, gamma=gamma)
    m = batch["mask"] > 0
    v = batch["true_values"][m]
    resp_len = (batch["attention_mask"][:, config.prompt_max_len :]).sum(-1)
    tool = (batch["tokens"] == TOOL).sum() / len(resp_len)
    truncated = (batch["tokens"][:, -1] != PAD) & (batch["tokens"][:, -1] != EOS)
    o_lo, o_hi = config.obs_range
    p_lo, p_hi = config.prompt_range
    w_lo, w_hi = config.word_range
    return "\n".join(
        [
            f"Synthetic token MRP (table_seed={config.table_seed}, gamma={gamma}):",
            f"  vocabulary {config.vocab_size}: PAD=0 BOS=1 EOS=2 TOOL=3, observations "
            f"[{o_lo},{o_hi}), prompt words [{p_lo},{p_hi}), response words [{w_lo},{w_hi})",
            f"  T = {config.seq_len}: prompt of {config.prompt_min_len}..{config.prompt_max_len}"
            f" tokens (BOS + random prompt words) left-padded into {config.prompt_max_len} "
            f"columns, response right-padded into {config.response_max_len} columns",
            "  the actor picks the next action from a seeded table P(x | p, j): p = previous "
            "non-observation token, j = response column; words fall into a good (+reward) and a "
            f"bad (-reward) cluster and stick to the cluster of p (stickiness "
            f"{config.stickiness})",
            f"  rewards: word +-[{_WORD_REWARD_LOW}, {_WORD_REWARD_HIGH}], TOOL {_TOOL_REWARD} "
            f"then {config.obs_len} masked observation tokens (no reward, no discount, state "
            f"unchanged), EOS ends with a terminal reward depending on p (std "
            f"{_EOS_REWARD_STD}), running out of the budget adds {config.truncation_reward}",
            "  V*(p, j) by backward dynamic programming over the finite state (p, j)",
            f"  4096 rows: response length {resp_len.mean():.1f} +- {resp_len.std():.1f}, "
            f"TOOL calls per row {tool:.2f}, truncated {truncated.mean():.0%}",
            f"  V* over action tokens: mean {v.mean():.3f}, std {v.std():.3f}, "
            f"range [{v.min():.2f}, {v.max():.2f}]",
        ]
    )


# --------------------------------------------------------------------------------------------
# Parquet rollouts.


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
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def fail_at(column: str, bad: np.ndarray, what: str):
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(starts, i, side="right") - 1)
        fail(row, column, f"position {i - starts[row]}: {what}")

    tokens = flat["tokens"]
    low = tokens < 0
    if low.any():
        fail_at("tokens", low, f"token id {tokens[low][0]} is negative.")
    limit = np.iinfo(np.int32).max + 1 if vocab_size is None else vocab_size
    if (high := tokens >= limit).any():
        fail_at("tokens", high, f"token id {tokens[high][0]} >= vocab_size {limit}.")
    attention = flat["attention_mask"].astype(np.int64)
    if (bad := (attention != 0) & (attention != 1)).any():
        fail_at("attention_mask", bad, f"value {attention[bad][0]} is not 0 or 1.")
    mask = flat["mask"].astype(np.float64)
    if (bad := ~np.isfinite(mask)).any():
        fail_at("mask", bad, "is not finite.")
    if (bad := (mask != 0) & (attention == 0)).any():
        fail_at("mask", bad, "marks padding (attention_mask 0) as an action.")
    valid = mask != 0
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
      RolloutError (a ValueError): on any invalid file, row or column, or no rows at all.
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
    optional = ("old_values", "logprobs", "ref_logprobs", "true_values")
    if kl_coef > 0:
        for file, _, flat, _ in parts:
            for k in ("logprobs", "ref_logprobs"):
                if k not in flat:
                    raise RolloutError(f"{file}: column {k!r}: missing, and kl_coef={kl_coef} > 0.")
    shared = [k for k in optional if all(k in p[2] for p in parts)]

    out: dict[str, list[np.ndarray]] = {}
    for _, lengths, flat, sequence_reward in parts:
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
        arrays["rewards"] = np.where(mask != 0, np.asarray(rewards), 0).astype(np.float32)
        for k, v in arrays.items():
            out.setdefault(k, []).append(v)
    result = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    if result["tokens"].shape[0] == 0:
        raise RolloutError(f"No rows in {files}.")
    return result


# --------------------------------------------------------------------------------------------
# The data section of the config and the iterator the trainer uses.


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where rollout batches come from.

    Attributes:
      path: Parquet file, folder or glob of rollouts; None trains on the synthetic MRP.
      mrp: the synthetic MRP (used when path is None).
      batch_size: rows per rollout batch, over all processes.
      shuffle: shuffle Parquet rows (with a new order each epoch).
      max_len: width T of Parquet batches; None: the longest row.
      vocab_size: if set, Parquet token ids must be below it.
      kl_coef: weight of the KL penalty subtracted from Parquet rewards (needs the `logprobs`
        and `ref_logprobs` columns). The synthetic MRP's rewards carry none, so that its true
        values stay exact.
      kl_kind: "k1", "k2" or "k3".
      kl_clamp: optional bound on the per-token KL estimate.
    """

    path: str | None = None
    mrp: MRPConfig = dataclasses.field(default_factory=MRPConfig)
    batch_size: int = 64
    shuffle: bool = True
    max_len: int | None = None
    vocab_size: int | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k1"
    kl_clamp: float | None = None

    def __post_init__(self):
        def check(ok: bool, what: str, received: str):
            if not ok:
                raise ValueError(f"DataConfig: {what}. Received: {received}")

        check(self.path is None or bool(self.path), "path must be non-empty", repr(self.path))
        check(self.batch_size >= 1, "batch_size must be >= 1", f"batch_size={self.batch_size}")
        check(
            self.max_len is None or self.max_len >= 1,
            "max_len must be None or >= 1",
            f"max_len={self.max_len}",
        )
        check(
            self.vocab_size is None or self.vocab_size >= 1,
            "vocab_size must be None or >= 1",
            f"vocab_size={self.vocab_size}",
        )
        check(
            math.isfinite(self.kl_coef) and self.kl_coef >= 0,
            "kl_coef must be finite and >= 0",
            f"kl_coef={self.kl_coef}",
        )
        check(self.kl_kind in KL_KINDS, f"kl_kind must be one of {KL_KINDS}", repr(self.kl_kind))
        check(
            self.kl_clamp is None or self.kl_clamp > 0,
            "kl_clamp must be None or > 0",
            f"kl_clamp={self.kl_clamp}",
        )
        check(
            self.path is not None or self.kl_coef == 0,
            "kl_coef applies to Parquet rollouts (path); the synthetic MRP has no KL term",
            f"path=None, kl_coef={self.kl_coef}",
        )


_BATCH_KEYS = ("tokens", "attention_mask", "mask", "rewards", "old_values", "true_values")


class RolloutIterator(Iterator[dict[str, np.ndarray]]):
    """Yields this process's rows of each rollout batch, forever, with a checkpointable position.

    Each item is a dict of NumPy arrays of fixed shape: tokens int32 [b, T], attention_mask
    int32 [b, T], mask float32 [b, T], rewards float32 [b, T], plus old_values / true_values
    float32 [b, T] when the data has them, where b = batch_size // process_count. The rows of
    process i are rows [i*b, (i+1)*b) of the global batch, so the processes' items concatenate
    to the one-process item.
    """

    def __iter__(self) -> RolloutIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        """The position, as a JSON-serialisable dict."""
        raise NotImplementedError

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position returned by `get_state`: the next items are those that followed.

        Raises:
          ValueError: if the state belongs to a different kind of source or data set.
        """
        raise NotImplementedError


class _MRPIterator(RolloutIterator):
    """Batch i is `sample_mrp(seed=(seed, 0, i))`; the state is {"source": "mrp", "batch": i}."""

    def __init__(self, config: DataConfig, *, seed: int, gamma: float, rows: slice):
        self._config, self._seed, self._gamma, self._rows = config, seed, gamma, rows
        self._batch = 0

    def __next__(self) -> dict[str, np.ndarray]:
        full = sample_mrp(
            self._config.mrp,
            seed=(self._seed, _TRAIN_STREAM, self._batch),
            batch_size=self._config.batch_size,
            gamma=self._gamma,
        )
        self._batch += 1
        return {k: full[k][self._rows] for k in _BATCH_KEYS if k in full}

    def get_state(self) -> dict[str, Any]:
        return {"source": "mrp", "batch": self._batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("source") != "mrp" or not isinstance(state.get("batch"), int):
            raise ValueError(f"Not a synthetic-MRP iterator state. Received: {dict(state)}")
        self._batch = state["batch"]


class _ParquetIterator(RolloutIterator):
    """A grain pipeline over the rows of validated Parquet rollouts.

    `MapDataset.range(N)` -> seeded `shuffle` (a new order each epoch) -> infinite `repeat` ->
    `batch(batch_size)` of global row indices -> this process's slice of the indices -> gather the
    rows. Batches run across epoch boundaries, so none is short. The state is grain's own
    iterator state (a small JSON dict) plus the row count, checked on restore.
    """

    def __init__(self, config: DataConfig, *, seed: int, rows: slice):
        assert config.path is not None
        arrays = read_rollouts(
            config.path,
            vocab_size=config.vocab_size,
            kl_coef=config.kl_coef,
            kl_kind=config.kl_kind,
            kl_clamp=config.kl_clamp,
            max_len=config.max_len,
        )
        self._arrays = {k: arrays[k] for k in _BATCH_KEYS if k in arrays}
        self._num_rows = arrays["tokens"].shape[0]
        dataset = grain.MapDataset.range(self._num_rows)
        if config.shuffle:
            dataset = dataset.shuffle(seed=_grain_seed(seed))
        dataset = dataset.repeat(None).batch(config.batch_size)
        dataset = dataset.map(lambda index: {k: v[index[rows]] for k, v in self._arrays.items()})
        # No read-ahead: gathering a batch is cheap, and the state then never runs ahead.
        self._dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
        self._iterator = iter(self._dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"source": "parquet", "rows": self._num_rows, "grain": self._iterator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("source") != "parquet" or "grain" not in state:
            raise ValueError(f"Not a Parquet iterator state. Received: {dict(state)}")
        if state.get("rows") != self._num_rows:
            raise ValueError(
                f"The iterator state was saved over {state.get('rows')} rollout rows, but the "
                f"data now has {self._num_rows}. Received: {dict(state)}"
            )
        self._iterator.set_state(dict(state["grain"]))


def _grain_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _TRAIN_STREAM]).generate_state(1)[0])


def make_rollout_iterator(
    config: DataConfig,
    *,
    seed: int,
    gamma: float,
    process_index: int = 0,
    process_count: int = 1,
) -> RolloutIterator:
    """The infinite, checkpointable iterator of rollout batches that the trainer reads.

    Synthetic MRP (config.path is None): batch i is `sample_mrp(config.mrp, seed=(seed, 0, i),
    batch_size=config.batch_size, gamma=gamma)` with `true_values`. Parquet: a grain pipeline
    (seeded shuffle per epoch, repeat, batch) over the rows of `read_rollouts(config.path, ...)`.

    Args:
      config: the data section.
      seed: a non-negative int; seeds the synthetic batches or the shuffle.
      gamma: discount in [0, 1] of the synthetic true values.
      process_index: this process, in [0, process_count).
      process_count: processes sharing each global batch.

    Returns:
      A `RolloutIterator`: dicts of [batch_size // process_count, T] arrays (see there).

    Raises:
      ValueError: if batch_size is not divisible by process_count, on a bad process index, seed or
        gamma, or (`RolloutError`) on invalid rollout files.
    """
    _check_gamma(gamma)
    if seed < 0:
        raise ValueError(f"seed must be >= 0. Received: seed={seed}")
    if process_count < 1 or not (0 <= process_index < process_count):
        raise ValueError(
            "Need process_count >= 1 and 0 <= process_index < process_count. Received: "
            f"process_index={process_index}, process_count={process_count}"
        )
    if config.batch_size % process_count:
        raise ValueError(
            f"data.batch_size must be divisible by the process count {process_count}. "
            f"Received: batch_size={config.batch_size}"
        )
    per = config.batch_size // process_count
    rows = slice(process_index * per, (process_index + 1) * per)
    if config.path is None:
        return _MRPIterator(config, seed=seed, gamma=gamma, rows=rows)
    return _ParquetIterator(config, seed=seed, rows=rows)


def held_out_batch(config: DataConfig, *, seed: int, gamma: float, n: int) -> dict[str, np.ndarray]:
    """A held-out synthetic batch with true values, on a random stream disjoint from training.

    Args:
      config: the data section; must use the synthetic MRP (path None).
      seed: the run's seed (the same one the training iterator gets).
      gamma: discount in [0, 1] of the true values.
      n: rows.

    Returns:
      `sample_mrp(config.mrp, seed=(seed, 1), batch_size=n, gamma=gamma)`: tokens, attention_mask,
      mask, rewards, true_values [n, T] and the other keys of `sample_mrp`.

    Raises:
      ValueError: when config.path is set (Parquet rollouts have no known true values).
    """
    if config.path is not None:
        raise ValueError(
            "held_out_batch needs the synthetic MRP (data.path=None): Parquet rollouts have no "
            f"known true values. Received: path={config.path!r}"
        )
    return sample_mrp(config.mrp, seed=(seed, _HELD_OUT_STREAM), batch_size=n, gamma=gamma)
