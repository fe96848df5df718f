"""Writes and executes the three notebooks of this folder from the cell sources below.

Regenerate them (sources, outputs and plots) with one command, from the repository root:

    python notebooks/_build.py               # write + execute all three, in place (~1-2 min, CPU)
    python notebooks/_build.py 02            # only the notebooks whose file name contains "02"
    python notebooks/_build.py --no-execute  # write the sources only, without outputs

Edit the cells here, never in the .ipynb files, and commit the executed notebooks so that a
reader sees the outputs. Execution runs a fresh `python3` kernel of this interpreter on the CPU
(`JAX_PLATFORMS=cpu`) with inline PNG plots. `tests/test_notebooks.py` checks that the committed
notebooks carry exactly these sources and were executed, and executes them again (in memory; it
never rewrites the files). The notebooks hold no library code: they only call `critic_jax`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Per-cell limit when executing (the slowest cell, a short training run, takes ~30 s on 2 cores).
CELL_TIMEOUT_S = 300


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


PURE_FUNCTIONS = [
    md("""
# The pure functions on a worked example

`critic_jax`'s building blocks are pure functions of `[B, T]` arrays, aligned to token positions:
`mask[b, t]` says token `t` is an action (a generated token whose loss counts), `values[b, t]` is
V(s_t), the value of the prefix before token `t`, and `rewards[b, t]` the reward for emitting it.
This notebook runs `token_rewards`, `td_errors`, `compute_gae`, `value_loss` and `value_metrics`
on two hand-made rows, one of them a multi-turn response with a tool call whose observation
tokens are *not* actions.
"""),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import critic_jax as cj

np.set_printoptions(precision=3, suppress=True, linewidth=120)
plt.rcParams["figure.dpi"] = 72
"""),
    md("""
## The example

Row 0: a 3-token prompt, then actions at 3–5 (token 5 calls a tool), two observation tokens
returned by the tool at 6–7 (mask 0: the policy did not choose them), actions 8–10 (10 is EOS),
one padding token. Row 1: a plain single-turn response of 5 tokens. Each row gets its sequence
reward on the last action and a small per-token KL penalty (`token_rewards`). The values are those
of some critic; positions that are not actions hold NaN on purpose: every function ignores them.
"""),
    code("""
T = 12
mask = np.zeros((2, T), np.float32)
mask[0, [3, 4, 5, 8, 9, 10]] = 1  # multi-turn: 6 and 7 are the tool's observation tokens
mask[1, 3:8] = 1                  # single turn

sequence_reward = np.array([1.0, -0.5], np.float32)
kl = np.where(mask > 0, 0.3, 0.0).astype(np.float32)  # e.g. logprob - ref_logprob per token
rewards = cj.token_rewards(sequence_reward, mask, kl=kl, kl_coef=0.1)

values = np.full((2, T), np.nan, np.float32)
values[0, [3, 4, 5, 8, 9, 10]] = [0.2, 0.35, 0.3, 0.6, 0.75, 0.9]
values[1, 3:8] = [0.1, 0.0, -0.2, -0.3, -0.4]

print("rewards\\n", np.asarray(rewards))
print("values (NaN off the mask)\\n", values)
"""),
    md("""
## TD errors and GAE

`td_errors` is δ_t = r_t + γ V(s_t') − V(s_t), where t' is the **next valid** position: the
TOOL action at 5 bootstraps from the value at 8, because 6 and 7 are skipped (transparent: no
discount, no break of the recursion). `compute_gae` runs A_t = δ_t + γλ A_t' backwards and
returns `returns = A + V`, the critic's regression targets. λ = 0 gives the one-step TD target
r_t + γ V(s_t'), so `returns - values == td_errors`; λ = 1 gives the Monte-Carlo return
(the sum of the remaining rewards), whatever the values are.
"""),
    code("""
gamma = 1.0
deltas = cj.td_errors(rewards, values, mask, gamma=gamma)
returns = {}
for lam in (0.0, 0.95, 1.0):
    adv, ret = cj.compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    returns[lam] = np.asarray(ret)
    print(f"lam={lam}: returns row 0 =", returns[lam][0])

valid = mask > 0
assert np.allclose((returns[0.0] - np.nan_to_num(values))[valid], np.asarray(deltas)[valid])
mc = np.cumsum(np.asarray(rewards)[:, ::-1], axis=1)[:, ::-1]  # reward-to-go
assert np.allclose(returns[1.0][valid], mc[valid], atol=1e-6)
print("TD errors row 0 =", np.asarray(deltas)[0])
print("lam=0 returns - values == TD errors; lam=1 returns == reward-to-go: checked")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
t = np.arange(T)
for row, ax in enumerate(axes):
    m = valid[row]
    for s in np.flatnonzero(~m):
        ax.axvspan(s - 0.5, s + 0.5, color="0.9", lw=0)
    ax.bar(t[m], np.asarray(rewards)[row, m], color="tab:gray", alpha=0.6, label="reward r_t")
    ax.plot(t[m], values[row, m], "ko-", label="value V(s_t)")
    for lam, style in ((0.0, "s--"), (0.95, "^-"), (1.0, "v:")):
        ax.plot(t[m], returns[lam][row, m], style, label=f"GAE return, λ={lam}")
    ax.plot(t[m], np.asarray(deltas)[row, m], "x", ms=9, label="TD error δ_t")
    ax.set_title(["row 0: multi-turn (grey = not an action)", "row 1: single turn"][row])
    ax.set_xlabel("token position t")
    ax.set_xticks(t)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7, loc="upper left")
fig.tight_layout()
"""),
    md("""
## The value loss

Per token, with e = V − R: ½e² without clipping; with `clip_eps` the pessimistic PPO2 form
max(½(V_clip − R)², ½e²), where V_clip = V_old + clip(V − V_old, ±ε). The gradient with respect
to each value shows what the loss does per token: zero off the mask, and zero where clipping is
active (the prediction has already moved more than ε away from the old value *and* the clipped
error is the larger one). The reduction decides how token losses become one scalar.
"""),
    code("""
old_values = np.nan_to_num(values)
# One optimizer step later the critic has moved: +0.4 at t=3 (towards its target, past ε),
# -0.5 at t=4 (away from it), small moves elsewhere.
step = np.zeros((2, T), np.float32)
step[0, [3, 4, 5, 8, 9, 10]] = [0.4, -0.5, 0.05, 0.3, -0.1, 0.0]
step[1, 3:8] = [0.1, -0.1, 0.25, 0.0, -0.3]
new_values = (old_values + step).astype(np.float32)
targets = returns[0.95]

for clip_eps in (None, 0.2):
    loss, grad = jax.value_and_grad(cj.value_loss)(
        new_values, old_values, targets, mask, clip_eps=clip_eps
    )
    print(f"clip_eps={clip_eps}: loss {float(loss):.4f}\\n  dloss/dV row 0 = {np.asarray(grad)[0]}")

for reduction in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm"):
    loss = cj.value_loss(new_values, old_values, targets, mask, clip_eps=0.2, reduction=reduction)
    print(f"{reduction:>24s}: {float(loss):.4f}")

metrics = cj.value_metrics(new_values, old_values, targets, mask, clip_eps=0.2)
print({k: round(float(v), 4) for k, v in metrics.items()})
"""),
    code("""
fig, ax = plt.subplots(figsize=(7, 3))
for clip_eps, style in ((None, "o-"), (0.2, "s--")):
    grad = jax.grad(cj.value_loss)(new_values, old_values, targets, mask, clip_eps=clip_eps)
    ax.plot(t, np.asarray(grad)[0], style, label=f"clip_eps={clip_eps}")
ax.set_title("row 0: dloss/dV per token (seq-mean-token-mean)")
ax.set_xlabel("token position t")
ax.set_xticks(t)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
"""),
    md("""
Everything above is jit-, vmap- and grad-friendly; for example a sweep over λ is one `vmap`:
"""),
    code("""
lams = jnp.linspace(0.0, 1.0, 5)
sweep = jax.jit(jax.vmap(lambda lam: cj.compute_gae(rewards, values, mask, lam=lam)[1]))(lams)
print(sweep.shape, "\\n", np.asarray(sweep)[:, 0, [3, 5, 8, 10]])
"""),
]


