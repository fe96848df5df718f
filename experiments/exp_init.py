"""How should a critic start? Error against V* over updates for four initialisations.

- random: the `Critic` as built (small random trunk, zero value head, so V = 0 at step 0);
- reward model: a `Critic` first trained as a reward model, i.e. its head's output at the last
  real token regresses the sequence's total reward (as a `...ForSequenceClassification` scores a
  sequence); trunk and head are kept;
- actor: an `ActorCritic` first trained by next-token prediction on the MRP's action tokens (the
  SFT model); its trunk is copied into a `Critic` with a fresh zero head;
- shared: that same pretrained `ActorCritic` keeps one trunk for both heads and is trained on
  value loss + next-token loss (the actor's objective keeps pulling on the shared trunk).

Everything, the two pretrainings included, runs through the trainer's one loop and one update
(`critic_jax.train.run`): only the model (`Hooks.build_model`), the loss (`Hooks.loss_fn`) and the
initial parameters change. The shared trunk's logged `loss` is the sum of both losses.

    python experiments/exp_init.py            # 2 seeds, ~5.5 minutes on 2 cores
    python experiments/exp_init.py --steps 100 --pretrain-steps 600 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from _common import log, run_critic, save_figure, subplots, write_csv
from flax import nnx

from critic_jax import masked_mean, train
from critic_jax.config import TrainConfig, from_dict
from critic_jax.models import ActorCritic, Critic
from critic_jax.mrp import sample_mrp

# Pretraining reads another seed's rollouts, disjoint from the critic's and the held-out ones.
_PRETRAIN_SEED_OFFSET = 1000


class RewardModel(Critic):
    """A `Critic` whose outputs are its head's unshifted scores: `scores[:, t]` reads
    `tokens[:, :t + 1]`, so the score at the last real token rates the whole sequence. Its
    parameters are a `Critic`'s, so a trained reward model starts a critic as it is."""

    def __call__(self, tokens, attention_mask=None, *, segment_ids=None) -> jax.Array:
        return self.head(self.backbone(tokens, attention_mask, segment_ids=segment_ids))


def next_token_loss(logits_btv, tokens_bt, mask_bt):
    """Mean cross-entropy of the action tokens: logits[:, t] predicts tokens[:, t + 1]."""
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    nll_bt = -jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return masked_mean(nll_bt, mask_bt[:, 1:])


def reward_model_loss(outputs, mb):
    """Squared error of the score at each row's last real token vs the row's total reward, which
    is the GAE return (λ = γ = 1) at the row's first action."""
    scores_bt = outputs["values"]
    last_b = mb["tokens"].shape[1] - 1 - jnp.argmax(mb["attention_mask"][:, ::-1] != 0, axis=1)
    first_b = jnp.argmax(mb["mask"] != 0, axis=1)
    score_b = jnp.take_along_axis(scores_bt, last_b[:, None], axis=1)[:, 0]
    total_b = jnp.take_along_axis(mb["returns"], first_b[:, None], axis=1)[:, 0]
    return jnp.mean((score_b - total_b) ** 2)


def actor_loss(outputs, mb):
    return next_token_loss(outputs["lm_logits"], mb["tokens"], mb["mask"])


def shared_loss(config: TrainConfig, lm_coef: float):
    """The critic's loss plus `lm_coef` times the next-token loss of the shared trunk."""
    critic_loss = train.default_loss_fn(config)
    return lambda outputs, mb: critic_loss(outputs, mb) + lm_coef * actor_loss(outputs, mb)


