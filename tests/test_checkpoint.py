"""Checkpoints: exact resume, restore onto another mesh, damaged checkpoints, preemption."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import chex
import helpers
import jax
import numpy as np
import pytest

from critic_jax import data as data_lib
from critic_jax import parallel, rollouts
from critic_jax import train as train_lib
from critic_jax.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    abstract_like,
    from_checkpoint_tree,
    restore_state,
    save_state,
    to_checkpoint_tree,
)
from critic_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


_config = helpers.tiny_config


def _fresh_state(config: TrainConfig, mesh):
    _, params = train_lib.build_critic(config, mesh)
    return train_lib.init_state(config, mesh, params)


def _final_state(config: TrainConfig):
    like = _fresh_state(config, parallel.make_mesh(config.mesh))
    ckpt = Checkpointer(Path(config.workdir) / "checkpoints", config.checkpoint)
    step, state, data_state = restore_state(ckpt, like)
    ckpt.close()
    return step, jax.device_get(state), data_state


def _metrics(workdir) -> list[dict]:
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_second")
        r.pop("real_tokens_per_second")
    return rows


def _straight_and_preempted(straight: TrainConfig, resumed: TrainConfig):
    """Trains `straight` for its 6 steps, and `resumed` preempted (SIGTERM) after iteration 3
    and then resumed; asserts both end bit for bit alike. Returns their summaries."""
    summary = train_lib.train(straight)
    assert summary["steps"] == 6

    def preempt_at_3(iteration, metrics):
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    events = []
    first = train_lib.train(resumed, on_step=preempt_at_3, on_event=events.append)
    assert first == {"preempted": True, "steps": 3}
    assert any("preempted" in e for e in events)
    second = train_lib.train(resumed, on_event=events.append)
    assert second["steps"] == 6 and any("resumed" in e for e in events)

    step_a, state_a, data_a = _final_state(straight)
    step_b, state_b, data_b = _final_state(resumed)
    assert step_a == step_b == 6 and data_a == data_b
    chex.assert_trees_all_equal(state_a, state_b)  # exact, not a tolerance
    assert _metrics(straight.workdir) == _metrics(resumed.workdir)
    assert second["final_loss"] == summary["final_loss"]
    return summary, second


def test_preempted_run_resumes_bit_for_bit(tmp_path):
    summary, second = _straight_and_preempted(
        _config(tmp_path / "straight"), _config(tmp_path / "resumed")
    )
    assert second["relative_value_error"] == summary["relative_value_error"]


@pytest.mark.slow  # 20-40 s: three short runs
def test_preempted_packed_parquet_run_resumes_bit_for_bit(tmp_path):
    """The same on packed Parquet rollouts (over three epochs in 6 iterations, so the resume
    lands mid-epoch), and the summary counts attended tokens apart from row slots."""
    path = tmp_path / "rollouts.parquet"
    rollouts.write_rollouts(path, helpers.random_rollouts(0, 96, 24), strip_padding=True)

    def config(name):
        cfg = _config(tmp_path / name)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(path)))

    straight = config("straight")
    assert straight.data.packed and "segment_ids" in train_lib.batch_keys(straight)
    summary, second = _straight_and_preempted(straight, config("resumed"))

    # The batches trained on, read again: their attended tokens over their row slots, for the
    # straight run and for the resumed run's last 3 iterations.
    it = data_lib.make_rollout_iterator(straight.data, seed=straight.seed, gamma=straight.ppo.gamma)
    batches = [next(it) for _ in range(6)]
    assert sum(b["segment_ids"].max(axis=1).sum() for b in batches) > 3 * 96  # > 3 epochs
    for run, first in ((summary, 0), (second, 3)):
        real = sum(np.count_nonzero(b["attention_mask"]) for b in batches[first:])
        slots = sum(b["tokens"].size for b in batches[first:])
        assert 0 < real < slots  # packed rows still carry padding
        assert run["real_tokens_per_second"] < run["tokens_per_second"]
        ratio = run["real_tokens_per_second"] / run["tokens_per_second"]
        np.testing.assert_allclose(ratio, real / slots, rtol=1e-9)


def test_restore_onto_a_different_mesh(tmp_path):
    cfg8 = _config(tmp_path, mesh=parallel.MeshConfig(data=1, fsdp=8))
    mesh8 = parallel.make_mesh(cfg8.mesh)
    state = _fresh_state(cfg8, mesh8)
    assert (
        max(x.size // x.addressable_shards[0].data.size for x in jax.tree.leaves(state.params)) == 8
    )
    ckpt = Checkpointer(tmp_path / "ck", cfg8.checkpoint)
    save_state(ckpt, 1, state, data_state={"i": 1}, config={})
    ckpt.close()
    want = jax.device_get(state)
    for mesh_cfg in (
        parallel.MeshConfig(data=4, fsdp=2),
        parallel.MeshConfig(data=1, num_devices=1),
    ):
        cfg = dataclasses.replace(cfg8, mesh=mesh_cfg)
        mesh = parallel.make_mesh(mesh_cfg)
        like = _fresh_state(dataclasses.replace(cfg, seed=99), mesh)
        ck = Checkpointer(tmp_path / "ck", cfg.checkpoint)
        step, got, data_state = restore_state(ck, like)
        ck.close()
        assert step == 1 and data_state == {"i": 1}
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(like.params), strict=True):
            assert a.sharding == b.sharding
        chex.assert_trees_all_equal(jax.device_get(got), want)


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    cfg = _config(tmp_path)
    mesh = parallel.make_mesh(cfg.mesh)
    state = _fresh_state(cfg, mesh)
    ckpt = Checkpointer(tmp_path / "ck", cfg.checkpoint)
    tree = to_checkpoint_tree(state)
    ckpt.save(1, tree, data_state={"i": 1}, config={})
    ckpt.wait()
    ckpt.save(2, tree, data_state={"i": 2}, config={})
    ckpt.close()
    damaged = 0
    for f in (tmp_path / "ck" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
            damaged += 1
    assert damaged
    warnings_seen = []
    ck = Checkpointer(tmp_path / "ck", cfg.checkpoint, on_warning=warnings_seen.append)
    step, _, data_state = ck.restore(abstract_like(tree))
    assert step == 1 and data_state == {"i": 1}
    assert len(warnings_seen) == 1 and "step 2" in warnings_seen[0]
    assert "\n" not in warnings_seen[0]
    ck.close()


def test_checkpoint_tree_round_trip(tmp_path):
    cfg = _config(tmp_path)
    state = _fresh_state(cfg, parallel.make_mesh(cfg.mesh))
    tree = to_checkpoint_tree(state)
    assert all(isinstance(k, str) for k in tree)
    chex.assert_trees_all_equal(from_checkpoint_tree(tree, state), state)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    workdir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "critic_jax",
        "train",
        "--steps",
        "400",
        "--workdir",
        str(workdir),
        "--checkpoint.every",
        "1000",
        "--log.every",
        "1",
        "--data.batch-size",
        "32",
        "--ppo.minibatch-size",
        "16",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in out and "Traceback" not in err
    steps = [int(s.name) for s in (workdir / "checkpoints").iterdir() if s.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 400
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from checkpoint" in proc.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 400
    rows = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines()]
    assert rows == list(range(1, 401))


def test_checkpoint_config_validation():
    with pytest.raises(ValueError, match="Received"):
        CheckpointConfig(max_to_keep=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(CheckpointConfig().every)
