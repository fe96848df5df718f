"""Advantages for the actor: a trained critic's values, returns and advantages of Parquet rollouts.

`score(...)` is the hand-off to any actor trainer. It reads rollouts in the Parquet schema
(`critic_jax.rollouts`), evaluates the critic (a workdir's latest checkpoint, or an exported
Hugging Face critic) on every row, sharded over the mesh and batched like the trainer, computes
GAE with the critic's λ (`ppo.lam`, the `returns` the critic is trained towards) and the policy's
λ (`ppo.policy_lam`, or length-adaptive with `ppo.adaptive_lam_alpha`: the `advantages`), and
writes the input's columns plus `values`, `returns` and `advantages` (optionally whitened over
all valid tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax import update as update_lib
from critic_jax.config import TrainConfig
from critic_jax.masking import masked_whiten
from critic_jax.rollouts import read_rollouts, write_scored

SCORED_COLUMNS = ("values", "returns", "advantages")


def _critic_params(config: TrainConfig, mesh, workdir: str | Path | None):
    """(graphdef, params) of the critic to score with, placed on `mesh`."""
    if workdir is None:
        return train_lib.build_critic(train_lib.resolve_config(config), mesh)
    return train_lib.params_of_workdir(config, mesh, workdir)


def score(
    config: TrainConfig,
    *,
    paths: str | list[str],
    out: str | Path,
    workdir: str | Path | None = None,
    whiten: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Scores Parquet rollouts with a critic and writes them with the new columns.

    Args:
      config: the critic's config (`config_of_workdir` for a workdir; `init_from` set for a
        Hugging Face critic) with the GAE options (`ppo.gamma`, `ppo.lam`, `ppo.policy_lam`,
        `ppo.adaptive_lam_alpha`) and the batch size and mesh to score with.
      paths: Parquet file(s), folder or glob.
      out: the Parquet file to write.
      workdir: score with this workdir's latest checkpoint; None: `config.init_from`.
      whiten: whiten the advantages over all valid tokens (zero mean, unit variance).
      on_progress: called with (rows done, rows) after each batch.

    Returns:
      A summary: rows, tokens, valid tokens, out, and the means of the new columns.

    Raises:
      ValueError: on invalid rollouts (`RolloutError`) or config; CheckpointError.
    """
    if workdir is None and config.init_from is None:
        raise ValueError("score needs a trained critic: a workdir or init_from. Received: none")
    mesh = parallel.make_mesh(config.mesh)
    train_lib.check_attention(train_lib.resolve_config(config), mesh)
    graphdef, params = _critic_params(config, mesh, workdir)
    model = train_lib.resolve_config(config).model
    data = config.data
    arrays = read_rollouts(
        paths,
        vocab_size=model.vocab_size,
        kl_coef=data.kl_coef,
        kl_kind=data.kl_kind,
        kl_clamp=data.kl_clamp,
    )
    rows, width = arrays["tokens"].shape
    dp = parallel.batch_parallel_size(mesh)
    chunk = max(dp, data.batch_size - data.batch_size % dp)
    keys = ("tokens", "attention_mask", "mask", "rewards")
    apply_fn = update_lib.make_apply_fn(graphdef, mesh)
    ppo = config.ppo

    @functools.partial(
        jax.jit,
        out_shardings=parallel.batch_sharding(mesh, 2),
        compiler_options=parallel.compiler_options(mesh),
    )
    def values_of(params, batch):
        return apply_fn(params, batch)["values"]

    @jax.jit
    def targets(batch, values):
        return update_lib.gae_targets(batch, values, ppo)

    values = np.zeros((rows, width), np.float32)
    returns = np.zeros((rows, width), np.float32)
    advantages = np.zeros((rows, width), np.float32)
    with train_lib.mesh_context(mesh):
        for lo in range(0, rows, chunk):
            hi = min(lo + chunk, rows)
            local = {k: np.zeros((chunk, width), arrays[k].dtype) for k in keys}
            for k in keys:  # the last chunk is filled up with empty rows
                local[k][: hi - lo] = arrays[k][lo:hi]
            batch = parallel.make_global_batch(local, mesh)
            v = values_of(params, batch)
            adv, ret = targets(batch, v)
            values[lo:hi] = np.asarray(jax.device_get(v))[: hi - lo]
            returns[lo:hi] = np.asarray(jax.device_get(ret))[: hi - lo]
            advantages[lo:hi] = np.asarray(jax.device_get(adv))[: hi - lo]
            if on_progress is not None:
                on_progress(hi, rows)
    mask = arrays["mask"] != 0
    values = np.where(mask, values, 0.0).astype(np.float32)
    if whiten:
        advantages = np.asarray(masked_whiten(advantages, mask))
    scored = {"values": values, "returns": returns, "advantages": advantages}
    if jax.process_index() == 0:
        write_scored(paths, out, scored)
    valid = int(mask.sum())
    return {
        "rows": rows,
        "tokens": int((arrays["attention_mask"] != 0).sum()),
        "valid_tokens": valid,
        "out": str(out),
        **{f"{k}_mean": float(v[mask].mean()) if valid else 0.0 for k, v in scored.items()},
    }


def score_config(
    base: TrainConfig, *, workdir: str | None, init_from: str | None
) -> tuple[TrainConfig, str]:
    """The config to score with: a workdir's saved config (its model) with `base`'s GAE, data
    and mesh options, or `base` with `init_from`; and a one-line description of the critic."""
    if workdir is not None and init_from is not None:
        raise ValueError(
            "score takes --workdir or --init-from, not both. "
            f"Received: workdir={workdir}, init_from={init_from}"
        )
    if workdir is not None:
        saved, step = train_lib.config_of_workdir(workdir)
        config = dataclasses.replace(
            base,
            model=saved.model,
            optim=saved.optim,
            steps=saved.steps,
            init_from=None,
            seed=saved.seed,
            workdir=str(workdir),
        )
        return config, f"checkpoint step {step} of {workdir}"
    if init_from is None:
        raise ValueError("score needs --workdir RUN or --init-from HF_DIR. Received: neither")
    return dataclasses.replace(base, init_from=init_from), f"Hugging Face critic {init_from}"
