"""How well does GAE combine with the value? lambda in {0, 0.5, 0.9, 0.95, 1}.

Two measurements, both against the MRP's exact V*:

1. The GAE returns as targets. On a large fresh batch, returns = compute_gae(rewards, V, mask, λ)
   for V = V* exactly, V = 0, and V = a critic at several points of training. Each return is an
   estimate of V*(s_t); grouped by MRP state s = (response column, previous non-observation
   token), its error splits into bias² (the squared mean error per state, with the 1/n sampling
   part removed) and variance (the spread within a state). λ = 1 gives the Monte-Carlo return
   whatever V is; λ = 0 gives r_t + γ V(s_t+1), exact in mean only if V is.
2. The critic trained with each λ: its error against V* over updates.

    python experiments/exp_gae_lambda.py              # ~4 minutes on 2 cores, 2 seeds
    python experiments/exp_gae_lambda.py --steps 100 --rows 16384
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import log, run_critic, save_figure, seed_mean, subplots, write_csv
from flax import nnx

from critic_jax import compute_gae
from critic_jax.config import TrainConfig, from_dict
from critic_jax.mrp import PAD, MRPConfig, sample_mrp

LAMS = (0.0, 0.5, 0.9, 0.95, 1.0)
_ANALYSIS_STREAM = 3


def mrp_state(tokens: np.ndarray, mrp: MRPConfig) -> np.ndarray:
    """int [B, T]: the MRP state (column, previous non-observation token) as one id."""
    o_lo, o_hi = mrp.obs_range
    is_state = (tokens != PAD) & ~((tokens >= o_lo) & (tokens < o_hi))
    t_idx = np.arange(tokens.shape[-1])
    last = np.maximum.accumulate(np.where(is_state, t_idx, 0), axis=-1)
    prev = np.concatenate([np.zeros_like(last[:, :1]), last[:, :-1]], axis=-1)
    return t_idx * mrp.vocab_size + np.take_along_axis(tokens, prev, axis=-1)


def bias_variance(estimate: np.ndarray, true: np.ndarray, state: np.ndarray) -> dict[str, float]:
    """Splits E[(estimate - true)²] over states into bias² and within-state variance.

    Per state s with n_s >= 2 samples of error e: bias²_s = mean(e)² - var(e)/n_s (unbiased),
    variance_s = var(e) (ddof 1); both averaged with weights n_s over those samples.
    """
    err = estimate - true
    order = np.argsort(state, kind="stable")
    _, starts, counts = np.unique(state[order], return_index=True, return_counts=True)
    sums = np.add.reduceat(err[order], starts)
    sq = np.add.reduceat(err[order] ** 2, starts)
    keep = counts >= 2
    n, s, q = counts[keep], sums[keep], sq[keep]
    mean = s / n
    var = (q - n * mean**2) / (n - 1)
    weight = n / n.sum()
    return {
        "bias2": float(np.sum(weight * (mean**2 - var / n))),
        "variance": float(np.sum(weight * var)),
        "mse": float(np.mean(err**2)),
        "relative_rmse": float(np.sqrt(np.mean(err**2)) / true.std()),
        "mean_error": float(err.mean()),
        "states": int(keep.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="PPO iterations per critic run")
    parser.add_argument("--rows", type=int, default=8192, help="rows of the analysis batch")
    parser.add_argument("--lams", type=float, nargs="+", default=list(LAMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    base = from_dict(TrainConfig, {"steps": args.steps, "seed": args.seeds[0]})
    snap_its = sorted({i for i in (2, 10, args.steps) if i <= args.steps})

    training, snapshots, graphdef = [], {}, None
    for seed in args.seeds:
        for lam in args.lams:
            config = from_dict(TrainConfig, {"seed": seed, "ppo": {"lam": lam}}, base=base)
            snap = snap_its if lam == 0.95 and seed == args.seeds[0] else ()
            out = run_critic(config, snapshot_at=snap, label=f"lam={lam} seed={seed}")
            training += [{"lam": lam, "seed": seed, **h} for h in out["history"]]
            snapshots.update({it: out["snapshots"][it] for it in snap})
            graphdef = out["graphdef"]
    if not snapshots:  # 0.95 not among --lams: analyse the last run's final critic
        snapshots[args.steps] = out["params"]

    batch = sample_mrp(
        base.data.mrp, seed=(args.seeds[0], _ANALYSIS_STREAM), batch_size=args.rows, gamma=1.0
    )
    tokens = batch["tokens"].astype(np.int32)
    attention = batch["attention_mask"].astype(np.int32)
    mask = batch["mask"] > 0
    true = batch["true_values"]
    state = mrp_state(tokens, base.data.mrp)[mask]
    critic_values = jax.jit(lambda p, t, a: nnx.merge(graphdef, p)(t, a))
    sources = {"V = V*": true, "V = 0": np.zeros_like(true)}
    for it, params in sorted(snapshots.items()):
        sources[f"V = critic @ {it} it."] = np.asarray(critic_values(params, tokens, attention))

    rows = []
    gae = jax.jit(lambda r, v, m, lam: compute_gae(r, v, m, gamma=1.0, lam=lam))
    for name, values in sources.items():
        v_err = values[mask] - true[mask]
        v_rel = float(np.sqrt(np.mean(v_err**2)) / true[mask].std())
        for lam in args.lams:
            _, returns = gae(batch["rewards"], values, batch["mask"], lam)
            stats = bias_variance(np.asarray(returns)[mask], true[mask], state)
            rows.append({"values": name, "value_relative_error": v_rel, "lam": lam, **stats})
    write_csv("exp_gae_lambda.csv", rows)
    write_csv("exp_gae_lambda_training.csv", training)

    log(
        "GAE returns vs V*: bias² / variance (per token, V* std "
        f"{true[mask].std():.3f}, var {true[mask].var():.3f})"
    )
    print(f"{'values':22s} " + " ".join(f"{'lam=' + str(lam):>16s}" for lam in args.lams))
    for name in sources:
        cells = [r for r in rows if r["values"] == name]
        print(f"{name:22s} " + " ".join(f"{r['bias2']:7.3f}/{r['variance']:<8.3f}" for r in cells))
    log(
        f"critic trained with each lambda (mean over seeds {args.seeds}): error at iteration 10, "
        "at the end, mean of the last 10"
    )
    for lam in args.lams:
        err = seed_mean(training, lam=lam)
        print(f"  lam={lam}: {err[10]:.3f} {err[-1]:.3f} {np.mean(err[-10:]):.3f}")

    fig, axes = subplots(1, 3, figsize=(14, 3.6))
    for name in sources:
        cells = [r for r in rows if r["values"] == name]
        lams = [r["lam"] for r in cells]
        axes[0].plot(lams, [max(r["bias2"], 1e-4) for r in cells], "o-", label=name)
        axes[1].plot(lams, [r["variance"] for r in cells], "o-", label=name)
    axes[0].set_title("bias² of GAE returns vs V* (≤1e-4 drawn at 1e-4)")
    axes[0].set_yscale("log")
    axes[1].set_title("variance of GAE returns within a state")
    for lam in args.lams:
        axes[2].plot(np.arange(args.steps + 1), seed_mean(training, lam=lam), label=f"lam={lam}")
    axes[2].set_title(f"critic trained with λ: RMSE(V - V*)/std(V*), {len(args.seeds)} seeds")
    axes[2].set_xlabel("PPO iteration")
    for ax in axes[:2]:
        ax.set_xlabel("GAE λ")
    save_figure(fig, "exp_gae_lambda.png", legend_fontsize=7)


if __name__ == "__main__":
    main()
