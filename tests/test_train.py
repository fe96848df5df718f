"""The host loop: hooks, abstract set-up, workdir ownership, resume rules, useless runs."""

import dataclasses
import functools
import json
import math
import threading
from pathlib import Path

import chex
import helpers
import jax
import numpy as np
import pytest
from flax import nnx

from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax.checkpoint import CheckpointConfig
from critic_jax.config import LogConfig, PPOConfig, StopConfig
from critic_jax.data import DataConfig
from critic_jax.models import ModelConfig

VOCAB = DataConfig().mrp.vocab_size


_config = functools.partial(helpers.tiny_config, steps=4, layers=1, mlp_dim=64)


def test_hooks_see_every_iteration_and_change_the_start_and_the_batches(tmp_path):
    seen, noise_calls = [], []

    def head_bias_3(params):
        params = jax.tree.map(np.array, jax.device_get(params))  # writeable host copies
        params["head"]["proj"]["bias"][...] = 3.0
        return params

    def transform(batch):
        noise_calls.append(1)
        return batch

    hooks = train_lib.Hooks(
        initial_params=head_bias_3,
        transform_batch=transform,
        on_iteration=lambda i, m, s: seen.append(
            (i, m, float(s.params["head"]["proj"]["bias"][0]))
        ),
        eval_every=2,
        eval_at_start=True,
    )
    summary = train_lib.run(_config(tmp_path), hooks)
    assert [i for i, _, _ in seen] == [0, 1, 2, 3, 4]
    assert seen[0][2] == 3.0  # the initial parameters came from the hook
    assert "relative_value_error" in seen[0][1] and "advantage_error_vs_true" in seen[0][1]
    assert "relative_value_error" in seen[2][1] and "relative_value_error" not in seen[1][1]
    assert len(noise_calls) == 4
    assert summary["steps"] == 4 and math.isfinite(summary["advantage_rank_correlation"])


def test_abstract_state_compiles_without_allocating(tmp_path):
    cfg = _config(tmp_path)
    mesh = parallel.make_mesh(cfg.mesh)
    graphdef, state = train_lib.abstract_state(cfg, mesh)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    trainer = train_lib.make_trainer(cfg, mesh, graphdef, state)
    batch = {
        k: jax.ShapeDtypeStruct(
            (32, 32), np.int32 if k in ("tokens", "attention_mask") else np.float32
        )
        for k in trainer.batch_keys
    }
    compiled = trainer.update.lower(state, batch).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_state_bytes_count_parameters_and_both_moments_per_device(tmp_path):
    from critic_jax import setup

    cfg = _config(tmp_path)
    mesh = parallel.make_mesh(cfg.mesh)
    _, params = train_lib.build_critic(cfg, mesh)
    n = sum(x.size for x in jax.tree.leaves(params))
    (held,) = setup.state_bytes(train_lib.abstract_state(cfg, mesh)[1]).values()
    # float32 parameters, Adam's mu and nu; the counters, step, iteration and key are scalars.
    assert 12 * n <= held <= 12 * n + 256
    # Split 4 ways (fsdp): each device holds about a quarter; the small leaves stay whole.
    split = dataclasses.replace(cfg, mesh=parallel.MeshConfig(data=1, fsdp=4, num_devices=4))
    mesh4 = parallel.make_mesh(split.mesh)
    held4 = setup.state_bytes(train_lib.abstract_state(split, mesh4)[1])
    assert len(held4) == 4 and all(3 * n <= b < 4 * n for b in held4.values()), (n, held4)


def test_a_state_larger_than_the_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    from critic_jax import setup

    built = []
    monkeypatch.setattr(setup, "_host_memory", lambda: 10_000)  # 10 kB of RAM
    monkeypatch.setattr(train_lib, "build_critic", lambda *a: built.append(1))
    with pytest.raises(
        ValueError, match=r"alone need .* GiB .*which has 0\.00 GiB.*critic-jax plan"
    ):
        train_lib.run(_config(tmp_path))
    assert not built  # refused from the shapes alone
    mesh = parallel.make_mesh(_config(tmp_path).mesh)
    monkeypatch.setattr(setup, "_host_memory", lambda: None)  # unknown: nothing refused
    setup.check_state_fits(_config(tmp_path), mesh)
    monkeypatch.setattr(setup, "_host_memory", lambda: 2**40)
    setup.check_state_fits(_config(tmp_path), mesh)


