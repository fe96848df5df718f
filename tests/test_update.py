"""The jitted critic update: gradient exactness under accumulation and sharding, skipping, and
the evaluation against true values."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import critic_jax
from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax import update as update_lib
from critic_jax.config import REDUCTIONS, PPOConfig, TrainConfig
from critic_jax.data import DataConfig
from critic_jax.models import ModelConfig

VOCAB = 32
ROWS, LENGTH = 16, 12


def _config(**ppo) -> TrainConfig:
    ppo = {"ppo_epochs": 1, "minibatch_size": ROWS, **ppo}
    return TrainConfig(
        steps=4,
        model=dataclasses.replace(
            ModelConfig.tiny(vocab_size=VOCAB), d_model=32, mlp_dim=64, num_layers=1
        ),
        ppo=PPOConfig(**ppo),
        data=dataclasses.replace(DataConfig(), batch_size=ROWS),
    )


def _batch(seed: int = 0, rows: int = ROWS) -> dict[str, np.ndarray]:
    """Left-padded prompts, right-padded responses, a masked observation hole, an empty row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(rows, LENGTH)).astype(np.int32)
    attention_mask = np.ones((rows, LENGTH), np.int32)
    mask = np.zeros((rows, LENGTH), np.float32)
    for r in range(rows):
        pad_left = rng.integers(0, 3)
        prompt_end = pad_left + rng.integers(1, 4)
        end = rng.integers(prompt_end, LENGTH + 1)
        attention_mask[r, :pad_left] = 0
        attention_mask[r, end:] = 0
        tokens[r, attention_mask[r] == 0] = 0
        mask[r, prompt_end:end] = 1
        if end - prompt_end > 4:
            mask[r, prompt_end + 2] = 0  # an observation token inside the response
    mask[3] = 0  # a row with no action at all
    rewards = np.where(mask > 0, rng.normal(size=(rows, LENGTH)), np.nan).astype(np.float32)
    return {"tokens": tokens, "attention_mask": attention_mask, "mask": mask, "rewards": rewards}


def _trainer(config: TrainConfig, mesh):
    """The trainer's own set-up: (graphdef, trainer, fresh state) for `config` on `mesh`."""
    config = train_lib.resolve_config(config)
    graphdef, params = train_lib.build_critic(config, mesh)
    state = train_lib.init_state(config, mesh, params)
    return graphdef, train_lib.make_trainer(config, mesh, graphdef, state), state


def _run(config: TrainConfig, mesh, batches):
    graphdef, setup, state = _trainer(config, mesh)
    history = []
    for b in batches:
        state, metrics = setup.update(state, parallel.make_global_batch(b, mesh))
        history.append(jax.device_get(metrics))
    return state, history, setup


