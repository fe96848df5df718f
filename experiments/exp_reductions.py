"""The four loss reductions on variable-length responses: gradient scale and final error.

Reductions (see `critic_jax.value_loss`): token-mean (the default), seq-mean-token-mean,
seq-mean-token-sum, seq-mean-token-sum-norm. The MRP's responses end at a random EOS, so their
lengths vary from 1 to the 24-token budget. Two measurements:

1. Gradient scale against response length: at a fixed critic, the global norm of the value-loss
   gradient on batches of 64 rows whose responses all have about the same length, per reduction.
2. Training with each reduction: the pre-clip gradient norm the trainer logs, and the error
   against V* over updates.

    python experiments/exp_reductions.py              # 2 seeds, ~4 minutes on 2 cores
    python experiments/exp_reductions.py --steps 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from _common import log, run_critic, save_figure, seed_mean, subplots, write_csv
from flax import nnx

from critic_jax import compute_gae, value_loss
from critic_jax.config import REDUCTIONS, TrainConfig, from_dict
from critic_jax.mrp import sample_mrp

BUCKETS = ((1, 3), (4, 7), (8, 15), (16, 24))
_ANALYSIS_STREAM = 4


def make_grad_norm(graphdef):
    """(params, batch, reduction) -> global norm of the value-loss gradient, no value clipping,
    λ = 0.95 returns from the critic's own values."""

    def loss(params, batch, reduction):
        values = nnx.merge(graphdef, params)(batch["tokens"], batch["attention_mask"])
        old = jax.lax.stop_gradient(values)
        _, returns = compute_gae(batch["rewards"], old, batch["mask"], gamma=1.0, lam=0.95)
        return value_loss(values, old, returns, batch["mask"], reduction=reduction)

    return jax.jit(
        lambda p, b, reduction: optax.global_norm(jax.grad(loss)(p, b, reduction)),
        static_argnums=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="PPO iterations per run")
    parser.add_argument("--rows", type=int, default=64, help="rows per length bucket")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    training, first = [], {}
    for seed in args.seeds:
        for reduction in REDUCTIONS:
            config = from_dict(
                TrainConfig, {"steps": args.steps, "seed": seed, "ppo": {"reduction": reduction}}
            )
            out = run_critic(config, snapshot_at=(0,), label=f"{reduction} seed={seed}")
            training += [{"reduction": reduction, "seed": seed, **h} for h in out["history"]]
            first.setdefault(reduction, out)
    graphdef = first[REDUCTIONS[0]]["graphdef"]
    critics = {  # the first seed's seq-mean-token-mean critic, before and after training
        "init": first["seq-mean-token-mean"]["snapshots"][0],
        "trained": first["seq-mean-token-mean"]["params"],
    }

    pool = sample_mrp(
        TrainConfig().data.mrp, seed=(args.seeds[0], _ANALYSIS_STREAM), batch_size=16384
    )
    lengths = pool["mask"].sum(-1)
    groups = {f"{lo}-{hi}": (lengths >= lo) & (lengths <= hi) for lo, hi in BUCKETS}
    groups["mixed"] = np.ones_like(lengths, bool)
    grad_norm = make_grad_norm(graphdef)
    rows = []
    for group, sel in groups.items():
        idx = np.flatnonzero(sel)[: args.rows]
        if len(idx) < args.rows:
            log(f"bucket {group}: only {len(idx)} rows")
        batch = {
            "tokens": pool["tokens"][idx].astype(np.int32),
            "attention_mask": pool["attention_mask"][idx].astype(np.int32),
            "mask": pool["mask"][idx].astype(np.float32),
            "rewards": pool["rewards"][idx].astype(np.float32),
        }
        for critic, params in critics.items():
            for reduction in REDUCTIONS:
                norm = float(grad_norm(params, batch, reduction))
                rows.append(
                    {
                        "critic": critic,
                        "length_bucket": group,
                        "mean_length": float(lengths[idx].mean()),
                        "rows": len(idx),
                        "reduction": reduction,
                        "grad_norm": norm,
                    }
                )
    write_csv("exp_reductions.csv", rows)
    write_csv("exp_reductions_training.csv", training)

    log("gradient norm of the value loss by response length (trained critic):")
    print(f"{'bucket':8s} {'len':>5s} " + " ".join(f"{r:>24s}" for r in REDUCTIONS))
    for group in groups:
        cells = [r for r in rows if r["length_bucket"] == group and r["critic"] == "trained"]
        print(
            f"{group:8s} {cells[0]['mean_length']:5.1f} "
            + " ".join(f"{c['grad_norm']:24.4f}" for c in cells)
        )
    log(f"training with each reduction (mean over seeds {args.seeds}):")
    for reduction in REDUCTIONS:
        gn = np.mean(
            [h["grad_norm"] for h in training if h["reduction"] == reduction and h["iteration"]]
        )
        err = seed_mean(training, reduction=reduction)
        print(
            f"  {reduction:24s} mean logged grad_norm {gn:8.3f}  error at iteration 10 "
            f"{err[10]:.3f}, final {err[-1]:.3f}, mean of last 10 {err[-10:].mean():.3f}"
        )

    fig, axes = subplots(1, 3, figsize=(14, 3.6))
    for reduction in REDUCTIONS:
        cells = [
            r
            for r in rows
            if r["reduction"] == reduction
            and r["critic"] == "trained"
            and r["length_bucket"] != "mixed"
        ]
        axes[0].plot(
            [c["mean_length"] for c in cells],
            [c["grad_norm"] for c in cells],
            "o-",
            label=reduction,
        )
        it = np.arange(args.steps + 1)
        axes[1].plot(
            it[1:], seed_mean(training, "grad_norm", reduction=reduction)[1:], label=reduction
        )
        axes[2].plot(it, seed_mean(training, reduction=reduction), label=reduction)
    axes[0].set_title("|grad| at a fixed critic vs response length")
    axes[0].set_xlabel("mean valid tokens per row (64 rows)")
    axes[0].set_yscale("log")
    axes[1].set_title("pre-clip |grad| during training (seed mean)")
    axes[1].set_yscale("log")
    axes[2].set_title("RMSE(V - V*)/std(V*), held out (seed mean)")
    for ax in axes[1:]:
        ax.set_xlabel("PPO iteration")
    save_figure(fig, "exp_reductions.png", legend_fontsize=7)


if __name__ == "__main__":
    main()