class _FakeAccelerator:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


@pytest.mark.parametrize(
    "stats, limit",
    [
        ({"bytes_limit": 80 * 2**30, "bytes_in_use": 5}, 80 * 2**30),
        ({"bytes_in_use": 5}, None),  # no limit reported
        ({"bytes_limit": 0}, None),
        (None, None),  # a backend without statistics
        (RuntimeError("unimplemented"), None),
    ],
)
def test_an_accelerators_memory_is_what_its_runtime_reports(stats, limit):
    from critic_jax import setup

    assert setup._memory_limit(_FakeAccelerator(stats)) == limit


@pytest.mark.parametrize("attention", ["cudnn", "splash"])
def test_an_attention_kernel_of_another_device_is_refused_up_front(tmp_path, attention):
    cfg = _config(tmp_path)
    model = dataclasses.replace(cfg.model, attention=attention, dtype="bfloat16")
    with pytest.raises(ValueError, match=f"model.attention='{attention}'.*cpu devices"):
        train_lib.run(dataclasses.replace(cfg, model=model))
    assert not (tmp_path / "checkpoints").exists()


def test_float16_parameters_are_refused_for_training(tmp_path):
    # AdamW's moments would be float16 too: every update non-finite, skipped (found by a probe:
    # 5 of 6 updates skipped, then a TrainingError). bfloat16 and float16 compute still train.
    cfg = _config(tmp_path)
    model = dataclasses.replace(cfg.model, param_dtype="float16")
    with pytest.raises(ValueError, match="param_dtype='float16' cannot be trained"):
        train_lib.run(dataclasses.replace(cfg, model=model))
    assert not (tmp_path / "checkpoints").exists()


def test_init_from_a_hugging_face_checkpoint(tmp_path):
    from critic_jax.models import Critic, critic_to_hf

    cfg = _config(tmp_path)
    critic = Critic(dataclasses.replace(cfg.model, value_head_init="normal"), rngs=nnx.Rngs(7))
    critic_to_hf(critic, tmp_path / "rm")
    want = jax.device_get(nnx.state(critic, nnx.Param))
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = dataclasses.replace(
        cfg, init_from=str(tmp_path / "rm"), model=ModelConfig.tiny(vocab_size=VOCAB)
    )
    cfg = train_lib.resolve_config(cfg)  # the checkpoint's width wins over `model`
    _, params = train_lib.build_critic(cfg, mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max(x.size // x.addressable_shards[0].data.size for x in jax.tree.leaves(params)) == 4
    with pytest.raises(ValueError, match="Cannot read"):
        train_lib.resolve_config(dataclasses.replace(cfg, init_from=str(tmp_path / "none")))


def test_a_workdir_belongs_to_one_live_run(tmp_path):
    lock = train_lib.WorkdirLock(tmp_path)
    with lock, pytest.raises(train_lib.TrainingError, match="in use"):
        train_lib.run(_config(tmp_path))
    # Released when its holder ends, whatever the pid file says: a stale file never blocks.
    (tmp_path / ".lock").write_text("999999")
    with train_lib.WorkdirLock(tmp_path):
        pass

    started = threading.Event()
    errors = []

    def hold():
        with train_lib.WorkdirLock(tmp_path / "other"):
            started.set()
            done.wait(30)

    done = threading.Event()
    t = threading.Thread(target=hold)
    t.start()
    started.wait(30)
    try:
        with train_lib.WorkdirLock(tmp_path / "other"):
            pass
    except train_lib.TrainingError as e:
        errors.append(str(e))
    done.set()
    t.join()
    assert errors and "in use" in errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    summary = train_lib.run(_config(workdir))
    return workdir, summary


def test_summary_is_strict_json_and_a_rerun_keeps_it(finished_run):
    workdir, summary = finished_run
    text = (workdir / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    again = train_lib.run(_config(workdir))
    assert again == json.loads(text)
    assert (workdir / "summary.json").read_text() == text


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(seed=5), "seed"),
        (dict(ppo=PPOConfig(ppo_epochs=1, minibatch_size=16, lam=0.5)), "ppo.lam"),
        (dict(model=ModelConfig.tiny(vocab_size=VOCAB)), "model.d_model"),
    ],
    ids=["seed", "lam", "shape"],
)
def test_resume_with_a_changed_setting_is_refused_by_name(finished_run, change, key):
    workdir, _ = finished_run
    cfg = _config(workdir, steps=6, **change)
    with pytest.raises((train_lib.TrainingError, ValueError), match=key.split(".")[-1]):
        train_lib.run(cfg)