def pretrain(config: TrainConfig, make_module, loss_fn, args, name: str):
    """`make_module` (built with the run's seed) trained on `loss_fn` by the trainer: one AdamW
    step per fresh batch (warmup 20 steps, cosine to 10%), GAE with λ = γ = 1 so that the
    returns are the rewards still to come. Returns (host params, per-step losses)."""
    pre = from_dict(
        TrainConfig,
        {
            "steps": args.pretrain_steps,
            "seed": config.seed + _PRETRAIN_SEED_OFFSET,
            "optim": {
                "learning_rate": args.pretrain_lr,
                "warmup_steps": 20,
                "end_lr_ratio": 0.1,
                "b2": 0.999,
                "weight_decay": 1e-4,
            },
            "ppo": {
                "gamma": 1.0,
                "lam": 1.0,
                "minibatch_size": config.data.batch_size,
                "ppo_epochs": 1,
            },
        },
        base=config,
    )
    build = functools.partial(train.build_critic, seed=config.seed, make_module=make_module)
    label = f"pretrain {name} seed={config.seed}"
    out = run_critic(pre, eval_every=0, label=label, build_model=build, loss_fn=loss_fn)
    losses = [h["loss"] for h in out["history"]]
    log(f"{label}: final loss {np.mean(losses[-20:]):.3f} ({out['train_seconds']:.0f}s)")
    return out["params"], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="PPO iterations per critic run")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--lm-coef", type=float, default=1.0, help="LM loss weight (shared)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    histories: dict[str, list] = {}  # init -> one history per seed
    rows, pretrain_log = [], []
    for seed in args.seeds:
        config = from_dict(TrainConfig, {"steps": args.steps, "seed": seed})
        for name, hist in run_arms(config, args).items():
            if name.startswith("pretrain "):
                pretrain_log.append((name, seed, hist))
                rows += [
                    {"init": name, "seed": seed, "iteration": i + 1, "loss": v}
                    for i, v in enumerate(hist)
                ]
                continue
            histories.setdefault(name, []).append(hist)
            rows += [
                {
                    "init": name,
                    "seed": seed,
                    "iteration": h["iteration"],
                    "relative_value_error": h["relative_value_error"],
                    "loss": h.get("loss", ""),
                }
                for h in hist
            ]
    write_csv("exp_init.csv", rows)

    def mean_error(name: str) -> np.ndarray:
        return np.mean([[h["relative_value_error"] for h in hist] for hist in histories[name]], 0)

    log(f"relative error RMSE(V - V*)/std(V*), mean over seeds {args.seeds}, at iterations:")
    marks = [0, 5, 10, 20, args.steps]
    print(f"{'init':14s} " + " ".join(f"{m:>7d}" for m in marks) + "  mean(last 10)")
    for name in histories:
        err = mean_error(name)
        cells = " ".join(f"{err[m]:7.3f}" for m in marks)
        print(f"{name:14s} {cells}  {err[-10:].mean():7.3f}")
    ref = sample_mrp(TrainConfig().data.mrp, seed=(0, 9), batch_size=4096)
    floor = float(-ref["logprobs"][ref["mask"] > 0].mean())
    for name, seed, losses in pretrain_log:
        log(f"{name} (seed {seed}): final loss {np.mean(losses[-20:]):.3f}")
    log(
        f"for scale: sequence reward variance {ref['sequence_reward'].var():.3f}; "
        f"the MRP actor's own next-token NLL {floor:.3f}"
    )

    fig, axes = subplots(1, 2, figsize=(10, 3.4))
    for name in histories:
        it = np.arange(args.steps + 1)
        axes[0].plot(it, mean_error(name), label=name)
        axes[1].plot(it, mean_error(name), label=name)
    axes[0].set_title(f"RMSE(V - V*) / std(V*), held out, {len(args.seeds)} seeds")
    axes[1].set_title("same, log scale")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("PPO iteration (8 critic updates each)")
    axes[0].legend(fontsize=8)
    save_figure(fig, "exp_init.png")


def run_arms(config: TrainConfig, args) -> dict[str, list]:
    """Pretrains the reward model and the actor, then trains the four critics of one seed."""
    rm_params, rm_losses = pretrain(config, RewardModel, reward_model_loss, args, "reward model")
    actor_params, lm_losses = pretrain(config, ActorCritic, actor_loss, args, "actor")
    from_actor = Critic(config.model, rngs=nnx.Rngs(config.seed))
    nnx.update(from_actor.backbone, actor_params["backbone"])
    arms = {
        "random": {},
        "reward model": {"params": rm_params},
        "actor": {"params": nnx.state(from_actor, nnx.Param)},
        "shared trunk": {
            "params": actor_params,
            "build_model": functools.partial(train.build_critic, make_module=ActorCritic),
            "loss_fn": shared_loss(config, args.lm_coef),
        },
    }
    out = {"pretrain reward model": rm_losses, "pretrain actor": lm_losses}
    for name, kwargs in arms.items():
        out[name] = run_critic(config, label=f"{name} seed={config.seed}", **kwargs)["history"]
    return out


if __name__ == "__main__":
    main()
