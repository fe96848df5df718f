"""`critic-jax score`: values, returns and advantages of Parquet rollouts from a trained critic."""

import dataclasses
from pathlib import Path

import helpers
import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

import critic_jax
from critic_jax import mrp, rollouts, score
from critic_jax import train as train_lib
from critic_jax.checkpoint import CheckpointConfig
from critic_jax.config import LogConfig, PPOConfig, TrainConfig
from critic_jax.data import DataConfig
from critic_jax.models import Critic, ModelConfig, critic_to_hf

ROOT = Path(__file__).resolve().parents[1]
VOCAB = mrp.MRPConfig().vocab_size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    batch = mrp.sample_mrp(mrp.MRPConfig(), seed=3, batch_size=40)
    rows = {k: v for k, v in batch.items() if k != "sequence_reward"}
    rows = {k: v for k, v in rows.items() if k in rollouts.FLOAT_COLUMNS + rollouts.TOKEN_COLUMNS}
    rollouts.write_rollouts(root / "r.parquet", rows, strip_padding=True)
    cfg = TrainConfig(
        steps=2,
        workdir=str(root / "run"),
        model=ModelConfig.tiny(vocab_size=VOCAB, d_model=32, num_layers=1, mlp_dim=64),
        ppo=PPOConfig(ppo_epochs=1, minibatch_size=16, lam=1.0, policy_lam=0.9),
        data=dataclasses.replace(DataConfig(), batch_size=32),
        checkpoint=CheckpointConfig(every=0),
        log=LogConfig(tensorboard=False),
    )
    train_lib.run(cfg)
    return root, cfg


def _check_columns(path, cfg, values_fn, *, lam, policy_lam):
    table = pq.read_table(path)
    arrays = rollouts.read_rollouts(path)
    n = table.num_rows
    lengths = [len(x) for x in table.column("tokens").to_pylist()]
    for name in score.SCORED_COLUMNS:
        assert [len(x) for x in table.column(name).to_pylist()] == lengths
    got = {k: rollouts.read_rollouts(path)[k] for k in ("tokens",)}  # same row order
    np.testing.assert_array_equal(got["tokens"], arrays["tokens"])
    pad = lambda name: np.array(  # noqa: E731
        [np.pad(x, (0, arrays["tokens"].shape[1] - len(x))) for x in table.column(name).to_pylist()]
    )
    mask = arrays["mask"] != 0
    values = values_fn(arrays)
    np.testing.assert_allclose(pad("values")[mask], values[mask], rtol=1e-5, atol=1e-5)
    _, want_ret = critic_jax.compute_gae(arrays["rewards"], values, mask, gamma=1.0, lam=lam)
    want_adv, _ = critic_jax.compute_gae(arrays["rewards"], values, mask, gamma=1.0, lam=policy_lam)
    np.testing.assert_allclose(pad("returns"), want_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pad("advantages"), want_adv, rtol=1e-5, atol=1e-5)
    assert n == 40


def test_score_a_workdir(trained, tmp_path):
    root, cfg = trained
    base = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=str(root / "r.parquet"))
    )
    config, what = score.score_config(base, workdir=cfg.workdir, init_from=None)
    assert "step 2" in what
    done = []
    out = score.score(
        config,
        paths=str(root / "r.parquet"),
        out=tmp_path / "s.parquet",
        workdir=cfg.workdir,
        on_progress=lambda d, n: done.append((d, n)),
    )
    assert out["rows"] == 40 and done[-1] == (40, 40)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    graphdef, params = score._critic_params(config, mesh, cfg.workdir)
    critic = nnx.merge(graphdef, jax.device_get(params))
    values_fn = lambda a: np.asarray(critic(a["tokens"], a["attention_mask"]))  # noqa: E731
    _check_columns(tmp_path / "s.parquet", cfg, values_fn, lam=1.0, policy_lam=0.9)


def test_score_a_hugging_face_critic_with_whitening(trained, tmp_path):
    root, cfg = trained
    critic = Critic(dataclasses.replace(cfg.model, value_head_init="normal"), rngs=nnx.Rngs(1))
    critic_to_hf(critic, tmp_path / "hf")
    base = dataclasses.replace(cfg, init_from=str(tmp_path / "hf"))
    config, what = score.score_config(base, workdir=None, init_from=base.init_from)
    out = tmp_path / "w.parquet"
    score.score(config, paths=str(root / "r.parquet"), out=out, whiten=True)
    table = pq.read_table(out)
    mask = np.concatenate([np.asarray(x) for x in table.column("mask").to_pylist()]) != 0
    adv = np.concatenate([np.asarray(x) for x in table.column("advantages").to_pylist()])[mask]
    assert abs(adv.mean()) < 1e-4 and abs(adv.std(ddof=1) - 1.0) < 1e-3


def test_score_command_line_and_its_errors(trained, tmp_path):
    root, cfg = trained

    def run(*args):
        return helpers.run_cli("score", *args)

    data = ["--data.path", str(root / "r.parquet")]
    proc = run("--workdir", cfg.workdir, *data, "--out", str(tmp_path / "c.parquet"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(tmp_path / "c.parquet").num_rows == 40
    for args, words in (
        ((*data, "--out", str(tmp_path / "x.parquet")), "workdir"),
        (("--workdir", cfg.workdir, "--out", str(tmp_path / "x.parquet")), "data.path"),
        (("--workdir", cfg.workdir, *data), "--out"),
        (("--workdir", str(tmp_path / "none"), *data, "--out", "x.parquet"), "checkpoints"),
    ):
        proc = run(*args)
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("critic-jax: error:")]
        assert proc.returncode == 2 and len(err) == 1 and words in err[0], proc.stderr[-2000:]
