"""The "Stop Regressing" claim on the critic: a scalar value head against an HL-Gauss head
(classification over fixed bins) when the rewards are scaled x1 or x100, or shifted by +5 per
action.

Rewards are transformed by `train.Hooks(transform_batch=...)`: r' = a·r + b on every action token
(a = 1 or 100, b = 0; or a = 1, b = 5). The true values move exactly: with γ = 1,
V*'(s) = a·V*(s) + b·N(s), N(s) the expected number of actions still to come from s (this one
included), which this script computes by the MRP's own backward recursion
(`mrp._continuation`) with a reward of 1 per action; A*' = a·A* + b·(1 + N(s') − N(s)).
Evaluation maps the critic's values back to the original units, V = (V' − b·N) / a, and scores
them with the library's metrics against the original V* and A* on 512 held-out rows (every
iteration): relative_value_error, explained_variance_vs_true and the advantages of
GAE(λ = 0.95, original rewards, V) against A*. This is the same as scoring V' against V*' with
the RMSE measured in units of std(a·V*), so all arms share one yardstick (the error relative to
std(V*') is also written: for the shift std(V*') is 8x std(V*), which would flatter it).

The HL-Gauss head has 51 bins over [c − 2h, c + 2h], c ± h the range of V*' on 4096 sampled rows
([-6, 6] for x1, the library default's span; [-600, 600] for x100; [-27, 95] for the
shift), σ = 0.75 bin widths. Value clipping is off in every arm (`ppo.clip_eps = None`: the
classification loss has none, and a clip radius of 0.2 would stall the x100 regression), all
else is the trainer's default. Stability: loss spikes (> 3x the median of the 10 iterations
before), the largest one-iteration rise of the value error, the training explained variance.

    python experiments/exp_hl_gauss.py            # 2 seeds x 6 arms, ~8 min on 2 loaded cores
    python experiments/exp_hl_gauss.py --steps 100 --seeds 0 1 2
    python experiments/exp_hl_gauss.py --steps 150 --seeds 0 --heads scalar \
        --rewards x100 "+5 per action" --tag long    # does regression get there later?
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from _common import log, run_critic, save_figure, spikes, subplots, write_csv
from flax import nnx

from critic_jax import compute_gae, train
from critic_jax.config import TrainConfig, from_dict
from critic_jax.data import held_out_batch
from critic_jax.metrics import advantage_metrics, value_error_metrics
from critic_jax.mrp import MRPConfig, mrp_remaining_actions, sample_mrp

TRANSFORMS = {"x1": (1.0, 0.0), "x100": (100.0, 0.0), "+5 per action": (1.0, 5.0)}
HEADS = ("scalar", "hl-gauss")


def bins_for(config: MRPConfig, a: float, b: float) -> tuple[float, float]:
    """[c − 2h, c + 2h] for the range c ± h of V*' = a·V* + b·N on 4096 sampled rows."""
    s = sample_mrp(config, seed=(12345,), batch_size=4096)
    m = s["mask"] > 0
    v = (a * s["true_values"] + b * mrp_remaining_actions(config, s["tokens"]))[m]
    c, h = (v.max() + v.min()) / 2, (v.max() - v.min()) / 2
    return float(c - 2 * h), float(c + 2 * h)


class Evaluator:
    """The critic's values on held-out rows, mapped back to the original units and scored."""

    def __init__(self, config: TrainConfig, a: float, b: float):
        self.batch = held_out_batch(config.data, seed=config.seed, gamma=1.0, n=512)
        self.n = mrp_remaining_actions(config.data.mrp, self.batch["tokens"])
        self.a, self.b, self.lam = a, b, config.ppo.policy_lam
        self.graphdef = None
        self._apply = jax.jit(lambda g, p, t, am: nnx.merge(g, p)(t, am), static_argnums=0)

    def __call__(self, params) -> dict[str, float]:
        bt = self.batch
        scaled = np.asarray(self._apply(self.graphdef, params, bt["tokens"], bt["attention_mask"]))
        values = (scaled - self.b * self.n) / self.a
        out = value_error_metrics(values, bt["true_values"], bt["mask"])
        adv, _ = compute_gae(bt["rewards"], values, bt["mask"], lam=self.lam)
        out.update(advantage_metrics(adv, bt["true_advantages"], bt["mask"]))
        true_scaled = self.a * bt["true_values"] + self.b * self.n
        out["relative_value_error_scaled_units"] = value_error_metrics(
            scaled, true_scaled, bt["mask"]
        )["relative_value_error"]
        return {k: float(v) for k, v in out.items()}