TRAIN_A_CRITIC = [
    md("""
# Train a critic against the true values

The default data is a synthetic token Markov reward process (`critic_jax.mrp`) whose true values
V* and true advantages A* = Q* − V* are known exactly, so a run can measure how far its critic is
from the truth, and how good the policy's advantages computed with that critic are. This notebook
trains the tiny critic for a few PPO iterations with `critic_jax.train.train`, restores its
checkpoint, and compares its values and advantages with V* and A* on held-out sequences.
"""),
    code("""
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import critic_jax as cj
from critic_jax.checkpoint import Checkpointer, restore_state
from critic_jax.config import TrainConfig, from_dict
from critic_jax.metrics import advantage_metrics, value_error_metrics
from critic_jax.mrp import describe_mrp
from critic_jax.parallel import make_mesh
from critic_jax.train import build_critic, held_out, init_state, make_trainer, train

plt.rcParams["figure.dpi"] = 72
print(describe_mrp())
"""),
    md("""
## A short run

40 PPO iterations of 64 rows (2 epochs × 4 minibatches: 320 AdamW steps), the critic's targets are
GAE returns with λ = 0.95. Every 4 iterations the loop evaluates the critic on 256 held-out rows (a
random stream the training batches never use): the value metrics compare V with V*, the advantage
metrics compare the policy's GAE advantages (λ = `ppo.policy_lam` = 0.95) computed with V against
A*. `on_step` receives the metrics of each logged iteration; the run also writes them to
`WORKDIR/metrics.jsonl` and ends with a checkpoint and `summary.json`.
"""),
    code("""
tmp = tempfile.TemporaryDirectory(prefix="critic_jax_nb02_")
workdir = Path(tmp.name)
config = from_dict(
    TrainConfig,
    {
        "steps": 40,
        "workdir": str(workdir),
        "data": {"batch_size": 64},
        "ppo": {"ppo_epochs": 2, "minibatch_size": 16, "lam": 0.95, "policy_lam": 0.95},
        "log": {"every": 2, "eval_every": 4, "eval_rows": 256, "tensorboard": False},
        "checkpoint": {"every": 0},
    },
)
history = []


def on_step(iteration, metrics):  # metrics is None on iterations that log nothing
    if metrics is not None:
        history.append({"it": iteration, **metrics})


summary = train(config, on_step=on_step)

for key in ("steps", "optimizer_updates", "final_loss", "explained_variance",
            "relative_value_error", "explained_variance_vs_true",
            "advantage_error_vs_true", "advantage_sign_agreement", "advantage_rank_correlation",
            "compile_seconds", "train_seconds"):
    value = summary[key]
    print(f"{key:>28s}: {value:.3f}" if isinstance(value, float) else f"{key:>28s}: {value}")
"""),
    md("""
- `relative_value_error`: RMSE(V − V*) / std(V*) over action tokens (0 is perfect, 1 is no better
  than the constant mean of V*); `explained_variance_vs_true`: 1 − Var[V* − V] / Var[V*].
- `advantage_error_vs_true`: RMSE(A − A*) / std(A*) of the GAE advantages A;
  `advantage_sign_agreement`: the fraction of tokens (with A* clearly nonzero) where A and A*
  have the same sign, i.e. where the policy gradient pushes the right way;
  `advantage_rank_correlation`: Spearman's ρ between A and A* across the rows at each token
  position, averaged over the positions (a policy update compares advantages within a batch).
"""),
    code("""
evals = [h for h in history if "relative_value_error" in h]
it = lambda rows: [r["it"] for r in rows]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(it(history), [h["loss"] for h in history])
axes[0].set_title("value loss (training batches)")
axes[1].plot(it(evals), [h["relative_value_error"] for h in evals], "o-", label="relative error")
axes[1].plot(it(evals), [h["explained_variance_vs_true"] for h in evals], "s--",
             label="explained variance")
axes[1].set_title("values V vs V* (held out)")
for key, style in (("advantage_error_vs_true", "o-"), ("advantage_sign_agreement", "s--"),
                   ("advantage_rank_correlation", "^:")):
    axes[2].plot(it(evals), [h[key] for h in evals], style, label=key.removeprefix("advantage_"))
axes[2].set_title("GAE advantages A vs A* (held out)")
for ax in axes:
    ax.set_xlabel("PPO iteration")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
axes[2].legend(fontsize=8)
fig.tight_layout()
"""),
    md("""
## Restore the checkpoint and evaluate

The pieces of the loop, called one by one: `build_critic` places fresh parameters on the mesh,
`init_state` wraps them with the optimizer state, `restore_state` reads the run's last checkpoint
onto that layout, `make_trainer` jits the update and the evaluation, and `held_out` is the batch
the run evaluated on. The same seed gives the run's initial parameters, so the table compares
the critic before and after training, and a critic that *is* V* (its advantages at λ = 0.95 are
not A*: the sampled rewards of the later tokens add noise).
"""),
    code("""
mesh = make_mesh(config.mesh)
graphdef, params = build_critic(config, mesh)
fresh = init_state(config, mesh, params)
ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
step, state, data_state = restore_state(ckpt, fresh)
ckpt.close()
print(f"restored iteration {step}, optimizer step {int(state.step)}, data iterator {data_state}")

trainer = make_trainer(config, mesh, graphdef, state)
evaluation = held_out(config, mesh)
before = jax.device_get(trainer.evaluate(fresh.params, evaluation))
after = jax.device_get(trainer.evaluate(state.params, evaluation))
assert np.isclose(after["relative_value_error"], summary["relative_value_error"], rtol=1e-4)

held = {k: np.asarray(v) for k, v in evaluation.items()}  # host copies of the held-out rows
m = held["mask"] > 0
lam = config.ppo.policy_lam
adv_true_v, _ = cj.compute_gae(held["rewards"], held["true_values"], held["mask"], lam=lam)
ideal = jax.device_get({
    **value_error_metrics(held["true_values"], held["true_values"], held["mask"]),
    **advantage_metrics(adv_true_v, held["true_advantages"], held["mask"]),
})

print(f"\\n{'':28s} {'untrained':>10s} {'trained':>10s} {'V = V*':>10s}")
for key in ("relative_value_error", "explained_variance_vs_true", "advantage_error_vs_true",
            "advantage_sign_agreement", "advantage_rank_correlation"):
    print(f"{key:>28s} {before[key]:10.3f} {after[key]:10.3f} {ideal[key]:10.3f}")
"""),
    md("""
The critic's predictions on every action token of the held-out rows, and the advantages the
policy would get from them, against the truth:
"""),
    code("""
critic = nnx.merge(graphdef, state.params)
values = np.asarray(critic(held["tokens"], held["attention_mask"]))
adv, _ = cj.compute_gae(held["rewards"], values, held["mask"], lam=lam)
adv = np.asarray(adv)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, x, y, name in ((axes[0], held["true_values"], values, "V"),
                       (axes[1], held["true_advantages"], adv, f"A (GAE, λ={lam})")):
    ax.scatter(x[m], y[m], s=3, alpha=0.25)
    lim = [min(x[m].min(), y[m].min()), max(x[m].max(), y[m].max())]
    ax.plot(lim, lim, "k:", lw=1)
    ax.set_xlabel(f"true {name.split()[0]}*")
    ax.set_ylabel(f"critic's {name}")
    ax.set_title(f"{name} on {m.sum()} held-out action tokens", fontsize=10)
row = int(np.argmax(m.sum(1)))  # the longest response
t = np.flatnonzero(m[row])
axes[2].plot(t, held["true_values"][row, t], "ko-", label="V*")
axes[2].plot(t, values[row, t], "s--", label="critic V")
axes[2].bar(t, held["rewards"][row, t], color="tab:gray", alpha=0.5, label="reward")
axes[2].set_xlabel("token position")
axes[2].set_title(f"held-out row {row}", fontsize=10)
axes[2].legend(fontsize=8)
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
"""),
    md("""
If the untrained critic's sign agreement or rank correlation looks better than the trained one's,
that is no mistake in the table: the last section shows why.

## What the advantage metrics measure

The advantage metrics judge a critic by what the policy gets from it, so they depend on the
policy's λ as well. One `vmap` over λ of `compute_gae` and `advantage_metrics` compares three
critics on the held-out rows: the trained one, V* itself, and a constant V = 0 (about what the
untrained critic predicts).
"""),
    code("""
def advantage_curves(lams, values, batch):
    def at(lam):
        a, _ = cj.compute_gae(batch["rewards"], values, batch["mask"], lam=lam)
        return advantage_metrics(a, batch["true_advantages"], batch["mask"])

    return jax.vmap(at)(lams)


lams = np.linspace(0.0, 1.0, 21, dtype=np.float32)
critics = {"trained critic": values, "V = V*": held["true_values"],
           "V = 0": np.zeros_like(values)}
sweep = jax.jit(advantage_curves)
curves = {name: jax.device_get(sweep(lams, v, held)) for name, v in critics.items()}
best = lams[np.argmin(curves["trained critic"]["advantage_error_vs_true"])]
print(f"trained critic: the smallest advantage error is at λ = {best:.2f}")

a_star, v_star, r = (held[k][m] for k in ("true_advantages", "true_values", "rewards"))
clear = np.abs(a_star) > 1e-3 * a_star.std()
agree = lambda x: np.mean((np.sign(a_star) == np.sign(x))[clear])
print(f"on the tokens where A* is clearly nonzero, sign(A*) = sign(r_t) on {agree(r):.0%}, "
      f"sign(A*) = sign(V*(s_t)) on {agree(v_star):.0%}")

keys = ("advantage_error_vs_true", "advantage_sign_agreement", "advantage_rank_correlation")
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for name, style in zip(critics, ("o-", "k--", "s:")):
    for ax, key in zip(axes, keys):
        ax.plot(lams, curves[name][key], style, ms=4, label=name)
for ax, key in zip(axes, keys):
    ax.axvline(lam, color="0.6", lw=1)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("GAE λ of the advantages")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
fig.tight_layout()
"""),
    md("""
Reading the curves (the grey line is `ppo.policy_lam`, where the run evaluates):

- With V = V*, λ = 0 gives A* exactly: in this MRP the next state is fixed by the action, so the
  one-step TD error r_t + γV*(s_t+1) − V*(s_t) is Q* − V*. A larger λ only adds the noise of the
  sampled future.
- A learned critic's value error enters most at small λ, where A is built from V alone, and less
  as λ grows; its best λ trades that bias against the noise of the future.
- `advantage_error_vs_true` ranks the critics as one expects. Sign agreement and rank
  correlation need care on this MRP: the sign of A* is largely predictable without any critic
  (the line printed above), so the constant critic, whose A is just a λ-discounted sum of
  rewards, scores well on them, at large λ better than V* itself. Compare critics on these two
  metrics at the same λ and together with the error, never on their own.
"""),
    code("""
tmp.cleanup()  # the run's workdir: metrics.jsonl, summary.json, checkpoints/
"""),
]


