"""Does value clipping stabilise the critic? clip_eps in {None, 0.1, 0.2, 0.5} under stress.

The stress is the two things clipping is said to protect against: noisy rewards (Gaussian noise
on every valid token's reward; V* is unchanged because the noise has mean 0) and a learning rate
of 3e-2, 15 times the default. Each run reports loss spikes (iterations whose loss exceeds 3x the
median of the 10 before), the largest loss, and the error against V* on held-out rows after every
iteration.
The clipped loss is max(clipped, unclipped) >= the unclipped one, so spikes are also counted on
`value_mse`, the unclipped squared error of the same predictions.

    python experiments/exp_clipping.py                  # 2 seeds, ~3.5 minutes on 2 cores
    python experiments/exp_clipping.py --clean --seeds 0 1 2   # add the unstressed baseline
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import log, run_critic, save_figure, spikes, subplots, write_csv

from critic_jax.config import TrainConfig, from_dict


def parse_clip(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="PPO iterations per run")
    parser.add_argument("--clips", default="none,0.1,0.2,0.5", help="comma-separated clip_eps")
    parser.add_argument("--noise", type=float, default=1.0, help="reward noise std (stressed)")
    parser.add_argument("--lr", type=float, default=3e-2, help="learning rate (stressed)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip, 0: off")
    parser.add_argument("--clean", action="store_true", help="also run default lr, no noise")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    clips = [parse_clip(c) for c in args.clips.split(",")]
    conditions = [("stressed", args.lr, args.noise)]
    if args.clean:
        conditions.insert(0, ("clean", TrainConfig().optim.learning_rate, 0.0))

    rows, summary, curves = [], [], {}
    for cond, lr, noise in conditions:
        for clip in clips:
            for seed in args.seeds:
                config = from_dict(
                    TrainConfig,
                    {
                        "steps": args.steps,
                        "seed": seed,
                        "optim": {"learning_rate": lr, "grad_clip": args.grad_clip},
                        "ppo": {"clip_eps": clip},
                    },
                )
                name = f"{cond} clip={clip} seed={seed}"
                out = run_critic(config, reward_noise=noise, label=name)
                hist = out["history"]
                for h in hist:
                    rows.append({"condition": cond, "clip_eps": str(clip), "seed": seed, **h})
                loss = [h["loss"] for h in hist[1:]]
                mse = [h["value_mse"] for h in hist[1:]]
                err = [h["relative_value_error"] for h in hist]
                summary.append(
                    {
                        "condition": cond,
                        "clip_eps": str(clip),
                        "seed": seed,
                        "learning_rate": lr,
                        "reward_noise": noise,
                        "loss_spikes": spikes(loss),
                        "max_loss": max(loss),
                        "value_mse_spikes": spikes(mse),
                        "max_value_mse": max(mse),
                        "max_grad_norm": max(h["grad_norm"] for h in hist[1:]),
                        "mean_clipfrac": float(np.mean([h["clipfrac"] for h in hist[1:]])),
                        "error_spikes": spikes(err[10:], factor=1.25, window=5),
                        "max_error_jump": float(np.max(np.diff(err[1:]))),
                        "final_error": err[-1],
                        "mean_error_last10": float(np.mean(err[-10:])),
                        "max_error_after10": max(err[10:]),
                        "skipped_updates": sum(h["skipped"] for h in hist[1:]),
                    }
                )
                curves.setdefault((cond, str(clip)), []).append(hist)

    write_csv("exp_clipping.csv", rows)
    write_csv("exp_clipping_summary.csv", summary)
    log("summary (mean over seeds):")
    keys = ["loss_spikes", "max_loss", "value_mse_spikes", "error_spikes", "max_error_jump"]
    keys += ["mean_clipfrac"]
    keys += ["mean_error_last10", "final_error"]
    print(f"{'condition':10s} {'clip':5s} " + " ".join(f"{k:>17s}" for k in keys))
    for cond, _, _ in conditions:
        for clip in clips:
            sel = [s for s in summary if s["condition"] == cond and s["clip_eps"] == str(clip)]
            vals = " ".join(f"{np.mean([s[k] for s in sel]):17.3f}" for k in keys)
            print(f"{cond:10s} {clip!s:5s} {vals}")

    fig, axes = subplots(len(conditions), 2, figsize=(10, 3.2 * len(conditions)), squeeze=False)
    for r, (cond, lr, noise) in enumerate(conditions):
        for clip in clips:
            hists = curves[(cond, str(clip))]
            it = [h["iteration"] for h in hists[0]]
            loss = np.mean([[h.get("loss", np.nan) for h in hist] for hist in hists], 0)
            err = np.mean([[h["relative_value_error"] for h in hist] for hist in hists], 0)
            axes[r, 0].plot(it[1:], loss[1:], label=f"clip_eps={clip}")
            axes[r, 1].plot(it, err, label=f"clip_eps={clip}")
        axes[r, 0].set_yscale("log")
        axes[r, 0].set_title(f"{cond}: value loss (lr={lr:g}, reward noise std={noise:g})")
        axes[r, 1].set_title(f"{cond}: RMSE(V - V*) / std(V*), held out")
        axes[r, 1].set_ylim(bottom=0)
        for ax in axes[r]:
            ax.set_xlabel("PPO iteration")
        axes[r, 1].legend(fontsize=8)
    save_figure(fig, "exp_clipping.png")


if __name__ == "__main__":
    main()
