"""Shared helpers of the experiment scripts: CSV and plot output, and `run_critic`, a thin call of
the trainer's one loop (`critic_jax.train.run`) with the hooks the experiments need.

`run_critic` starts from given parameters, perturbs the rewards of each rollout batch, evaluates
against V* after every iteration and keeps snapshots of the parameters, all through
`train.Hooks`; the loop and the update are the library's. Nothing here is library code.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from critic_jax import train
from critic_jax.config import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"

# Runs that differ only in seed or data compile to the same program: a persistent compilation
# cache lets the second seed of a sweep (and a rerun of a script) skip XLA's compile.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("CRITIC_JAX_COMPILATION_CACHE", "/tmp/critic_jax_compilation_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_critic(
    config: TrainConfig,
    *,
    params: Any = None,
    reward_noise: float = 0.0,
    eval_every: int = 1,
    snapshot_at: Sequence[int] = (),
    label: str = "",
    build_model: Callable | None = None,
    loss_fn: Callable | None = None,
    transform_batch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    extra_metrics: Callable[[Any], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """`critic_jax.train.run` in a temporary workdir, recording every iteration's metrics.

    Args:
      config: the run (its workdir, checkpoint cadence and logging are overridden: metrics every
        iteration, no TensorBoard, a checkpoint only at the end, all thrown away).
      params: parameters to start from (same tree and shapes as the built model's); None: fresh.
      reward_noise: std of Gaussian noise added to the rewards of every valid token of each
        rollout batch (the held-out V* stays the noise-free one, which is also the expected
        value under the noise).
      eval_every: evaluate on the held-out rows every this many iterations and at iteration 0
        (0: never during training).
      snapshot_at: iterations after which to keep a host copy of the parameters (0 = start).
      label: printed with the progress lines.
      build_model, loss_fn: `train.Hooks` fields (default: a `Critic` and the critic loss).
      transform_batch: a further change of each host batch (after the reward noise).
      extra_metrics: `(params) -> metrics` added to every iteration's row, iteration 0 included
        (an evaluation of the experiment's own).

    Returns:
      {"history": [per-iteration metrics dicts, with "iteration"; iteration 0 holds the
       evaluation of the initial parameters when eval_every > 0, extra_metrics is set or
       0 is in snapshot_at],
       "params": final params (host; also when `config.stop` ended the run early), "graphdef",
       "snapshots": {iteration: params}, "compile_seconds", "train_seconds"}.
    """
    rng = np.random.default_rng([config.seed, 7])
    history: list[dict[str, Any]] = []
    out: dict[str, Any] = {"snapshots": {}}
    last: dict[str, Any] = {}

    def build(cfg, mesh):
        out["graphdef"], fresh = (build_model or train.build_critic)(cfg, mesh)
        return out["graphdef"], fresh

    def transform(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if reward_noise:
            rewards = np.asarray(batch["rewards"], np.float32)
            noise = rng.normal(0.0, reward_noise, rewards.shape).astype(np.float32)
            batch["rewards"] = rewards + noise * (np.asarray(batch["mask"]) != 0)
        return transform_batch(batch) if transform_batch else batch

    def on_iteration(it: int, metrics: dict[str, float] | None, state) -> None:
        extra = extra_metrics(state.params) if extra_metrics else {}
        history.append({"iteration": it, **(metrics or {}), **extra})
        if it in snapshot_at:
            out["snapshots"][it] = jax.device_get(state.params)
        last["state"] = state  # only the last one is read, after the loop (never donated)
        if it and (it % max(1, config.steps // 5) == 0 or it == config.steps):
            row = history[-1]
            err = (
                f" rel.err {row['relative_value_error']:.3f}"
                if "relative_value_error" in row
                else ""
            )
            log(f"{label} iteration {it}/{config.steps}: loss {row.get('loss', np.nan):.3f}{err}")

    hooks = train.Hooks(
        build_model=build,
        loss_fn=loss_fn,
        initial_params=None if params is None else (lambda _: params),
        transform_batch=transform if reward_noise or transform_batch else None,
        on_iteration=on_iteration,
        eval_every=eval_every,
        eval_at_start=eval_every > 0 or extra_metrics is not None or 0 in snapshot_at,
    )
    with tempfile.TemporaryDirectory(prefix="critic_jax_experiment_") as workdir:
        config = dataclasses.replace(
            config,
            workdir=workdir,
            checkpoint=dataclasses.replace(config.checkpoint, every=0, async_save=False),
            log=dataclasses.replace(config.log, every=1, tensorboard=False),
        )
        summary = train.run(config, hooks)
    out["params"] = jax.device_get(last["state"].params)
    return {
        "history": history,
        **out,
        "compile_seconds": summary["compile_seconds"],
        "train_seconds": summary["train_seconds"],
    }


def seed_mean(rows: Sequence[dict[str, Any]], key: str = "relative_value_error", **where):
    """The mean over seeds of `key` at every iteration: over the history rows (dicts with "seed",
    one per iteration) whose fields equal `where`; nan where a row lacks `key`."""
    rows = [r for r in rows if all(r[k] == v for k, v in where.items())]
    seeds = sorted({r["seed"] for r in rows})
    return np.mean([[r.get(key, np.nan) for r in rows if r["seed"] == s] for s in seeds], axis=0)


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


def save_figure(fig, name: str, *, legend_fontsize: int | None = None, dpi: int = 90) -> Path:
    """Grids every axis (and gives each a legend when `legend_fontsize` is set), lays the figure
    out and saves it to results/NAME, small enough to keep in the repository."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if legend_fontsize:
            ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
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


def subplots(*args, **kwargs):
    """`matplotlib.pyplot.subplots` with a non-interactive backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