SHARDING = [
    md("""
# Sharding and checkpoints

The trainer runs one `jax.jit` over a `("data", "fsdp", "tensor")` device mesh. Parameters name
their axes with logical names, and one rule table (`critic_jax.parallel.LOGICAL_AXIS_RULES`) maps
them onto the mesh. Eight fake CPU devices stand in for accelerators here; the platform and the
device count have to be set before JAX computes anything, hence the first cell.
"""),
    code("""
import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())
"""),
    code("""
import tempfile
from pathlib import Path

import numpy as np

from critic_jax import data, parallel
from critic_jax.checkpoint import CheckpointConfig, Checkpointer, restore_state, save_state
from critic_jax.config import TrainConfig, from_dict, to_dict
from critic_jax.train import build_critic, init_state, make_trainer

for logical, mesh_axis in parallel.LOGICAL_AXIS_RULES:
    print(f"{logical:>9s} -> {mesh_axis}")
"""),
    md("""
## Where the parameters live

A mesh of 2 (data) × 4 (fsdp): the batch is split 8 ways, and every parameter with an `embed`
axis is split 4 ways along it (ZeRO-3 style), so each device holds about a quarter of the
parameters. `build_critic` creates them directly in that layout (no device ever holds the whole
model), and `init_state` adds AdamW moments sharded like their parameters.
"""),
    code("""
config = from_dict(TrainConfig, {"mesh": {"data": 2, "fsdp": 4}, "steps": 2,
                                 "data": {"batch_size": 32}})
mesh = parallel.make_mesh(config.mesh)
print(dict(mesh.shape))
graphdef, params = build_critic(config, mesh)
state = init_state(config, mesh, params)

dev0 = jax.devices()[0]
def on_dev0(x):
    return sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)

def named_leaves(tree):
    return [(jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"), x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]

def param(tree, name):
    return dict(named_leaves(tree))[name]

named = named_leaves(state.params)
for name, x in named:
    shard = next(s for s in x.addressable_shards if s.device == dev0)
    print(f"{name:32s} {str(x.shape):15s} {str(x.sharding.spec):32s} device 0: {shard.data.shape}")
for what, tree in (("parameter", params), ("AdamW moment", state.opt_state)):
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim]
    total, mine = sum(x.nbytes for x in leaves), sum(on_dev0(x) for x in leaves)
    print(f"{what} bytes: {total} in all, {mine} on device 0 ({mine / total:.0%})")
"""),
    code("""
# Which slice of the embedding table each device holds.
name, embed = next((n, x) for n, x in named if "embed" in n and x.ndim == 2)
for device, index in sorted(embed.sharding.devices_indices_map(embed.shape).items(),
                            key=lambda kv: kv[0].id):
    rows, cols = (f"{s.start or 0}:{s.stop or n}" for s, n in zip(index, embed.shape))
    print(f"{device} holds {name}[{rows}, {cols}]")
"""),
    md("""
## One sharded update

A rollout batch is split over `("data", "fsdp")`; the update of one PPO iteration (old values,
GAE, epochs × minibatches of AdamW steps) is a single jitted call with the state donated.
`make_trainer` jits it with explicit shardings; compiling it ahead of time (as the training loop
does) shows the collectives XLA inserted for the sharded axes: all-gathers of the fsdp-sharded
parameters, and reductions of the gradients over the batch axes.
"""),
    code("""
trainer = make_trainer(config, mesh, graphdef, state)
iterator = data.make_rollout_iterator(config.data, seed=config.seed, gamma=config.ppo.gamma)
raw = next(iterator)
batch = parallel.make_global_batch({k: raw[k] for k in trainer.batch_keys}, mesh)
print("batch keys", trainer.batch_keys)
print("tokens", batch["tokens"].shape, "rows per device:",
      {s.device.id: s.data.shape[0] for s in batch["tokens"].addressable_shards})

compiled = trainer.update.lower(state, batch).compile()
hlo = compiled.as_text()
print({op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
       for op in ("all-gather", "reduce-scatter", "all-reduce")})

state, metrics = compiled(state, batch)
print({k: round(float(v), 4) for k, v in metrics.items() if k in ("loss", "grad_norm")})
print("optimizer step", int(state.step), "| iteration", int(state.iteration))
"""),
    md("""
## Save, then restore onto a different mesh

`save_state` saves the state, the data iterator's position and the config together
(asynchronously, through Orbax). `restore_state` reads a checkpoint onto the shardings of the
state it is given, built for the *current* mesh: a state saved on 2 × 4 devices comes back
8-way fsdp, bit-identical. (The training loop itself resumes a run only under the settings it
was saved with, the mesh included; this is the lower level it is built on.)
"""),
    code("""
tmp = tempfile.TemporaryDirectory(prefix="critic_jax_nb03_")
ckpt = Checkpointer(Path(tmp.name) / "checkpoints", CheckpointConfig())
save_state(ckpt, 1, state, data_state=iterator.get_state(), config=to_dict(config))
ckpt.wait()
print("saved steps:", ckpt.all_steps())

config8 = from_dict(TrainConfig, {"mesh": {"data": 1, "fsdp": 8}}, base=config)
mesh8 = parallel.make_mesh(config8.mesh)
graphdef8, params8 = build_critic(config8, mesh8)
step, restored, data_state = restore_state(ckpt, init_state(config8, mesh8, params8))
ckpt.close()

embed, embed8 = param(state.params, name), param(restored.params, name)
print("restored step", step, "| data iterator", data_state, "| mesh", dict(mesh8.shape))
print(f"{name}: spec {embed.sharding.spec} -> {embed8.sharding.spec}, shard on device 0 "
      f"{embed.addressable_shards[0].data.shape} -> {embed8.addressable_shards[0].data.shape}")
same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                    jax.device_get(state), jax.device_get(restored))
assert all(jax.tree.leaves(same))
print("every restored array equals the saved one")
tmp.cleanup()
"""),
]


