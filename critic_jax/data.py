"""The data section of the config and the rollout iterators the trainer reads.

Every batch is a dict of NumPy arrays aligned to token positions (time axis last):

- `tokens` int32 [B, T]: left-padded prompt, then a right-padded response; PAD = 0.
- `attention_mask` int32 [B, T]: 1 on prompt and response tokens, 0 on padding.
- `mask` float32 [B, T]: 1 where token t is an action (a generated response token whose loss
  counts); 0 on the prompt, padding and observation tokens inside a response.
- `rewards` float32 [B, T]: reward for emitting token t; 0 off the mask, reward shaping (the KL
  penalty, a sequence reward on the last action) already applied, once, by `rollouts`.
- `old_values`, `true_values`, `true_advantages` float32 [B, T] when the source has them.

`make_rollout_iterator` yields this process's rows of each global batch with a fixed shape and
has a JSON-ready `get_state` / `set_state`, so a checkpoint can store its position: the synthetic
MRP of `critic_jax.mrp` (the default) or Parquet rollouts (`critic_jax.rollouts`) through grain.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from critic_jax.mrp import MRPConfig, _check_gamma, sample_mrp
from critic_jax.rewards import KL_KINDS
from critic_jax.rollouts import read_rollouts

# Seed-sequence tags keep training batches and the held-out batch on disjoint random streams.
_TRAIN_STREAM, _HELD_OUT_STREAM = 0, 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where rollout batches come from.

    Attributes:
      path: Parquet file, folder or glob of rollouts; None trains on the synthetic MRP.
      mrp: the synthetic MRP (used when path is None).
      batch_size: rows per rollout batch, over all processes.
      shuffle: shuffle Parquet rows (with a new order each epoch).
      max_len: width T of Parquet batches (the packed row length when packing); None: the
        longest rollout. A rollout longer than this is an error naming its file and row.
      packing: pack several rollouts into each row of `max_len` tokens (grain's first-fit
        packing; rows carry `segment_ids`, 0 on padding), so no compute is spent on padding.
        None: on for Parquet rollouts, off for the synthetic MRP (whose rows are 32 tokens).
      vocab_size: if set, Parquet token ids must be below it (the model's vocabulary is
        always checked as well).
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
    packing: bool | None = None
    vocab_size: int | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k1"
    kl_clamp: float | None = None

    @property
    def packed(self) -> bool:
        """Whether batches are packed (`packing`, with its default resolved)."""
        return self.path is not None if self.packing is None else self.packing

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
            not (self.packing and self.path is None),
            "packing applies to Parquet rollouts (path); the synthetic MRP's rows are padded",
            f"path=None, packing={self.packing}",
        )
        check(
            self.path is not None or self.kl_coef == 0,
            "kl_coef applies to Parquet rollouts (path); the synthetic MRP has no KL term",
            f"path=None, kl_coef={self.kl_coef}",
        )


_BATCH_KEYS = (
    "tokens",
    "attention_mask",
    "mask",
    "rewards",
    "old_values",
    "true_values",
    "true_advantages",
)


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
    padded: `batch(batch_size)` of global row indices -> this process's slice -> gather the rows;
    packed: each rollout without its padding (one with no attended token is skipped) ->
    `FirstFitPackIterDataset` into rows of `max_len` tokens with segment ids ->
    `batch(batch_size)` -> this process's slice. Every process runs the same (cheap,
    index-level) pipeline, so the processes' slices form one global batch. Batches run across
    epoch boundaries, so none is short. The state is grain's own iterator state (a small JSON
    dict) plus the row count, checked on restore.
    """

    def __init__(self, config: DataConfig, *, seed: int, rows: slice, vocab_size: int | None):
        assert config.path is not None
        arrays = read_rollouts(
            config.path,
            vocab_size=vocab_size,
            kl_coef=config.kl_coef,
            kl_kind=config.kl_kind,
            kl_clamp=config.kl_clamp,
            max_len=config.max_len,
        )
        self._arrays = {k: arrays[k] for k in _BATCH_KEYS if k in arrays}
        self._num_rows = arrays["tokens"].shape[0]
        self._packed = config.packed
        # Packing skips the rollouts with no attended token: they hold nothing to pack, and grain
        # would count each as a segment of no tokens (a row's ids 2, 4, ... instead of 1..k).
        source = (
            np.flatnonzero(self._arrays["attention_mask"].any(axis=1))
            if config.packed
            else np.arange(self._num_rows)
        )
        dataset = grain.MapDataset.range(len(source))
        if config.shuffle:
            dataset = dataset.shuffle(seed=_grain_seed(seed))
        dataset = dataset.repeat(None)
        if config.packed:
            width = arrays["tokens"].shape[1]
            unpadded = dataset.map(lambda i: self._rollout(int(source[i])))
            dataset = _packed(unpadded, self._arrays, width, config.batch_size)
        else:
            dataset = dataset.batch(config.batch_size).map(
                lambda index: {k: v[index] for k, v in self._arrays.items()}
            )
            dataset = dataset.to_iter_dataset(
                # No read-ahead: gathering a batch is cheap, and the state never runs ahead.
                grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            )
        self._dataset = dataset.map(lambda batch: {k: v[rows] for k, v in batch.items()})
        self._iterator = iter(self._dataset)

    def _rollout(self, index: int) -> dict[str, np.ndarray]:
        """Rollout `index` without its padding (its real tokens, in order)."""
        real = self._arrays["attention_mask"][index] != 0
        return {k: v[index][real] for k, v in self._arrays.items() if k != "attention_mask"}

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {
            "source": "parquet",
            "rows": self._num_rows,
            "packed": self._packed,
            "grain": self._iterator.get_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("source") != "parquet" or "grain" not in state:
            raise ValueError(f"Not a Parquet iterator state. Received: {dict(state)}")
        if state.get("rows") != self._num_rows:
            raise ValueError(
                f"The iterator state was saved over {state.get('rows')} rollout rows, but the "
                f"data now has {self._num_rows}. Received: {dict(state)}"
            )
        # The packed and the padded pipelines keep different grain states.
        on_off = {True: "on", False: "off"}
        if state.get("packed", self._packed) != self._packed:
            raise ValueError(
                f"The iterator state was saved with packing {on_off[not self._packed]}, but "
                f"packing is now {on_off[self._packed]}. Received: {dict(state)}"
            )
        try:
            self._iterator.set_state(dict(state["grain"]))
        except (KeyError, TypeError) as e:  # a state of the other pipeline, saved without "packed"
            raise ValueError(
                f"The iterator state does not fit this pipeline (packing {on_off[self._packed]}): "
                f"grain cannot restore it ({e!r}). Received: {dict(state)}"
            ) from e


def _packed(rollouts: grain.MapDataset, arrays, width: int, batch_size: int) -> grain.IterDataset:
    """Rollouts packed first-fit into rows of `width` tokens, batched `batch_size` rows at a time:
    dicts of [batch_size, width] arrays with `segment_ids` (1..k per row, 0 on padding) and an
    `attention_mask` that is 1 on every packed token."""
    keys = [k for k in arrays if k != "attention_mask"]
    packed = grain.experimental.FirstFitPackIterDataset(
        rollouts.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
        length_struct={k: width for k in keys},
        num_packing_bins=batch_size,
        shuffle_bins=False,
    )

    def finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: row[k] for k in keys}
        out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)
        out["attention_mask"] = (out["segment_ids"] != 0).astype(np.int32)
        return out

    return packed.map(finish).batch(batch_size)


def _grain_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _TRAIN_STREAM]).generate_state(1)[0])


def make_rollout_iterator(
    config: DataConfig,
    *,
    seed: int,
    gamma: float,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
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
      vocab_size: the model's vocabulary; Parquet token ids must be below it (and below
        `config.vocab_size` when that is set).

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
    limits = [v for v in (vocab_size, config.vocab_size) if v is not None]
    return _ParquetIterator(config, seed=seed, rows=rows, vocab_size=min(limits, default=None))


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
