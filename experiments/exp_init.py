"""How should a critic start? Error against V* over updates for four initialisations.

- random: the `Critic` as built (small random trunk, zero value head, so V = 0 at step 0);
- reward model: a `Critic` first trained as a reward model, i.e. its head's output at the last
  real token regresses the sequence's total reward (as a `...ForSequenceClassification` scores a
  sequence); trunk and head are kept;
- actor: an `ActorCritic` first trained by next-token prediction on the MRP's action tokens (the
  SFT model); its trunk is copied into a `Critic` with a fresh zero head;
- shared: that same pretrained `ActorCritic` keeps one trunk for both heads and is trained on
  value loss + next-token loss (the actor's objective keeps pulling on the shared trunk).

The first three are trained by the trainer's own jitted update; the shared trunk needs both losses,
so its update (same optimizer, GAE, clipped loss, epochs x minibatches) is written out here.

    python experiments/exp_init.py            # 2 seeds, ~5.5 minutes on 2 cores
    python experiments/exp_init.py --steps 100 --pretrain-steps 600 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import held_out, log, pyplot, run_critic, save_figure, write_csv
from flax import nnx

from critic_jax import compute_gae, masked_mean, parallel
from critic_jax import data as data_lib
from critic_jax.config import TrainConfig, from_dict
from critic_jax.models import ActorCritic, Critic
from critic_jax.train import make_optimizer, ppo_value_loss

# A stream of MRP batches for pretraining, disjoint from the trainer's and the held-out ones.
_PRETRAIN_STREAM = 2


def pretrain_batches(config: TrainConfig, steps: int):
    for i in range(steps):
        b = data_lib.sample_mrp(
            config.data.mrp,
            seed=(config.seed, _PRETRAIN_STREAM, i),
            batch_size=config.data.batch_size,
            gamma=config.ppo.gamma,
        )
        yield {
            "tokens": b["tokens"].astype(np.int32),
            "attention_mask": b["attention_mask"].astype(np.int32),
            "mask": b["mask"].astype(np.float32),
            "sequence_reward": b["sequence_reward"].astype(np.float32),
        }


def next_token_loss(logits_btv, tokens_bt, mask_bt):
    """Mean cross-entropy of the action tokens: logits[:, t] predicts tokens[:, t + 1]."""
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    nll_bt = -jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return masked_mean(nll_bt, mask_bt[:, 1:])


def reward_model_loss(model: Critic, batch):
    """Squared error of the head's score at each row's last real token vs the sequence reward."""
    h_btd = model.backbone(batch["tokens"], batch["attention_mask"])
    scores_bt = model.head(h_btd)
    t = batch["tokens"].shape[1]
    last_b = t - 1 - jnp.argmax(batch["attention_mask"][:, ::-1] != 0, axis=1)
    score_b = jnp.take_along_axis(scores_bt, last_b[:, None], axis=1)[:, 0]
    return jnp.mean((score_b - batch["sequence_reward"]) ** 2)


def actor_loss(model: ActorCritic, batch):
    logits_btv, _ = model(batch["tokens"], batch["attention_mask"])
    return next_token_loss(logits_btv, batch["tokens"], batch["mask"])


def pretrain(model, loss_fn, config: TrainConfig, steps: int, lr: float, name: str):
    """Adam on `loss_fn(model, batch)` over fresh MRP batches; returns the trained model."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 20, steps, lr * 0.1)),
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    losses = []
    for i, batch in enumerate(pretrain_batches(config, steps)):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        if (i + 1) % max(1, steps // 4) == 0:
            log(f"pretrain {name}: step {i + 1}/{steps}, loss {np.mean(losses[-20:]):.3f}")
    log(f"pretrain {name}: {time.perf_counter() - t0:.0f}s")
    return nnx.merge(graphdef, params), losses


def relative_error(values, evaluation) -> float:
    """RMSE(V - V*) / std(V*) over valid held-out tokens (the trainer's definition)."""
    m = np.asarray(evaluation["mask"]) != 0
    v, true = np.asarray(values)[m], np.asarray(evaluation["true_values"])[m]
    return float(np.sqrt(np.mean((v - true) ** 2)) / true.std())


def train_shared(config: TrainConfig, model: ActorCritic, *, lm_coef: float, label: str):
    """The critic update of `critic_jax.train`, on an ActorCritic with value + lm_coef * LM loss."""
    ppo = config.ppo
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.optim, config.steps * config.updates_per_step)
    opt_state = tx.init(params)
    mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=1))
    evaluation = held_out(config, mesh)
    iterator = data_lib.make_rollout_iterator(config.data, seed=config.seed, gamma=ppo.gamma)
    n_mb = config.data.batch_size // ppo.minibatch_size

    def apply(params, tokens, attention_mask):
        return nnx.merge(graphdef, params)(tokens, attention_mask)

    def loss_fn(params, mb):
        logits, values = apply(params, mb["tokens"], mb["attention_mask"])
        v_loss = ppo_value_loss(values, mb, ppo)
        return v_loss + lm_coef * next_token_loss(logits, mb["tokens"], mb["mask"]), v_loss

    @jax.jit
    def iteration(params, opt_state, batch, key):
        _, old_values = apply(params, batch["tokens"], batch["attention_mask"])
        _, returns = compute_gae(
            batch["rewards"], old_values, batch["mask"], gamma=ppo.gamma, lam=ppo.lam
        )
        data = {**batch, "old_values": old_values, "returns": returns}

        def epoch(carry, key):
            perm = jax.random.permutation(key, config.data.batch_size)
            mbs = jax.tree.map(lambda x: x[perm].reshape(n_mb, -1, *x.shape[1:]), data)

            def mb_step(carry, mb):
                params, opt_state = carry
                (_, v_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), v_loss

            return jax.lax.scan(mb_step, carry, mbs)

        keys = jax.random.split(key, ppo.ppo_epochs)
        (params, opt_state), v_loss = jax.lax.scan(epoch, (params, opt_state), keys)
        return params, opt_state, v_loss.mean()

    @jax.jit
    def values_of(params, tokens, attention_mask):
        return apply(params, tokens, attention_mask)[1]

    def error(params):
        v = values_of(params, evaluation["tokens"], evaluation["attention_mask"])
        return relative_error(v, evaluation)

    key = jax.random.PRNGKey(config.seed + 1)
    history = [{"iteration": 0, "relative_value_error": error(params)}]
    for it in range(1, config.steps + 1):
        raw = next(iterator)
        batch = {
            "tokens": raw["tokens"].astype(np.int32),
            "attention_mask": raw["attention_mask"].astype(np.int32),
            "mask": raw["mask"].astype(np.float32),
            "rewards": raw["rewards"].astype(np.float32),
        }
        key, sub = jax.random.split(key)
        params, opt_state, v_loss = iteration(params, opt_state, batch, sub)
        history.append(
            {"iteration": it, "loss": float(v_loss), "relative_value_error": error(params)}
        )
        if it % max(1, config.steps // 5) == 0:
            err = history[-1]["relative_value_error"]
            log(
                f"{label} iteration {it}/{config.steps}: loss {float(v_loss):.3f} rel.err {err:.3f}"
            )
    return history


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
    ref = data_lib.sample_mrp(TrainConfig().data.mrp, seed=(0, 9), batch_size=4096)
    floor = float(-ref["logprobs"][ref["mask"] > 0].mean())
    for name, seed, losses in pretrain_log:
        log(f"{name} (seed {seed}): final loss {np.mean(losses[-20:]):.3f}")
    log(
        f"for scale: sequence reward variance {ref['sequence_reward'].var():.3f}; "
        f"the MRP actor's own next-token NLL {floor:.3f}"
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name in histories:
        it = np.arange(args.steps + 1)
        axes[0].plot(it, mean_error(name), label=name)
        axes[1].plot(it, mean_error(name), label=name)
    axes[0].set_title(f"RMSE(V - V*) / std(V*), held out, {len(args.seeds)} seeds")
    axes[1].set_title("same, log scale")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("PPO iteration (8 critic updates each)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, "exp_init.png")


def run_arms(config: TrainConfig, args) -> dict[str, list]:
    """Pretrains the reward model and the actor, then trains the four critics of one seed."""
    rngs = lambda: nnx.Rngs(config.seed)  # noqa: E731 - one seed for every fresh module
    reward_model, rm_losses = pretrain(
        Critic(config.model, rngs=rngs()),
        reward_model_loss,
        config,
        args.pretrain_steps,
        args.pretrain_lr,
        "reward model",
    )
    actor, lm_losses = pretrain(
        ActorCritic(config.model, rngs=rngs()),
        actor_loss,
        config,
        args.pretrain_steps,
        args.pretrain_lr,
        "actor (next-token)",
    )
    from_actor = Critic(config.model, rngs=rngs())
    nnx.update(from_actor.backbone, nnx.state(actor.backbone, nnx.Param))
    arms = {
        "random": None,
        "reward model": nnx.state(reward_model, nnx.Param),
        "actor": nnx.state(from_actor, nnx.Param),
    }
    out = {"pretrain reward model": rm_losses, "pretrain actor": lm_losses}
    for name, params in arms.items():
        label = f"{name} seed={config.seed}"
        out[name] = run_critic(config, params=params, label=label)["history"]
    out["shared trunk"] = train_shared(
        config, actor, lm_coef=args.lm_coef, label=f"shared trunk seed={config.seed}"
    )
    return out


if __name__ == "__main__":
    main()