NOTEBOOKS = {
    "01_pure_functions.ipynb": PURE_FUNCTIONS,
    "02_train_a_critic.ipynb": TRAIN_A_CRITIC,
    "03_sharding_and_checkpoints.ipynb": SHARDING,
}


def build(name: str):
    """The notebook `name` with the cells above and no outputs."""
    nb = new_notebook(cells=[nbformat.from_dict(cell) for cell in NOTEBOOKS[name]])
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids: a rebuild changes only what changed
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def kernel_env(**overrides: str) -> dict[str, str]:
    """The kernel's environment: this one, on the CPU, with the inline (PNG) plot backend, and
    this interpreter's scripts first on PATH."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # Agg here would leave the plots out of the outputs
    env["JAX_PLATFORMS"] = "cpu"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(overrides)
    return env


def execute(nb, *, timeout: int = CELL_TIMEOUT_S, env: dict[str, str] | None = None):
    """Runs `nb` top to bottom in a fresh kernel of this interpreter, in place; a cell that raises
    raises `nbclient.exceptions.CellExecutionError`. Returns `nb`."""
    from nbclient import NotebookClient  # only execution needs nbclient

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        coalesce_streams=True,  # one stdout output per cell: a rebuild diffs only in numbers
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute(env=env or kernel_env())
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="build the notebooks whose name contains this")
    parser.add_argument("--no-execute", action="store_true", help="write sources, no outputs")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(s in n for s in args.only)]
    if not names:
        parser.error(f"no notebook matches {args.only}; have {list(NOTEBOOKS)}")
    for name in names:
        nb = build(name)
        t0 = time.perf_counter()
        if not args.no_execute:
            execute(nb)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        size = (HERE / name).stat().st_size
        took = "" if args.no_execute else f", executed in {time.perf_counter() - t0:.1f}s"
        print(f"wrote {HERE / name} ({size / 1024:.0f} KiB{took})")


if __name__ == "__main__":
    main()
