"""Writes the three notebooks of this folder (unexecuted) from the cell sources below.

    python notebooks/_build.py

Edit the cells here, not in the .ipynb files; `tests/test_notebooks.py` executes the notebooks.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


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
# Train a critic on the synthetic MRP

The default data is a synthetic token Markov reward process whose true values V* are known
exactly, so a run can measure how far its critic is from the truth. This notebook trains the tiny
critic for a few PPO iterations with `critic_jax.train.train` and compares its predictions with
V* on held-out sequences.
"""),
    code("""
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from critic_jax import data
from critic_jax.checkpoint import Checkpointer, abstract_like
from critic_jax.config import TrainConfig, from_dict
from critic_jax.parallel import make_mesh
from critic_jax.train import from_checkpoint_tree, init_state, to_checkpoint_tree, train

print(data.describe_mrp())
"""),
    code("""
workdir = Path(tempfile.mkdtemp(prefix="critic_jax_nb02_"))
config = from_dict(
    TrainConfig,
    {
        "steps": 40,
        "workdir": str(workdir),
        "log": {"every": 2, "eval_every": 4, "tensorboard": False},
        "checkpoint": {"every": 0},
    },
)
summary = train(config)
for key in ("steps", "optimizer_updates", "relative_value_error", "explained_variance_vs_true",
            "compile_seconds", "train_seconds"):
    print(f"{key:>28s}: {summary[key]:.3f}" if isinstance(summary[key], float) else
          f"{key:>28s}: {summary[key]}")
"""),
    code("""
rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].plot([r["iteration"] for r in rows], [r["loss"] for r in rows])
axes[0].set_title("value loss (metrics.jsonl)")
ev = [r for r in rows if "relative_value_error" in r]
axes[1].plot([r["iteration"] for r in ev], [r["relative_value_error"] for r in ev], "o-")
axes[1].set_title("RMSE(V - V*) / std(V*) on held-out rows")
axes[1].set_ylim(bottom=0)
for ax in axes:
    ax.set_xlabel("PPO iteration")
    ax.grid(alpha=0.3)
fig.tight_layout()
"""),
    md("""
The run ends with a checkpoint. Restore it into a state built for the current mesh, rebuild the
critic, and predict the values of held-out sequences (a random stream the training batches never
use).
"""),
    code("""
mesh = make_mesh(config.mesh)
graphdef, state = init_state(config, mesh)
ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
step, tree, _ = ckpt.restore(abstract_like(to_checkpoint_tree(state)))
ckpt.close()
state = from_checkpoint_tree(tree, state)
critic = nnx.merge(graphdef, state.params)

held = data.held_out_batch(config.data, seed=config.seed, gamma=config.ppo.gamma, n=256)
pred = np.asarray(critic(held["tokens"], held["attention_mask"]))
m = held["mask"] > 0
true = held["true_values"]
rel = np.sqrt(np.mean((pred[m] - true[m]) ** 2)) / true[m].std()
print(f"restored step {step}; relative error on 256 held-out rows: {rel:.3f}")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].scatter(true[m], pred[m], s=3, alpha=0.3)
lim = [min(true[m].min(), pred[m].min()), max(true[m].max(), pred[m].max())]
axes[0].plot(lim, lim, "k:", lw=1)
axes[0].set_xlabel("true value V*")
axes[0].set_ylabel("critic V")
axes[0].set_title("every action token of 256 held-out rows")
row = int(np.argmax(m.sum(1)))  # the longest response
t = np.flatnonzero(m[row])
axes[1].plot(t, true[row, t], "ko-", label="V*")
axes[1].plot(t, pred[row, t], "s--", label="critic")
axes[1].bar(t, held["rewards"][row, t], color="tab:gray", alpha=0.5, label="reward")
axes[1].set_xlabel("token position")
axes[1].set_title(f"held-out row {row}")
axes[1].legend(fontsize=8)
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()
"""),
]


