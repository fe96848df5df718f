"""VAPO's length-adaptive λ: are the policy's advantages more accurate with λ fixed at 0.95, at
1.0, or λ = 1 − 1/(α·l) per response (α = 0.05, l its action count), on long responses?

An MRP with long responses (`response_max_len` 128, `eos_prob` 0.02: action counts from 1 to 128,
median about 33, 10% above 100) trains one critic per seed (trainer defaults, critic λ 0.95);
after 0, 5, 15 and `--steps` iterations its values on `--rows` fresh held-out rows give GAE
advantages with each policy λ (`critic_jax.compute_gae`, one λ per row from
`critic_jax.length_adaptive_lam` for the adaptive one), scored against the MRP's exact
A* = Q* − V* by `critic_jax.metrics.advantage_metrics` within each response-length bucket. The
same advantages computed from the exact V* show what each λ costs with a perfect critic, and
λ = 0 (the TD error, which equals A* when V = V*) is shown as a reference.

The MRP pays a reward at every action, so A* is dominated by the action's own reward. VAPO's
setting is an outcome reward at the end; `--rewards sparse` moves each row's total reward onto
its last action (`train.Hooks(transform_batch=...)` in training, the same move on the held-out
rows). With γ = 1 that leaves A* unchanged (Q* and V* both gain the rewards already collected,
which the critic sees in its prefix) and makes V*(s_t) = V*_dense(s_t) + Σ_{k<t} r_k, which the
relative value error of the sparse run is measured against.

With α = 0.05, λ = 0 for l ≤ 20, 0.5 at l = 40, 0.8 at l = 100 and 0.84 at l = 128: on responses
this short (VAPO's run to thousands of tokens), "adaptive" means a smaller λ than 0.95
everywhere.

    python experiments/exp_policy_lambda.py            # 2 seeds, ~6 min on 2 loaded cores
    python experiments/exp_policy_lambda.py --rewards sparse   # outcome reward, ~6 min
    python experiments/exp_policy_lambda.py --steps 80 --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import log, run_critic, save_figure, subplots, write_csv
from flax import nnx

from critic_jax import compute_gae, length_adaptive_lam
from critic_jax.config import TrainConfig, from_dict
from critic_jax.metrics import advantage_metrics
from critic_jax.mrp import sample_mrp

BUCKETS = ((1, 20), (21, 40), (41, 80), (81, 128))
LAMS = ("0.95", "1.0", "adaptive α=0.05", "0 (TD)")
METRICS = ("advantage_error_vs_true", "advantage_sign_agreement", "advantage_rank_correlation")
SHORT = dict(zip(METRICS, ("adv. err", "sign agree", "rank corr"), strict=True))


def row_lams(mask: np.ndarray, alpha: float) -> dict[str, np.ndarray | float]:
    return {
        "0.95": 0.95,
        "1.0": 1.0,
        "adaptive α=0.05": np.asarray(length_adaptive_lam(mask, alpha=alpha)),
        "0 (TD)": 0.0,
    }


def to_sparse(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's total reward on its last action, 0 elsewhere (an outcome reward)."""
    mask = np.asarray(batch["mask"]) != 0
    rewards = np.where(mask, np.asarray(batch["rewards"], np.float32), 0.0)
    last = mask.shape[-1] - 1 - np.argmax(mask[:, ::-1], axis=-1)
    out = np.zeros_like(rewards)
    rows = np.flatnonzero(mask.any(-1))
    out[rows, last[rows]] = rewards[rows].sum(-1)
    batch["rewards"] = out
    return batch


