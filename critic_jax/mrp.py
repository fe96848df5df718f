"""The synthetic token MRP: a fixed stochastic actor over a small vocabulary whose exact values
V* and action values Q* are known, so every run can say how far its critic is from the truth.

A fixed "actor" writes a response after a random prompt; the process is Markov in (last
non-observation token `p`, response column `j`), so V*(p, j) of every action position is computed
exactly by backward dynamic programming (`mrp_value_table`), and the action value of emitting `x`
there is Q*(p, j, x) = r(p, j, x) + γ·V*(next state). `describe_mrp` prints the details.

Batches are dicts of NumPy arrays aligned to token positions (time axis last); see `sample_mrp`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

PAD, BOS, EOS, TOOL = 0, 1, 2, 3

# Fixed reward scales of the synthetic MRP (the seeded tables draw around them).
_WORD_REWARD_LOW, _WORD_REWARD_HIGH = 0.2, 0.8
_EOS_REWARD_STD = 1.0
_TOOL_REWARD = -0.2
_EOS_PROB_SPREAD = 0.5


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


def _continuation(config: MRPConfig, values: np.ndarray, j: int, gamma: float) -> np.ndarray:
    """γ·V*(next state) after each action x at response column j, float64 [V].

    After a word x the state is (x, j + 1); after TOOL it is (TOOL, j + 1 + obs_len): the
    observation tokens are transparent, so they are not discounted. EOS and the last column end
    the episode.
    """
    r_len = config.response_max_len
    cont = np.zeros(config.vocab_size)
    if j < r_len - 1:
        cont[:] = gamma * values[j + 1]
        cont[TOOL] = gamma * values[min(j + 1 + config.obs_len, r_len), TOOL]
    cont[EOS] = 0.0
    return cont


@functools.lru_cache(maxsize=64)
def _value_table(config: MRPConfig, gamma: float) -> np.ndarray:
    tables = mrp_tables(config)
    r_len, vocab = config.response_max_len, config.vocab_size
    values = np.zeros((r_len + 1, vocab))
    for j in range(r_len - 1, -1, -1):
        cont = _continuation(config, values, j, gamma)
        values[j] = (tables.probs[j] * (tables.rewards[j] + cont[None, :])).sum(-1)
    values.flags.writeable = False
    return values


@functools.lru_cache(maxsize=64)
def _action_value_table(config: MRPConfig, gamma: float) -> np.ndarray:
    tables = mrp_tables(config)
    values = _value_table(config, gamma)
    q = np.stack(
        [
            tables.rewards[j] + _continuation(config, values, j, gamma)[None, :]
            for j in range(config.response_max_len)
        ]
    )
    q.flags.writeable = False
    return q


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


def mrp_action_value_table(config: MRPConfig, *, gamma: float = 1.0) -> np.ndarray:
    """Exact action values Q*(p, j, x) = r(p, j, x) + γ·V*(state after x) of the synthetic MRP.

    Returns:
      float64 [R, V, V]; q[j, p, x] for the action x at response column j after previous
      non-observation token p. The true advantage of an action is q[j, p, x] − V*[j, p].

    Raises:
      ValueError: if gamma is outside [0, 1].
    """
    _check_gamma(gamma)
    return _action_value_table(config, float(gamma))


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
      token-level rewards and gamma, 0 off the mask); true_advantages float32 [B, T]
      (A*(s_t, a_t) = Q*(s_t, a_t) − V*(s_t) of the sampled action, 0 off the mask);
      sequence_reward float32 [B] (each row's
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
    q = _action_value_table(config, float(gamma))
    resp_q = np.where(resp["mask"], q[j, resp["state"], resp["tokens"]], 0.0)

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
        "true_advantages": full(resp_q - resp_values, np.float32),
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
    return lookup_states(config, tokens, mrp_value_table(config, gamma=gamma))


def mrp_remaining_actions(config: MRPConfig, tokens: np.ndarray) -> np.ndarray:
    """N(s_t): the expected number of actions from each action token's state to the end of its
    response, that token included (V* of a reward of 1 per action with γ = 1), 0 elsewhere.
    A reward changed to a·r + b per action has V*' = a·V* + b·N.

    Returns:
      float32 [..., T] for tokens laid out as `sample_mrp` lays them out.
    """
    probs = mrp_tables(config).probs
    table = np.zeros((config.response_max_len + 1, config.vocab_size))
    for j in range(config.response_max_len - 1, -1, -1):
        table[j] = (probs[j] * (1.0 + _continuation(config, table, j, 1.0)[None, :])).sum(-1)
    return lookup_states(config, tokens, table)


def lookup_states(config: MRPConfig, tokens: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`table[j, p]` ([R + 1, V], by response column and previous non-observation token) read at
    the state of every action token of `tokens` [..., T]; 0 at other positions.

    Raises:
      ValueError: on a last axis other than config.seq_len.
    """
    tokens = np.asarray(tokens)
    if tokens.shape[-1] != config.seq_len:
        raise ValueError(
            f"tokens must have seq_len = {config.seq_len} columns. Received: shape {tokens.shape}"
        )
    values = table
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