SHARDING = [
    md("""
# Sharding and checkpoints

The trainer runs one `jax.jit` over a `("data", "fsdp", "tensor")` device mesh. Parameters name
their axes with logical names, and one rule table (`critic_jax.parallel.LOGICAL_AXIS_RULES`) maps
them onto the mesh. Eight fake CPU devices stand in for accelerators here; the device count has
to be set before JAX computes anything, hence the first cell.
"""),
    code("""
import jax

jax.config.update("jax_num_cpu_devices", 8)
print(jax.devices())
"""),
    code("""
import tempfile
from pathlib import Path

import numpy as np

from critic_jax import data, parallel
from critic_jax.checkpoint import CheckpointConfig, Checkpointer, abstract_like
from critic_jax.config import TrainConfig, from_dict, to_dict
from critic_jax.train import from_checkpoint_tree, init_state, make_setup, to_checkpoint_tree

for logical, mesh_axis in parallel.LOGICAL_AXIS_RULES:
    print(f"{logical:>9s} -> {mesh_axis}")
"""),
    md("""
## Where the parameters live

A mesh of 2 (data) × 4 (fsdp): the batch is split 8 ways, and every parameter with an `embed`
axis is split 4 ways along it (ZeRO-3 style), so each device holds a quarter of the parameters.
"""),
    code("""
config = from_dict(TrainConfig, {"mesh": {"data": 2, "fsdp": 4}, "steps": 2})
mesh = parallel.make_mesh(config.mesh)
print(dict(mesh.shape))
graphdef, state = init_state(config, mesh)

dev0 = jax.devices()[0]
total = on_dev0 = 0
for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0][:8]:
    shard = next(s for s in x.addressable_shards if s.device == dev0)
    name = jax.tree_util.keystr(path).removesuffix(".value")
    print(f"{name:40s} {str(x.shape):12s} spec={str(x.sharding.spec):26s} on device 0: "
          f"{shard.data.shape}")
for x in jax.tree.leaves(state.params):
    total += x.nbytes
    on_dev0 += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev0)
print(f"parameter bytes: {total} in all, {on_dev0} on device 0 ({on_dev0 / total:.0%})")
"""),
    code("""
embed = state.params["backbone"]["embed"][...]
for device, index in sorted(embed.sharding.devices_indices_map(embed.shape).items(),
                            key=lambda kv: kv[0].id):
    rows, cols = (f"{s.start or 0}:{s.stop or n}" for s, n in zip(index, embed.shape))
    print(f"{device} holds embed[{rows}, {cols}]")
"""),
    md("""
## One sharded update

A rollout batch is split over `("data", "fsdp")`; the update of one PPO iteration (old values,
GAE, epochs × minibatches of AdamW steps) is a single jitted call with the state donated.
"""),
    code("""
setup = make_setup(config, mesh, state, graphdef)
iterator = data.make_rollout_iterator(config.data, seed=0, gamma=config.ppo.gamma)
raw = next(iterator)
batch = parallel.make_global_batch(
    {
        "tokens": raw["tokens"].astype(np.int32),
        "attention_mask": raw["attention_mask"].astype(np.int32),
        "mask": raw["mask"].astype(np.float32),
        "rewards": raw["rewards"].astype(np.float32),
    },
    mesh,
)
print("tokens", batch["tokens"].shape, "rows per device:",
      {s.device.id: s.data.shape[0] for s in batch["tokens"].addressable_shards})
state, metrics = setup.update(state, batch)
print({k: round(float(v), 4) for k, v in metrics.items() if k in ("loss", "grad_norm")})
print("optimizer step", int(state.step))
"""),
    md("""
## Save, then restore onto a different mesh

`Checkpointer` saves the state, the data iterator's position and the config together
(asynchronously). Restoring takes an abstract state built for the *current* mesh, so a run saved
on 2 × 4 devices can resume on a mesh of 8-way fsdp, and the values are bit-identical.
"""),
    code("""
directory = Path(tempfile.mkdtemp(prefix="critic_jax_nb03_")) / "checkpoints"
ckpt = Checkpointer(directory, CheckpointConfig())
ckpt.save(1, to_checkpoint_tree(state), data_state=iterator.get_state(), config=to_dict(config))
ckpt.wait()
print("saved steps:", ckpt.all_steps(), "in", directory)

config8 = from_dict(TrainConfig, {"mesh": {"data": 1, "fsdp": 8}}, base=config)
mesh8 = parallel.make_mesh(config8.mesh)
graphdef8, fresh = init_state(config8, mesh8)
step, tree, data_state = ckpt.restore(abstract_like(to_checkpoint_tree(fresh)))
restored = from_checkpoint_tree(tree, fresh)
ckpt.close()

embed8 = restored.params["backbone"]["embed"][...]
print("restored step", step, "data iterator", data_state)
print("embed spec before:", embed.sharding.spec, "after:", embed8.sharding.spec,
      "| shard on device 0:", embed8.addressable_shards[0].data.shape)
same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                    jax.device_get(state), jax.device_get(restored))
assert all(jax.tree.leaves(same))
print("every restored array equals the saved one")
"""),
]


def main() -> None:
    for name, cells in (
        ("01_pure_functions.ipynb", PURE_FUNCTIONS),
        ("02_train_a_critic.ipynb", TRAIN_A_CRITIC),
        ("03_sharding_and_checkpoints.ipynb", SHARDING),
    ):
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
