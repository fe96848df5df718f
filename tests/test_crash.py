"""Crash safety: SIGKILL at random moments, restart each time, finish exactly like a clean run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from critic_jax import config as config_lib
from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax.checkpoint import Checkpointer, restore_state

ROOT = Path(__file__).resolve().parents[1]
KILLS = 10

OVERRIDES = {
    "steps": 60,
    "model": {"num_layers": 1, "d_model": 32, "mlp_dim": 64},
    "data": {"batch_size": 32},
    "ppo": {"minibatch_size": 16, "ppo_epochs": 1},
    "checkpoint": {"every": 2, "max_to_keep": 2},
    "log": {"every": 1, "eval_rows": 64, "tensorboard": False},
}


def _start(config_file: Path, workdir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "critic_jax",
            "train",
            "--config",
            str(config_file),
            "--workdir",
            str(workdir),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _last_iteration(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["iteration"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def _final(workdir: Path):
    cfg = config_lib.from_dict(
        config_lib.TrainConfig,
        {**OVERRIDES, "workdir": str(workdir), "mesh": {"data": 1, "num_devices": 1}},
    )
    _, like = train_lib.abstract_state(cfg, parallel.make_mesh(cfg.mesh))
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    step, state, data_state = restore_state(ckpt, like)
    ckpt.close()
    return step, jax.device_get(state), data_state


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_a_clean_run(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(OVERRIDES))
    # A shared compilation cache keeps each restart cheap; results do not depend on it.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    clean = _start(config_file, tmp_path / "clean", env)
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-3000:]

    # Kill at ten random moments spread over the run: once a random iteration has been logged,
    # after a random delay (updates are a few ms and a checkpoint is saved every 2 iterations,
    # so some kills land inside an asynchronous save).
    rng = np.random.default_rng(0)
    workdir = tmp_path / "killed"
    metrics = workdir / "metrics.jsonl"
    targets = [4 + 5 * k + int(rng.integers(0, 3)) for k in range(KILLS)]
    resumed = 0
    for target in targets:
        started = time.time()
        proc = _start(config_file, workdir, env)
        deadline = time.monotonic() + 300
        # Wait for this process's own lines: a resumed run rewrites metrics.jsonl after it has
        # restored its checkpoint (and said so); the earlier run's lines do not count.
        while (
            _last_iteration(metrics) < target or _modified(metrics) <= started
        ) and proc.poll() is None:
            assert time.monotonic() < deadline, "training made no progress"
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        resumed += "resumed from checkpoint" in err
    proc = _start(config_file, workdir, env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert resumed + ("resumed from checkpoint" in err) >= KILLS - 1

    step_a, state_a, data_a = _final(tmp_path / "clean")
    step_b, state_b, data_b = _final(workdir)
    assert step_a == step_b == OVERRIDES["steps"] and data_a == data_b
    chex.assert_trees_all_equal(state_a, state_b)
    summary_a = json.loads((tmp_path / "clean" / "summary.json").read_text())
    summary_b = json.loads((workdir / "summary.json").read_text())
    for key in ("final_loss", "relative_value_error", "explained_variance_vs_true"):
        assert summary_a[key] == summary_b[key]
    rows = [
        json.loads(x)["iteration"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == list(range(1, OVERRIDES["steps"] + 1))
