"""Shared helpers of the experiment scripts: a training loop with hooks, CSV and plot output.

The loop is the trainer's own pieces (`init_state`, `make_setup`, the rollout iterator and the
held-out evaluation) driven from Python, so an experiment can start from given parameters, perturb
the rewards of each rollout batch, evaluate against V* after every iteration and keep snapshots of
the parameters. Nothing here is library code; the update itself is `critic_jax.train`'s.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from critic_jax import data as data_lib
from critic_jax import parallel
from critic_jax.config import TrainConfig
from critic_jax.train import init_state, make_setup

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_KEYS = ("tokens", "attention_mask", "mask", "true_values")

# Runs that differ only in seed or data compile to the same program: a persistent compilation
# cache lets the second seed of a sweep (and a rerun of a script) skip XLA's compile.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CRITIC_JAX_COMPILATION_CACHE", "/tmp/critic_jax_compilation_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def held_out(config: TrainConfig, mesh, n: int | None = None) -> dict[str, jax.Array]:
    """The trainer's held-out rows (same seed stream), as sharded arrays for `setup.evaluate`."""
    n = n or config.log.eval_rows
    full = data_lib.held_out_batch(config.data, seed=config.seed, gamma=config.ppo.gamma, n=n)
    local = {k: np.asarray(full[k]) for k in EVAL_KEYS}
    local["tokens"] = local["tokens"].astype(np.int32)
    local["attention_mask"] = local["attention_mask"].astype(np.int32)
    local["mask"] = local["mask"].astype(np.float32)
    local["true_values"] = local["true_values"].astype(np.float32)
    return parallel.make_global_batch(local, mesh)


def run_critic(
    config: TrainConfig,
    *,
    params: Any = None,
    reward_noise: float = 0.0,
    eval_every: int = 1,
    snapshot_at: Sequence[int] = (),
    label: str = "",
) -> dict[str, Any]:
    """Trains a critic with the trainer's jitted update, evaluating against V* as it goes.

    Args:
      config: the run (steps, model, optimizer, PPO and data sections are used).
      params: parameters to start from (an `nnx.State` of the config's `Critic`); None: random.
      reward_noise: std of Gaussian noise added to the rewards of every valid token of each
        rollout batch (the held-out V* stays the noise-free one, which is also the expected
        value under the noise).
      eval_every: evaluate on the held-out rows every this many iterations (and at iteration 0).
      snapshot_at: iterations after which to keep a host copy of the parameters (0 = start).
      label: printed with the progress lines.

    Returns:
      {"history": [per-iteration metrics dicts], "params": final params, "graphdef",
       "snapshots": {iteration: params}, "compile_seconds", "train_seconds"}.
    """
    mesh = parallel.make_mesh(config.mesh)
    config.check_mesh(mesh.size)
    graphdef, state = init_state(config, mesh)
    if params is not None:
        state = state.replace(params=place_like(params, state.params))
    setup = make_setup(config, mesh, state, graphdef)
    iterator = data_lib.make_rollout_iterator(config.data, seed=config.seed, gamma=config.ppo.gamma)
    rng = np.random.default_rng([config.seed, 7])
    evaluation = held_out(config, mesh)

    def next_batch():
        raw = next(iterator)
        batch = {k: np.asarray(raw[k]) for k in setup.batch_keys}
        batch["tokens"] = batch["tokens"].astype(np.int32)
        batch["attention_mask"] = batch["attention_mask"].astype(np.int32)
        batch["mask"] = batch["mask"].astype(np.float32)
        rewards = batch["rewards"].astype(np.float32)
        if reward_noise:
            noise = rng.normal(0.0, reward_noise, rewards.shape).astype(np.float32)
            rewards = rewards + noise * (batch["mask"] != 0)
        batch["rewards"] = rewards
        return parallel.make_global_batch(batch, mesh)

    def host(tree) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(tree).items()}

    snapshots = {}
    if 0 in snapshot_at:
        snapshots[0] = jax.device_get(state.params)
    history = [{"iteration": 0, **host(setup.evaluate(state.params, evaluation))}]
    batch = next_batch()
    t0 = time.perf_counter()
    compiled = setup.update.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for it in range(1, config.steps + 1):
        state, metrics = compiled(state, batch)
        if it < config.steps:
            batch = next_batch()
        row = {"iteration": it, **host(metrics)}
        if it % eval_every == 0 or it == config.steps:
            row.update(host(setup.evaluate(state.params, evaluation)))
        history.append(row)
        if it in snapshot_at:
            snapshots[it] = jax.device_get(state.params)
        if it % max(1, config.steps // 5) == 0 or it == config.steps:
            err = row.get("relative_value_error", float("nan"))
            log(f"{label} iteration {it}/{config.steps}: loss {row['loss']:.3f} rel.err {err:.3f}")
    return {
        "history": history,
        "params": jax.device_get(state.params),
        "graphdef": graphdef,
        "snapshots": snapshots,
        "compile_seconds": compile_seconds,
        "train_seconds": time.perf_counter() - t0,
    }


def place_like(params: Any, target: Any) -> Any:
    """`params`' arrays in the tree structure and shardings of `target` (same paths and shapes;
    the variables' metadata, e.g. how they were created, may differ)."""
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want, treedef = jax.tree_util.tree_flatten_with_path(target)
    if [p for p, _ in got] != [p for p, _ in want]:
        raise ValueError("params and target have different parameter paths")
    leaves = []
    for (path, x), (_, t) in zip(got, want, strict=True):
        if x.shape != t.shape:
            raise ValueError(f"{jax.tree_util.keystr(path)}: shape {x.shape} != {t.shape}")
        leaves.append(jax.device_put(np.asarray(x, t.dtype), t.sharding))
    return jax.tree.unflatten(treedef, leaves)


def write_csv(name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """Writes `rows` (dicts; the union of their keys, in first-seen order) to results/NAME."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    path = RESULTS / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    log(f"wrote {path.relative_to(RESULTS.parent.parent)} ({len(rows)} rows)")
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}"
    return v


def save_figure(fig, name: str, *, dpi: int = 90) -> Path:
    """Saves a matplotlib figure to results/NAME, small enough to keep in the repository."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    log(f"wrote {path.relative_to(RESULTS.parent.parent)} ({os.path.getsize(path) // 1024} KB)")
    return path


def spikes(values: Sequence[float], *, factor: float = 3.0, window: int = 10) -> int:
    """Iterations whose value exceeds `factor` times the median of the `window` before them."""
    x = np.asarray(values, np.float64)
    count = 0
    for i in range(window, len(x)):
        if x[i] > factor * np.median(x[i - window : i]):
            count += 1
    return count


def pyplot():
    """matplotlib.pyplot with a non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
