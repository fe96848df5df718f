"""2 processes x 2 CPU devices over loopback give the same training as 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest

from critic_jax import rollouts

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(workdir, **data) -> str:
    return json.dumps(
        {
            "steps": 4,
            "workdir": str(workdir),
            "model": {"d_model": 32, "mlp_dim": 64},
            "ppo": {"ppo_epochs": 2, "minibatch_size": 8},
            "data": {"batch_size": 16, **data},
            "mesh": {"data": 2, "fsdp": 2},
            "checkpoint": {"every": 2},
            "log": {"every": 1, "eval_rows": 64, "tensorboard": False},
        }
    )


def _losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["explained_variance"]) for r in rows]


def _one_and_two(tmp_path, **data) -> tuple[dict, dict]:
    """Trains `_config(..., **data)` as 1 process x 4 devices (workdir one/) and as 2 processes
    x 2 devices over loopback (two/); asserts both succeed and match iteration for iteration.
    Returns their summary.json files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    single = subprocess.run(
        [sys.executable, str(WORKER), "4", _config(tmp_path / "one", **data)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = []
    for pid in range(2):
        penv = {
            **env,
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), "2", _config(tmp_path / "two", **data)],
                cwd=ROOT,
                env=penv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert {s["devices"] for s in summaries} == {4}
    np.testing.assert_allclose(
        _losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6
    )
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    return one, two


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    one, two = _one_and_two(tmp_path)
    np.testing.assert_allclose(two["relative_value_error"], one["relative_value_error"], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_on_packed_parquet(tmp_path):
    """The same on packed Parquet rollouts: each process packs the same stream and keeps its
    half of the rows, and the attended tokens are counted over both."""
    path = tmp_path / "rollouts.parquet"
    rollouts.write_rollouts(path, helpers.random_rollouts(0, 64, 24), strip_padding=True)
    one, two = _one_and_two(tmp_path, path=str(path))
    for s in (one, two):
        assert s["real_tokens_per_second"] < s["tokens_per_second"]
    # Both runs train on the same rows, so the same fraction of their slots is attended.
    fraction = [s["real_tokens_per_second"] / s["tokens_per_second"] for s in (one, two)]
    np.testing.assert_allclose(fraction[1], fraction[0], rtol=1e-9, atol=0)