def test_resume_may_extend_steps_and_change_logging(finished_run, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(finished_run[0], workdir)
    cfg = _config(workdir, steps=6, log=LogConfig(every=2, eval_rows=64, tensorboard=False))
    assert train_lib.run(cfg)["steps"] == 6


def test_restore_from_an_older_step_moves_the_later_ones_aside(finished_run, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(finished_run[0], workdir)
    events = []
    cfg = _config(workdir, checkpoint=CheckpointConfig(every=2, max_to_keep=5, restore_step=2))
    train_lib.run(cfg, train_lib.Hooks(on_event=events.append))
    assert any("moved" in e for e in events)
    assert (workdir / "checkpoints-superseded" / "4").is_dir()
    with pytest.raises(Exception, match="no checkpoint step 3"):
        train_lib.run(
            _config(workdir, checkpoint=CheckpointConfig(every=2, max_to_keep=5, restore_step=3))
        )


def test_a_run_whose_updates_are_all_skipped_fails(tmp_path):
    def poison(batch):
        batch["rewards"] = np.where(batch["mask"] > 0, np.nan, batch["rewards"])
        return batch

    with pytest.raises(train_lib.TrainingError, match="non-finite"):
        train_lib.run(_config(tmp_path), train_lib.Hooks(transform_batch=poison))


def test_token_ids_are_checked_against_the_model(tmp_path):
    small = dataclasses.replace(_config(tmp_path).model, vocab_size=VOCAB)
    cfg = _config(tmp_path, model=small)

    def out_of_range(batch):
        batch["tokens"] = batch["tokens"].copy()
        batch["tokens"][0, -1] = VOCAB + 7
        return batch

    with pytest.raises(ValueError, match=str(VOCAB + 7)):
        train_lib.run(cfg, train_lib.Hooks(transform_batch=out_of_range))


def test_stops_when_explained_variance_settles(tmp_path):
    cfg = _config(tmp_path, steps=50, stop=StopConfig(explained_variance=-1e9, patience=3))
    summary = train_lib.run(cfg)
    assert summary["steps"] == 3 and "explained variance" in summary["stopped_early"]


def test_damaged_metrics_lines_are_dropped_with_a_warning(tmp_path):
    path = Path(tmp_path) / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 1.0}\n{"iteration": 2, "lo\n')
    events = []
    writer = train_lib.MetricsWriter(
        Path(tmp_path), tensorboard=False, resume_iteration=5, on_event=events.append
    )
    writer.write(3, {"loss": float("nan")})
    writer.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows == [{"iteration": 1, "loss": 1.0}, {"iteration": 3, "loss": None}]
    assert len(events) == 1 and "damaged" in events[0]


def test_init_from_a_workdir_continues_its_critic(finished_run, tmp_path):
    """Value pretraining, then training: the second run starts from the first's checkpoint."""
    from critic_jax.checkpoint import Checkpointer, restore_state

    source, _ = finished_run
    cfg = _config(tmp_path / "next", init_from=str(source))
    mesh = parallel.make_mesh(cfg.mesh)
    graphdef, params = train_lib.build_critic(train_lib.resolve_config(cfg), mesh)
    _, like = train_lib.abstract_state(_config(source), mesh)
    ckpt = Checkpointer(Path(source) / "checkpoints", cfg.checkpoint)
    _, saved, _ = restore_state(ckpt, like)
    ckpt.close()
    chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(saved.params))
    assert train_lib.run(cfg)["steps"] == 4