def _one_device_mesh():
    return parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_micro_batches_give_the_minibatch_gradient(reduction):
    mesh = _one_device_mesh()
    batch = _batch(1)
    cfg = _config(reduction=reduction, micro_batches=4)
    graphdef, _, state = _trainer(cfg, mesh)
    # The reference: one value_loss over the whole minibatch, differentiated directly.
    params = state.params

    def full_loss(p):
        old = nnx.merge(graphdef, params)(batch["tokens"], batch["attention_mask"])
        _, returns = critic_jax.compute_gae(
            batch["rewards"], old, batch["mask"], gamma=cfg.ppo.gamma, lam=cfg.ppo.lam
        )
        v = nnx.merge(graphdef, p)(batch["tokens"], batch["attention_mask"])
        return critic_jax.value_loss(
            v, old, returns, batch["mask"], clip_eps=cfg.ppo.clip_eps, reduction=reduction
        )

    want_loss, want_grads = jax.value_and_grad(full_loss)(params)
    want_norm = optax.tree.norm(want_grads)
    _, history, _ = _run(cfg, mesh, [batch])
    np.testing.assert_allclose(history[0]["loss"], want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(history[0]["grad_norm"], want_norm, rtol=1e-5, atol=1e-7)


def test_accumulation_gives_the_same_parameters():
    mesh = _one_device_mesh()
    batches = [_batch(i) for i in range(3)]
    s1, h1, _ = _run(_config(micro_batches=1), mesh, batches)
    s4, h4, _ = _run(_config(micro_batches=4), mesh, batches)
    chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([h["loss"] for h in h1], [h["loss"] for h in h4], rtol=1e-5)


@pytest.fixture(scope="module")
def one_device_history():
    batches = [_batch(i) for i in range(3)]
    cfg = _config(ppo_epochs=2, minibatch_size=8, micro_batches=1)
    return _run(cfg, _one_device_mesh(), batches)[1]


@pytest.mark.parametrize(
    "shape", [dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)], ids=str
)
def test_sharded_update_matches_one_device(shape, one_device_history):
    batches = [_batch(i) for i in range(3)]
    cfg = _config(ppo_epochs=2, minibatch_size=8, micro_batches=1)
    ref = one_device_history
    mesh = parallel.make_mesh(parallel.MeshConfig(**shape))
    cfg = dataclasses.replace(cfg, mesh=parallel.MeshConfig(**shape))
    cfg.check_mesh(mesh.size)
    state, got, _ = _run(cfg, mesh, batches)
    for key in ("loss", "grad_norm", "explained_variance"):
        np.testing.assert_allclose(
            [h[key] for h in got], [h[key] for h in ref], rtol=1e-5, atol=1e-6
        )
    # The parameters really are split by the rule table.
    fsdp, tensor = shape.get("fsdp", 1), shape.get("tensor", 1)
    split = 1
    for leaf in jax.tree.leaves(state.params):
        full, local = leaf.size, leaf.addressable_shards[0].data.size
        split = max(split, full // local)
    assert split == fsdp * tensor
    # The Adam moments are split exactly like their parameters.
    mu = optax.tree.get(state.opt_state, "mu")
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu), strict=True):
        assert m.sharding.spec == p.sharding.spec
        assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape


def test_fsdp_update_moves_parameters_not_activations():
    """Under fsdp the embedding is looked up on its own shards (`models.embedding.lookup`): the
    compiled update's only float all-to-alls are the lookup's, one for each of its three passes
    (old values, forward, backward), none in the layers (with the table's model axis left split
    under an automatic lookup, XLA splits the hidden states' model axis too and reshuffles them
    in every layer); the table keeps its stored layout."""
    shape = dict(data=2, fsdp=4)
    mesh = parallel.make_mesh(parallel.MeshConfig(**shape))
    rows = ROWS // (shape["data"] * shape["fsdp"])
    # A vocabulary larger than the 8 x 12 tokens of an fsdp group is looked up on its shards; the
    # toy one (32) is gathered whole, which moves fewer bytes: then no float all-to-all at all.
    for vocab, lookups in ((128, 3), (VOCAB, 0)):
        cfg = dataclasses.replace(_config(), mesh=parallel.MeshConfig(**shape))
        model = dataclasses.replace(cfg.model, num_layers=3, vocab_size=vocab)
        _, setup, state = _trainer(dataclasses.replace(cfg, model=model), mesh)
        embed = state.params["backbone"]["embed"]
        assert embed.sharding.spec == PartitionSpec("tensor", "fsdp")
        hlo = setup.update.lower(state, parallel.make_global_batch(_batch(0), mesh)).compile()
        d_slice = cfg.model.d_model // shape["fsdp"]
        pieces = re.findall(r"(f32\[[0-9,]*\])\S* all-to-all\(", hlo.as_text())
        assert pieces == [f"f32[{rows},{LENGTH},{d_slice}]"] * lookups, (vocab, pieces)


