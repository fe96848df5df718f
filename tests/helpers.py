"""Shared set-up of the tests: a tiny training config and the command line in a subprocess."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax.extend
import numpy as np

from critic_jax import parallel
from critic_jax.checkpoint import CheckpointConfig
from critic_jax.config import LogConfig, PPOConfig, TrainConfig
from critic_jax.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
VOCAB = DataConfig().mrp.vocab_size


def tiny_config(
    workdir, *, steps: int = 6, layers: int = 2, mlp_dim: int = 128, **overrides
) -> TrainConfig:
    """A run that trains in seconds: one device, width 32, batch 32 in minibatches of 16,
    a checkpoint every 2 iterations, metrics every iteration, no TensorBoard."""
    # The command line's default model (HL-Gauss bins included), narrower: runs of this config
    # and `critic-jax train` flags resume each other.
    model = dataclasses.replace(TrainConfig().model, d_model=32, num_layers=layers, mlp_dim=mlp_dim)
    base = TrainConfig(
        steps=steps,
        workdir=str(workdir),
        model=model,
        ppo=PPOConfig(ppo_epochs=1, minibatch_size=16),
        data=dataclasses.replace(DataConfig(), batch_size=32),
        mesh=parallel.MeshConfig(data=1, num_devices=1),
        checkpoint=CheckpointConfig(every=2, max_to_keep=5),
        log=LogConfig(every=1, eval_rows=64, tensorboard=False),
    )
    return dataclasses.replace(base, **overrides)


def random_rollouts(seed: int, rows: int, width: int, *, vocab: int = VOCAB) -> dict:
    """A `write_rollouts` batch of `rows` rollouts of mixed lengths, [rows, width] arrays.

    Row i: 0-2 tokens of left padding (a left-padded prompt), then 1 to `width` - padding real
    tokens (row 0 fills the width), then right padding. Actions are a random subset of the real
    tokens, the last one always; `rewards` and `old_values` are random everywhere, so off the
    mask they hold values that `read_rollouts` must zero.
    """
    rng = np.random.default_rng(seed)
    left = rng.integers(0, 3, rows)
    left[0] = 0
    length = rng.integers(1, width - left + 1)
    length[0] = width
    col = np.arange(width)
    attention = (col >= left[:, None]) & (col < (left + length)[:, None])
    mask = attention & (rng.random((rows, width)) < 0.6)
    mask[np.arange(rows), left + length - 1] = True
    return {
        "tokens": np.where(attention, rng.integers(1, vocab, (rows, width)), 0).astype(np.int32),
        "attention_mask": attention.astype(np.int32),
        "mask": mask.astype(np.float32),
        "rewards": rng.normal(size=(rows, width)).astype(np.float32),
        "old_values": rng.normal(size=(rows, width)).astype(np.float32),
    }


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m critic_jax ARGS` on the CPU, from the repository root."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    return subprocess.run(
        [sys.executable, "-m", "critic_jax", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dot_generals(jaxpr) -> list:
    """Every dot_general equation of a jaxpr, nested scans and checkpoints included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(dot_generals(sub))
    return out