def sparse_truth(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The held-out batch with an outcome reward: V* gains the rewards already collected, A*
    is unchanged (γ = 1)."""
    mask = batch["mask"] != 0
    dense = np.where(mask, batch["rewards"], 0.0)
    before = np.cumsum(dense, axis=-1) - dense
    out = to_sparse(dict(batch))
    out["true_values"] = np.where(mask, batch["true_values"] + before, 0.0).astype(np.float32)
    return out


def train_sparse(config: TrainConfig, snaps) -> dict:
    """`run_critic` on outcome rewards (`to_sparse` as the batch transform), keeping the
    parameters at the iterations `snaps`; no held-out evaluation (the trainer's is dense)."""
    label = f"sparse critic seed={config.seed}"
    return run_critic(
        config, eval_every=0, transform_batch=to_sparse, snapshot_at=snaps, label=label
    )


def critic_values(graphdef, params, batch, chunk: int = 256) -> np.ndarray:
    """The critic's values [B, T] on `batch`, `chunk` rows at a time."""

    @jax.jit
    def apply(params, tokens, attention_mask):
        return nnx.merge(graphdef, params)(tokens, attention_mask)

    params = jax.tree.map(jnp.asarray, params)
    out = [
        np.asarray(
            apply(params, batch["tokens"][i : i + chunk], batch["attention_mask"][i : i + chunk])
        )
        for i in range(0, batch["tokens"].shape[0], chunk)
    ]
    return np.concatenate(out)


def bucket_metrics(values, batch, alpha: float) -> list[dict]:
    """Advantage metrics of every policy λ, for all rows and for each length bucket."""
    mask = batch["mask"]
    length = (mask > 0).sum(-1)
    out = []
    for lam_name, lam in row_lams(mask, alpha).items():
        adv, _ = compute_gae(batch["rewards"], values, mask, lam=lam)
        adv = np.asarray(adv)
        for lo, hi in ((1, 10**6), *BUCKETS):
            rows = (length >= lo) & (length <= hi)
            m = advantage_metrics(adv[rows], batch["true_advantages"][rows], mask[rows])
            out.append(
                {
                    "policy_lam": lam_name,
                    "bucket": "all" if hi == 10**6 else f"{lo}-{hi}",
                    "rows": int(rows.sum()),
                    "mean_lam": float(np.mean(np.broadcast_to(lam, length.shape)[rows])),
                    **{k: float(m[k]) for k in METRICS},
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="PPO iterations of the critic")
    parser.add_argument("--response-max-len", type=int, default=128)
    parser.add_argument("--eos-prob", type=float, default=0.02)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--rows", type=int, default=2048, help="held-out rows scored")
    parser.add_argument("--rewards", choices=("dense", "sparse"), default="dense")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    name = "exp_policy_lambda" + ("_sparse" if args.rewards == "sparse" else "")
    snaps = sorted({0, 5, 15, args.steps} & set(range(args.steps + 1)))

    rows, train_rows = [], []
    for seed in args.seeds:
        config = from_dict(
            TrainConfig,
            {
                "steps": args.steps,
                "seed": seed,
                "data": {
                    "mrp": {"response_max_len": args.response_max_len, "eos_prob": args.eos_prob}
                },
            },
        )
        if args.rewards == "sparse":
            out = train_sparse(config, snaps)
        else:
            out = run_critic(config, eval_every=5, snapshot_at=snaps, label=f"critic seed={seed}")
        train_rows += [{"seed": seed, **h} for h in out["history"]]
        batch = sample_mrp(config.data.mrp, seed=(seed, 99), batch_size=args.rows)
        if args.rewards == "sparse":
            batch = sparse_truth(batch)
        length = (batch["mask"] > 0).sum(-1)
        log(
            f"seed {seed}: held-out action counts: median {np.median(length):.0f}, rows per "
            f"bucket {[int(((length >= lo) & (length <= hi)).sum()) for lo, hi in BUCKETS]}"
        )
        sources = {f"critic @ {it}": None for it in snaps} | {"V = V*": batch["true_values"]}
        for source, values in sources.items():
            if values is None:
                params = out["snapshots"][int(source.split("@ ")[1])]
                values = critic_values(out["graphdef"], params, batch)
            rel = np.sqrt(np.mean((values - batch["true_values"])[batch["mask"] > 0] ** 2))
            rel /= batch["true_values"][batch["mask"] > 0].std()
            for r in bucket_metrics(values, batch, args.alpha):
                rows.append({"seed": seed, "values": source, "relative_value_error": rel, **r})
    write_csv(f"{name}.csv", rows)
    write_csv(f"{name}_training.csv", train_rows)
    report(rows, snaps, args, name)


def mean_of(rows, **where) -> dict[str, float]:
    sel = [r for r in rows if all(r[k] == v for k, v in where.items())]
    keys = (*METRICS, "relative_value_error", "mean_lam", "rows")
    return {k: float(np.mean([r[k] for r in sel])) for k in keys}


def report(rows, snaps, args, name: str) -> None:
    sources = list(dict.fromkeys(r["values"] for r in rows))
    buckets = ["all"] + [f"{lo}-{hi}" for lo, hi in BUCKETS]
    log(
        f"{args.rewards} rewards: advantage accuracy by response length (action tokens), mean "
        f"over seeds {args.seeds}"
    )
    for source in sources:
        err = mean_of(rows, values=source)["relative_value_error"]
        print(f"\n== values: {source} (relative value error {err:.3f}) ==")
        for key in METRICS:
            print(f"{SHORT[key]:18s} " + " ".join(f"{b:>8s}" for b in buckets))
            for lam in LAMS:
                cells = " ".join(
                    f"{mean_of(rows, values=source, policy_lam=lam, bucket=b)[key]:8.3f}"
                    for b in buckets
                )
                print(f"  λ={lam:15s} {cells}")
    lam_cells = " ".join(
        f"{mean_of(rows, policy_lam='adaptive α=0.05', bucket=b)['mean_lam']:.2f}" for b in buckets
    )
    print(f"\nmean adaptive λ per bucket {buckets}: {lam_cells}")

    shown = [
        f"critic @ {snaps[1] if len(snaps) > 1 else snaps[0]}",
        f"critic @ {snaps[-1]}",
        "V = V*",
    ]
    fig, axes = subplots(len(METRICS), len(shown), figsize=(4.2 * len(shown), 8.5))
    x = np.arange(len(buckets) - 1)
    for j, source in enumerate(shown):
        for i, key in enumerate(METRICS):
            ax = axes[i, j]
            for k, lam in enumerate(LAMS):
                y = [
                    mean_of(rows, values=source, policy_lam=lam, bucket=b)[key] for b in buckets[1:]
                ]
                ax.plot(x, y, "o-" if k < 3 else "x:", color=f"C{k}", label=f"λ = {lam}")
            ax.set_xticks(x, buckets[1:])
            ax.set_title(f"{SHORT[key]}, values: {source}", fontsize=9)
            if i == len(METRICS) - 1:
                ax.set_xlabel("response length (action tokens)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{args.rewards} rewards", fontsize=10)
    save_figure(fig, f"{name}.png")


if __name__ == "__main__":
    main()