def test_nonfinite_batch_skips_the_update_and_training_goes_on():
    mesh = _one_device_mesh()
    bad = _batch(0)
    r, t = np.argwhere(bad["mask"] > 0)[0]
    bad["rewards"][r, t] = np.nan  # NaN at a valid position
    cfg = _config()
    _, setup, state = _trainer(cfg, mesh)
    before = jax.device_get(state.params)
    state, metrics = setup.update(state, parallel.make_global_batch(bad, mesh))
    assert float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    state, metrics = setup.update(state, parallel.make_global_batch(_batch(1), mesh))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert int(jax.device_get(update_lib.skipped_updates(state.opt_state))) == 1
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(jax.device_get(state.params), before)


def test_update_compiles_once_and_learns_a_fixed_batch():
    mesh = _one_device_mesh()
    cfg = _config(ppo_epochs=4, minibatch_size=8)
    batch = _batch(2)
    _, history, setup = _run(cfg, mesh, [batch] * 6)
    assert setup.update._cache_size() == 1
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert all(np.isfinite(h["loss"]) for h in history)


def test_eval_fn_matches_numpy():
    mesh = _one_device_mesh()
    cfg = _config()
    graphdef, setup, state = _trainer(cfg, mesh)
    b = _batch(3)
    rng = np.random.default_rng(0)
    b["rewards"] = np.where(b["mask"] > 0, b["rewards"], 0.0).astype(np.float32)
    b["true_values"] = rng.normal(size=b["mask"].shape).astype(np.float32)
    b["true_advantages"] = rng.normal(size=b["mask"].shape).astype(np.float32)
    got = setup.evaluate(state.params, parallel.make_global_batch(b, mesh))
    v = np.asarray(nnx.merge(graphdef, state.params)(b["tokens"], b["attention_mask"]), np.float64)
    m = b["mask"] > 0
    err, true = (v - b["true_values"])[m], b["true_values"][m].astype(np.float64)
    want = np.sqrt(np.mean(err**2)) / np.std(true)
    np.testing.assert_allclose(got["relative_value_error"], want, rtol=1e-4)
    want_ev = 1 - np.var(err) / np.var(true)
    np.testing.assert_allclose(got["explained_variance_vs_true"], want_ev, rtol=1e-3, atol=1e-4)
    assert jnp.isfinite(got["value_rmse"])


def _pack(batch: dict[str, np.ndarray], rows: int, width: int) -> dict[str, np.ndarray]:
    """The real tokens of each row of `batch`, packed in order into `rows` rows of `width`."""
    out = {k: np.zeros((rows, width), v.dtype) for k, v in batch.items()}
    out["segment_ids"] = np.zeros((rows, width), np.int32)
    r, col, seg = 0, 0, 0
    for i in range(batch["tokens"].shape[0]):
        real = np.flatnonzero(batch["attention_mask"][i])
        if col + real.size > width:
            r, col, seg = r + 1, 0, 0
        seg += 1
        for k, v in batch.items():
            out[k][r, col : col + real.size] = v[i, real]
        out["segment_ids"][r, col : col + real.size] = seg
        col += real.size
    out["attention_mask"] = (out["segment_ids"] != 0).astype(np.int32)
    return out


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("shape", [dict(data=1, num_devices=1), dict(data=2, fsdp=2, tensor=2)])
def test_packed_rows_give_the_unpacked_update(reduction, shape):
    batch = _batch(4)
    batch["rewards"] = np.where(batch["mask"] > 0, batch["rewards"], 0.0).astype(np.float32)
    packed = _pack(batch, ROWS // 2, 2 * LENGTH)
    assert packed["attention_mask"].sum() == batch["attention_mask"].sum()
    mesh = parallel.make_mesh(parallel.MeshConfig(**shape))
    results = []
    for b, packing in ((batch, False), (packed, True)):
        cfg = _config(reduction=reduction, minibatch_size=b["tokens"].shape[0])
        cfg = dataclasses.replace(
            cfg,
            mesh=parallel.MeshConfig(**shape),
            data=dataclasses.replace(cfg.data, batch_size=b["tokens"].shape[0]),
        )
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, path="x", packing=packing)
        )
        _, setup, state = _trainer(cfg, mesh)
        local = {k: b[k] for k in setup.batch_keys}
        state, metrics = setup.update(state, parallel.make_global_batch(local, mesh))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m_pad, p_pad), (m_pack, p_pack) = results
    for key in ("loss", "grad_norm", "explained_variance", "returns_mean", "valid_tokens"):
        np.testing.assert_allclose(m_pack[key], m_pad[key], rtol=1e-5, atol=1e-7, err_msg=key)
    chex.assert_trees_all_close(p_pack, p_pad, rtol=1e-5, atol=1e-6)


