"""Packed against padded rollouts: useful tokens per second of the trainer's own update.

Rollouts with a long-tailed (log-normal) length distribution, mean about a quarter of the maximum
`--max-len` (clipped there), random token ids from a small vocabulary, a prompt that is not an
action followed by a response that is (`mask`), and a random reward on each response's last
token, are written to one Parquet file with `write_rollouts(..., strip_padding=True)`. Two layouts
of the same file are then trained on in the same process, in alternating rounds:

- padded: `DataConfig(path, packing=False, max_len=T)`: one rollout per row of T tokens;
- packed: `DataConfig(path, packing=True, max_len=T)`: grain's first-fit packing, several
  rollouts per row of T tokens with `segment_ids`.

Both read their batches through the library's iterator (`data.make_rollout_iterator`), cast them
with `train.host_batch`, and run `train.make_trainer(...).update` (the jitted update of
`train.run`), with the same rows per batch, model and PPO settings. Only the update is timed
(to `block_until_ready`); the batch is fetched and placed before the clock starts. "Useful tokens"
are the real (attended, `attention_mask` = 1) tokens of the batch: the tokens the critic must
process; action tokens (`mask` = 1) are reported too. Each layout must compile exactly once for
the whole run (`update._cache_size() == 1`, checked). The load average is read before and after.

`--attention` and `--micro-batches` take several values: each combination runs both layouts (the
ratio compares the layouts of one combination). `flash_block_pairs_per_row` models the work of the
"xla-flash" attention from the library's loop bounds (see `flash_block_pairs`), which explains
the ratio; results/bench_packing.md has the analysis.

The default critic is the train-step benchmark's shape with one layer (width 256, 4 heads of 64,
MLP 688); the flags set another one.

    python experiments/bench_packing.py --micro-batches 1 8   # results/
    python experiments/bench_packing.py --d-model 64 --mlp-dim 128 --head-dim 16   # attention-bound
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from critic_jax import data as data_lib
from critic_jax import parallel, train
from critic_jax.config import PPOConfig, TrainConfig
from critic_jax.data import DataConfig
from critic_jax.models import ModelConfig
from critic_jax.models.attention import choose_implementation
from critic_jax.rollouts import write_rollouts

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_rollouts(
    n: int, max_len: int, vocab: int, seed: int, sigma: float = 0.8
) -> dict[str, np.ndarray]:
    """`n` rollouts [n, max_len] with log-normal lengths of mean about max_len / 4, clipped to
    [2, max_len]: a prompt (4..64 tokens, at most half the rollout) then a response (actions),
    right-padded; rewards: N(0, 1) on each response's last token."""
    rng = np.random.default_rng(seed)
    mu = np.log(max_len / 4) - sigma**2 / 2  # E[exp(N(mu, sigma^2))] = max_len / 4
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 2, max_len).astype(np.int64)
    prompt = np.minimum(rng.integers(4, 65, n), lengths // 2)
    pos = np.arange(max_len)[None, :]
    attention = pos < lengths[:, None]
    action = attention & (pos >= prompt[:, None])
    tokens = np.where(attention, rng.integers(1, vocab, (n, max_len)), 0).astype(np.int32)
    rewards = np.zeros((n, max_len), np.float32)
    rewards[np.arange(n), lengths - 1] = rng.normal(size=n).astype(np.float32)
    return {
        "tokens": tokens,
        "attention_mask": attention.astype(np.int32),
        "mask": action.astype(np.float32),
        "rewards": rewards,
    }


def flash_block_pairs(seg: np.ndarray, block: int, chunks: int) -> float:
    """(query block, key block) pairs that "xla-flash" visits, times the rows they are computed
    for, per row: the rows are split into `chunks` micro-batches, and within one the key range of
    query block i is shared by all its rows (`_segment_extents`: from the earliest start of any
    segment present in block i of any row, to i; a block of padding in every row reads nothing).
    A model of the library's loop bounds, for explaining the timings; not a timing."""
    rows, t = seg.shape
    nb = -(-t // block)
    seg = np.pad(seg, ((0, 0), (0, nb * block - t)))
    pos = np.arange(nb * block)
    starts = np.full(seg.shape, nb * block)
    for r in range(rows):
        for s in np.unique(seg[r][seg[r] != 0]):
            where = seg[r] == s
            starts[r, where] = pos[where].min()
    total = 0
    for part in np.array_split(np.arange(rows), chunks):
        first = starts[part].reshape(len(part), nb, block).min(axis=(0, 2))
        lo = np.minimum(first // block, np.arange(nb) + 1)
        total += len(part) * int(np.sum(np.arange(nb) + 1 - lo))
    return total / rows


class Layout:
    """One data layout: its iterator, trainer and state, timed one update at a time."""

    def __init__(self, name: str, config: TrainConfig):
        self.name, self.config = name, config
        self.mesh = parallel.make_mesh(config.mesh)
        graphdef, params = train.build_critic(config, self.mesh)
        self.state = train.init_state(config, self.mesh, params)
        self.trainer = train.make_trainer(config, self.mesh, graphdef, self.state)
        self.iterator = data_lib.make_rollout_iterator(
            config.data,
            seed=config.seed,
            gamma=config.ppo.gamma,
            vocab_size=config.model.vocab_size,
        )
        self.seconds: list[float] = []
        self.real: list[int] = []
        self.actions: list[int] = []
        self.slots: list[int] = []
        self.segments: list[int] = []
        self.losses: list[float] = []
        self.cpu_seconds: list[float] = []  # process CPU time (all threads) of each update
        self.block_pairs: list[float] = []  # flash_block_pairs of each batch
        self.round_rates: list[float] = []  # real tokens/s of each round
        self.compile_seconds = 0.0

    def _batch(self):
        raw = next(self.iterator)
        am = np.asarray(raw["attention_mask"])
        counts = (int(am.sum()), int(np.asarray(raw["mask"]).sum()), am.size)
        if "segment_ids" in raw:
            seg = np.asarray(raw["segment_ids"])
            segments = int(sum(len(np.unique(r[r != 0])) for r in seg))
        else:
            seg = am
            segments = int((am.sum(axis=1) > 0).sum())
        block = self.config.model.attention_block_size or am.shape[1]
        self.block_pairs.append(flash_block_pairs(seg, block, self.config.ppo.micro_batches))
        local = train.host_batch(
            raw, self.trainer.batch_keys, vocab_size=self.config.model.vocab_size
        )
        return parallel.make_global_batch(local, self.mesh), counts, segments

    def step(self, timed: bool = True) -> None:
        batch, (real, actions, slots), segments = self._batch()
        jax.block_until_ready(batch)
        t0, c0 = time.perf_counter(), time.process_time()
        with train.mesh_context(self.mesh):
            self.state, metrics = self.trainer.update(self.state, batch)
        loss = float(jax.device_get(metrics["loss"]))  # waits for the update
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not timed:
            self.compile_seconds = dt
            return
        self.seconds.append(dt)
        self.cpu_seconds.append(cpu)
        self.real.append(real)
        self.actions.append(actions)
        self.slots.append(slots)
        self.segments.append(segments)
        self.losses.append(loss)

    @property
    def row_key(self) -> tuple:
        return (self.name, self.config.model.attention, self.config.ppo.micro_batches)

    def row(self) -> dict:
        secs = float(np.sum(self.seconds))
        real, actions, slots = (float(np.sum(x)) for x in (self.real, self.actions, self.slots))
        return {
            "layout": self.name,
            "attention": self.config.model.attention,
            "attention_resolved": choose_implementation(
                self.config.model.attention,
                seq_len=self.config.data.max_len,
                dtype=self.config.model.compute_dtype,
            ),
            "block_size": self.config.model.attention_block_size,
            "micro_batches": self.config.ppo.micro_batches,
            "rows_per_batch": self.config.data.batch_size,
            "row_len": self.config.data.max_len,
            "updates_timed": len(self.seconds),
            "rollouts_per_batch": float(np.mean(self.segments)),
            "padding_fraction": 1.0 - real / slots,
            "median_s_per_update": statistics.median(self.seconds),
            "real_tokens_per_s": real / secs,
            "action_tokens_per_s": actions / secs,
            "real_tokens_per_cpu_s": real / float(np.sum(self.cpu_seconds)),
            "flash_block_pairs_per_row": float(np.mean(self.block_pairs)),
            "slot_tokens_per_s": slots / secs,
            "compile_plus_first_s": self.compile_seconds,
            "compilations": self.trainer.update._cache_size(),
            "final_loss": self.losses[-1],
        }


def _key(row: dict) -> tuple:
    return (row["layout"], row["attention"], row["micro_batches"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rollouts", type=int, default=400, help="rollouts in the Parquet file")
    ap.add_argument("--max-len", type=int, default=2048, help="row length T (and max rollout)")
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="rows per batch, both layouts")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--mlp-dim", type=int, default=688)
    ap.add_argument("--num-heads", type=int, default=4, help="query heads (and kv heads)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="updates per layout per round")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        help="model.attention choices; each runs both layouts",
    )
    ap.add_argument(
        "--micro-batches",
        type=int,
        nargs="+",
        default=[1],
        help="ppo.micro_batches choices (rows of a batch run in this many chunks); each runs both",
    )
    ap.add_argument(
        "--block-size", type=int, default=128, help="model.attention_block_size (library: 128)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the tables go")
    args = ap.parse_args()

    load_before = os.getloadavg()
    log(f"devices {jax.devices()}, cpus {os.cpu_count()}, load average {load_before}")
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as tmp:
        path = os.path.join(tmp, "rollouts.parquet")
        rollouts = make_rollouts(args.rollouts, args.max_len, args.vocab, args.seed)
        write_rollouts(path, rollouts, strip_padding=True)
        lengths = rollouts["attention_mask"].sum(1)
        log(
            f"{args.rollouts} rollouts: length mean {lengths.mean():.0f}, median "
            f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()} "
            f"(row {args.max_len}); action tokens {rollouts['mask'].sum() / lengths.sum():.0%}"
        )
        layouts: list[Layout] = []
        variants = [(a, m) for a in args.attention for m in args.micro_batches]
        sizes = dict(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model)
        heads = dict(num_heads=args.num_heads, num_kv_heads=args.num_heads, head_dim=args.head_dim)
        for attention, micro in variants:
            blocks = dict(attention=attention, attention_block_size=args.block_size)
            model = ModelConfig.tiny(**sizes, **heads, **blocks, mlp_dim=args.mlp_dim)
            for name, packing in (("padded", False), ("packed", True)):
                config = TrainConfig(
                    steps=args.rounds * args.steps + 1,
                    seed=args.seed,
                    workdir=os.path.join(tmp, "unused"),
                    model=model,
                    ppo=PPOConfig(ppo_epochs=1, minibatch_size=args.batch, micro_batches=micro),
                    data=DataConfig(
                        path=path,
                        packing=packing,
                        max_len=args.max_len,
                        batch_size=args.batch,
                    ),
                )
                layout = Layout(name, config)
                layout.step(timed=False)  # compiles
                log(
                    f"{name} ({attention}, {micro} micro-batches): compiled + first update "
                    f"{layout.compile_seconds:.1f} s"
                )
                layouts.append(layout)
        loads: list[float] = []
        for r in range(args.rounds):
            for layout in layouts:
                for _ in range(args.steps):
                    layout.step()
                n = args.steps
                layout.round_rates.append(sum(layout.real[-n:]) / sum(layout.seconds[-n:]))
            loads.append(os.getloadavg()[0])
            log(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{lay.name}/{lay.config.model.attention}/{lay.config.ppo.micro_batches} "
                    f"{np.mean(lay.seconds[-args.steps :]):.2f} s"
                    for lay in layouts
                )
            )
    load_after = os.getloadavg()
    rows = [layout.row() for layout in layouts]
    for row in rows:
        if row["compilations"] != 1:
            raise SystemExit(f"{row['layout']} compiled {row['compilations']} times, not once")
        padded = next(
            r
            for r in rows
            if r["layout"] == "padded"
            and (r["attention"], r["micro_batches"]) == (row["attention"], row["micro_batches"])
        )
        row["ratio_real_tokens_per_s_vs_padded"] = (
            row["real_tokens_per_s"] / padded["real_tokens_per_s"]
        )
        # The same ratio round by round (each round's layouts ran back to back): its median is
        # less sensitive to the load changing between rounds.
        mine, theirs = (
            next(lay for lay in layouts if lay.row_key == key).round_rates
            for key in (_key(row), _key(padded))
        )
        row["median_round_ratio_vs_padded"] = statistics.median(
            a / b for a, b in zip(mine, theirs, strict=True)
        )
        row["ratio_real_tokens_per_cpu_s_vs_padded"] = (
            row["real_tokens_per_cpu_s"] / padded["real_tokens_per_cpu_s"]
        )
        row["load_avg_1m_rounds_mean"] = float(np.mean(loads))
        row["load_avg_1m_before"] = load_before[0]
        row["load_avg_1m_after"] = load_after[0]
        row["cpus"] = os.cpu_count()
    args.results.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(args.results / "bench_packing.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        )
    shown = [
        "layout",
        "attention_resolved",
        "micro_batches",
        "rollouts_per_batch",
        "padding_fraction",
        "median_s_per_update",
        "real_tokens_per_s",
        "action_tokens_per_s",
        "ratio_real_tokens_per_s_vs_padded",
        "median_round_ratio_vs_padded",
        "ratio_real_tokens_per_cpu_s_vs_padded",
        "flash_block_pairs_per_row",
        "compilations",
    ]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in shown)
            + " |"
        )
    table = "\n".join(lines)
    cmd = "python experiments/bench_packing.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k != "results"
    )
    md = (
        "# Packed vs padded rollouts: useful tokens/s of the critic update\n\n"
        f"`{cmd}`\n\n"
        f"{args.rollouts} log-normal rollouts (length mean {lengths.mean():.0f}, median "
        f"{np.median(lengths):.0f}, max {lengths.max()}, clipped at {args.max_len}), rows of "
        f"{args.max_len} tokens, {args.batch} rows per batch, a {args.layers}-layer d_model "
        f"{args.d_model} (MLP {args.mlp_dim}, {args.num_heads} heads x {args.head_dim}) critic, "
        "one PPO epoch of one minibatch per update. "
        "Useful tokens = real (attended) tokens; action tokens/s in the CSV. Only the update is "
        "timed; "
        f"{args.rounds} alternating rounds of {args.steps} updates per layout.\n\n"
        f"Machine: {os.cpu_count()} CPUs, load average (1, 5, 15 min) "
        f"{tuple(round(x, 2) for x in load_before)} before, "
        f"{tuple(round(x, 2) for x in load_after)} after.\n\n" + table + "\n"
    )
    (args.results / "bench_packing.md").write_text(md)
    print(table)
    log(f"load average after {load_after}")


if __name__ == "__main__":
    main()