def run_arm(config: TrainConfig, a: float, b: float, label: str) -> list[dict]:
    """`run_critic` on rewards a·r + b (per action), scored by `Evaluator` after every
    iteration (iteration 0 included)."""
    evaluator = Evaluator(config, a, b)

    def build(cfg, mesh):
        evaluator.graphdef, params = train.build_critic(cfg, mesh)
        return evaluator.graphdef, params

    def transform(batch):
        mask = np.asarray(batch["mask"]) != 0
        batch["rewards"] = np.where(mask, a * np.asarray(batch["rewards"], np.float32) + b, 0.0)
        return batch

    out = run_critic(
        config,
        eval_every=0,
        label=label,
        build_model=build,
        transform_batch=transform,
        extra_metrics=evaluator,
    )
    return out["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--rewards", nargs="+", choices=list(TRANSFORMS), default=list(TRANSFORMS))
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args()
    name = "exp_hl_gauss" + (f"_{args.tag}" if args.tag else "")

    rows, bins = [], {}
    for seed in args.seeds:
        for tname in args.rewards:
            a, b = TRANSFORMS[tname]
            for head in args.heads:
                model = {"value_head": head}
                if head == "hl-gauss":
                    bins[tname] = bins.get(tname) or bins_for(TrainConfig().data.mrp, a, b)
                    model.update(value_min=bins[tname][0], value_max=bins[tname][1])
                config = from_dict(
                    TrainConfig,
                    {"steps": args.steps, "seed": seed, "model": model, "ppo": {"clip_eps": None}},
                )
                arm = f"{head}, rewards {tname}"
                hist = run_arm(config, a, b, f"{arm} seed={seed}")
                rows += [
                    {"arm": arm, "head": head, "rewards": tname, "seed": seed, **h} for h in hist
                ]
    write_csv(f"{name}.csv", rows)
    log("HL-Gauss bins: " + ", ".join(f"{k} [{lo:.1f}, {hi:.1f}]" for k, (lo, hi) in bins.items()))
    report(rows, args, name)


def per_seed(rows, arm, key) -> list[np.ndarray]:
    seeds = sorted({r["seed"] for r in rows})
    return [
        np.array(
            [r.get(key, np.nan) for r in rows if r["arm"] == arm and r["seed"] == s], dtype=float
        )
        for s in seeds
    ]


def report(rows, args, name: str) -> None:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    marks = [m for m in (0, 5, 10, 20, args.steps) if m <= args.steps]
    log(f"mean over seeds {args.seeds}; value error = RMSE(V - V*)/std(V*) in original units")
    head = (
        f"{'arm':28s} "
        + " ".join(f"err@{m:<3d}" for m in marks)
        + "  last10 (per seed)     adv.err sign  rank | loss spikes  max err rise  "
        "min train EV (it>=10)  skipped"
    )
    print(head)
    summary = []
    for arm in arms:
        err = per_seed(rows, arm, "relative_value_error")
        mean = np.mean(err, 0)
        last = [e[-10:].mean() for e in err]
        adv = {
            k: np.mean([x[-10:].mean() for x in per_seed(rows, arm, k)])
            for k in (
                "advantage_error_vs_true",
                "advantage_sign_agreement",
                "advantage_rank_correlation",
                "relative_value_error_scaled_units",
            )
        }
        loss = per_seed(rows, arm, "loss")
        n_spikes = np.mean([spikes(x[1:]) for x in loss])
        rise = np.mean([np.max(np.diff(e[1:])) for e in err])
        ev = np.mean(
            [np.nanmin(x[min(10, len(x) - 1) :]) for x in per_seed(rows, arm, "explained_variance")]
        )
        skipped = np.sum([np.nansum(x) for x in per_seed(rows, arm, "skipped")])
        print(
            f"{arm:28s} "
            + " ".join(f"{mean[m]:7.3f}" for m in marks)
            + f"  {np.mean(last):.3f} ({', '.join(f'{x:.3f}' for x in last)})"
            + f"  {adv['advantage_error_vs_true']:.3f} {adv['advantage_sign_agreement']:.3f}"
            + f" {adv['advantage_rank_correlation']:.3f} | {n_spikes:5.1f}  {rise:12.3f}"
            + f"  {ev:12.3f}  {skipped:7.0f}"
        )
        summary.append(
            {
                "arm": arm,
                "error_last10": np.mean(last),
                **{f"error_it{m}": mean[m] for m in marks},
                **{f"{k}_last10": v for k, v in adv.items()},
                "loss_spikes": n_spikes,
                "max_error_rise": rise,
                "min_train_ev_after_10": ev,
                "skipped_updates": skipped,
            }
        )
    write_csv(f"{name}_summary.csv", summary)

    fig, axes = subplots(1, 3, figsize=(16, 3.8))
    for arm in arms:
        style = "-" if arm.startswith("scalar") else "--"
        color = f"C{list(TRANSFORMS).index(arm.split('rewards ')[1])}"
        err = np.mean(per_seed(rows, arm, "relative_value_error"), 0)
        axes[0].plot(np.arange(len(err)), err, style, color=color, label=arm)
        loss = np.mean(per_seed(rows, arm, "loss"), 0)
        axes[1].plot(
            np.arange(1, len(loss)),
            loss[1:] / np.nanmedian(loss[1:]),
            style,
            color=color,
            label=arm,
        )
        ev = np.mean(per_seed(rows, arm, "explained_variance"), 0)
        axes[2].plot(np.arange(1, len(ev)), ev[1:], style, color=color, label=arm)
    axes[0].set_title("RMSE(V - V*) / std(V*), original units, held out")
    axes[0].set_yscale("log")
    axes[1].set_title("training loss / its median (scalar: MSE, HL-Gauss: CE)")
    axes[1].set_yscale("log")
    axes[2].set_title("training explained variance (λ = 0.95 returns)")
    axes[2].set_ylim(-1, 1)
    for ax in axes:
        ax.set_xlabel("PPO iteration")
    axes[0].legend(fontsize=7)
    save_figure(fig, f"{name}.png")


if __name__ == "__main__":
    main()