def test_cpu_compiler_options_are_scoped_checked_and_exact(monkeypatch):
    """The update's CPU compiler options: taken where this jaxlib knows them (else none), passed
    per jit (a plain jit keeps XLA's defaults), and the update's numbers equal without them."""
    mesh = _one_device_mesh()
    opts = parallel.compiler_options(mesh)
    assert opts in ({}, parallel.CPU_COMPILER_OPTIONS)
    cfg = _config(micro_batches=2, minibatch_size=8)
    batch = _batch(4)
    with_opts, _, _ = _run(cfg, mesh, [batch])
    monkeypatch.setattr(parallel, "compiler_options", lambda mesh: {})
    without, _, _ = _run(cfg, mesh, [batch])
    chex.assert_trees_all_close(
        jax.device_get(with_opts.params), jax.device_get(without.params), rtol=1e-5, atol=1e-6
    )
    # An option this jaxlib refuses turns into no options, not a failed compile.
    monkeypatch.undo()
    monkeypatch.setattr(
        parallel,
        "CPU_COMPILER_OPTIONS",
        {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"},
    )
    parallel._cpu_options_accepted.cache_clear()
    try:
        assert parallel.compiler_options(mesh) == {}
    finally:
        monkeypatch.undo()
        parallel._cpu_options_accepted.cache_clear()
    assert parallel.compiler_options(mesh) == opts


@pytest.mark.parametrize("shape", [dict(data=1), dict(data=1, fsdp=8)], ids=str)
def test_layer_slices_taken_once_give_the_same_gradient(shape):
    """`split_layers` (a written-out stack sliced once for all micro-batches) changes no number: the
    accumulated gradient, loss and values equal those of the stacked parameters, on one device
    and FSDP-split, and `unstack_layers` round-trips."""
    devices = jax.devices()[: int(np.prod(list(shape.values())))]
    mesh = parallel.make_mesh(parallel.MeshConfig(**shape), devices=devices)
    cfg = _config(micro_batches=4)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=3))
    assert cfg.model.unrolled
    graphdef, setup, state = _trainer(cfg, mesh)
    b = _batch(5)
    mb = parallel.make_global_batch(
        {**train_lib.host_batch(b, setup.batch_keys, vocab_size=VOCAB), "old_values": b["mask"]},
        mesh,
    )
    mb["returns"] = mb["old_values"] * 0.5
    apply_fn = update_lib.make_apply_fn(graphdef, mesh)
    loss_fn = train_lib.default_loss_fn(cfg)

    def grads(split_layers):
        fn = functools.partial(
            update_lib.accumulate_gradients,
            apply_fn=apply_fn,
            loss_fn=loss_fn,
            ppo=cfg.ppo,
            mesh=mesh,
            split_layers=split_layers,
        )
        with train_lib.mesh_context(mesh):
            return jax.device_get(jax.jit(fn)(state.params, mb))

    want, got = grads(False), grads(True)
    assert jax.tree.structure(want[0]) == jax.tree.structure(got[0])
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert optax.tree.norm(want[0]) > 0
    pieces, restack = update_lib.unstack_layers(state.params)
    stacked_leaves = [x for x in jax.tree.leaves(state.params) if x.ndim and x.shape[0] == 3]
    assert len(jax.tree.leaves(pieces)) == len(jax.tree.leaves(state.params)) + 2 * len(
        stacked_leaves
    )
    chex.assert_trees_all_equal(jax.device_get(restack(pieces)), jax.device_get(state.params))
