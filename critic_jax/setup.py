"""A run's set-up: the model's parameters placed on the mesh, the train state, the jitted update.

Everything `critic_jax.train.run` does before its loop, as functions that `plan`, `score`, the
experiments and the benchmarks call on their own: `resolve_config` (the architecture of
`init_from`), `build_critic` (parameters created or loaded straight into their shardings),
`init_state` / `abstract_state` (the `TrainState`, real or as `jax.ShapeDtypeStruct`s),
`make_trainer` (the update and the evaluation jitted once, with shardings and the state
donated), `host_batch` / `held_out` (batches cast, checked and placed), and the checks a run
makes before it allocates anything: `check_state_fits` (the parameters and optimizer state,
`state_bytes`, against the devices' memory) and `check_attention` (the attention kernel against
the devices).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from critic_jax import data as data_lib
from critic_jax import parallel
from critic_jax import update as update_lib
from critic_jax.checkpoint import CheckpointConfig, Checkpointer, CheckpointError, restore_state
from critic_jax.config import TrainConfig, from_dict
from critic_jax.models import Critic, config_from_hf, critic_from_hf
from critic_jax.models.config import EXECUTION_FIELDS
from critic_jax.update import TrainState


def is_workdir(path: str | Path) -> bool:
    """Whether `path` is a training run's workdir (it has `checkpoints/`)."""
    return (Path(path) / "checkpoints").is_dir()


def config_of_workdir(workdir: str | Path) -> tuple[TrainConfig, int]:
    """The config a workdir's latest readable checkpoint was trained with, and that step.

    Raises:
      CheckpointError: when the workdir has no checkpoint with a readable config.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoints in {workdir} (no {directory}).")
    ckpt = Checkpointer(directory, CheckpointConfig(), on_warning=lambda s: None)
    try:
        for step in sorted(ckpt.all_steps(), reverse=True):
            saved = ckpt.saved_config(step)
            if saved is not None:
                return from_dict(TrainConfig, saved), step
    finally:
        ckpt.close()
    raise CheckpointError(f"No checkpoint with a readable config in {directory}.")


def params_of_workdir(config: TrainConfig, mesh: jax.sharding.Mesh, workdir: str | Path):
    """(graphdef, params) of a workdir's latest checkpoint, restored onto `mesh`; `config` must
    carry the workdir's model and optimizer (see `config_of_workdir`)."""
    graphdef, like = abstract_state(config, mesh)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", config.checkpoint)
    try:
        _, state, _ = restore_state(ckpt, like)
    finally:
        ckpt.close()
    return graphdef, state.params


def resolve_config(config: TrainConfig) -> TrainConfig:
    """`config` with the model architecture of `init_from`, read once: a Hugging Face
    checkpoint's config.json, or the config of a training run's workdir (its latest checkpoint;
    the value pretraining of VC-PPO continues this way). The run keeps its own
    `models.config.EXECUTION_FIELDS` (dtypes, remat, layer loop, attention)."""
    if config.init_from is None:
        return config
    execution = {f: getattr(config.model, f) for f in EXECUTION_FIELDS}
    if is_workdir(config.init_from):
        saved, _ = config_of_workdir(config.init_from)
        return dataclasses.replace(config, model=dataclasses.replace(saved.model, **execution))
    path = Path(config.init_from) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Received: init_from={config.init_from}") from e
    return dataclasses.replace(config, model=config_from_hf(hf, **execution))


def _abstract_model(config: TrainConfig, mesh: jax.sharding.Mesh, seed: int, make_module):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        abstract = nnx.eval_shape(lambda: make_module(config.model, rngs=nnx.Rngs(seed)))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"The critic has non-parameter state, unsupported. Received: {rest}")
    return graphdef, abs_params, parallel.state_shardings(abs_params, mesh)


def build_critic(
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    *,
    seed: int | None = None,
    make_module: Callable[..., nnx.Module] = Critic,
):
    """The model's parameters created directly in their sharded layout: random, or loaded from
    `config.init_from` (after `resolve_config`).

    Args:
      config: the run; `config.model` shapes the model.
      mesh: where the parameters are placed.
      seed: initialisation seed (default `config.seed`).
      make_module: `(model_config, *, rngs) -> nnx.Module`, e.g. `ActorCritic` for a shared
        trunk (random initialisation only).

    Returns:
      (graphdef, params) with every parameter placed by `parallel.LOGICAL_AXIS_RULES`.
    """
    seed = config.seed if seed is None else seed
    graphdef, abs_params, shardings = _abstract_model(config, mesh, seed, make_module)
    if config.init_from is None:

        def make_params():
            with nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
                return nnx.state(make_module(config.model, rngs=nnx.Rngs(seed)), nnx.Param)

        with jax.set_mesh(mesh):
            return graphdef, jax.jit(make_params, out_shardings=shardings)()
    if is_workdir(config.init_from):
        saved, _ = config_of_workdir(config.init_from)
        source = dataclasses.replace(config, optim=saved.optim, steps=saved.steps, init_from=None)
        return params_of_workdir(source, mesh, config.init_from)
    # Each device reads only its slice of each tensor: no host holds the whole model.
    critic = critic_from_hf(
        config.init_from,
        **{f: getattr(config.model, f) for f in EXECUTION_FIELDS},
        shardings=lambda abstract: parallel.state_shardings(abstract, mesh),
    )
    return graphdef, nnx.state(critic, nnx.Param)


def place_like(params: Any, like: Any, shardings: Any, *, source: str = "params") -> Any:
    """`params`' arrays in the tree structure of `like` (same paths and shapes), each placed on
    its sharding in `shardings`.

    Raises:
      ValueError: naming the parameter whose shape differs.
    """
    got = jax.tree_util.tree_leaves_with_path(params)
    leaves = []
    for (path, x), want, sharding in zip(
        got, jax.tree.leaves(like), jax.tree.leaves(shardings), strict=True
    ):
        if x.shape != want.shape:
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)} of {source} has shape {x.shape}, the "
                f"model expects {want.shape}. Received: {source}"
            )
        leaves.append(_replicate(np.asarray(x, want.dtype), sharding))
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _replicate(x, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """Places a host value that every process holds identically onto `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _opt_shardings(tx, params, mesh):
    """Adam moments sharded like their parameters (ZeRO under fsdp); counters replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: parallel.replicated(mesh),
    )


def init_state(config: TrainConfig, mesh: jax.sharding.Mesh, params: Any) -> TrainState:
    """A fresh `TrainState` around placed `params`, every leaf committed to its sharding."""
    tx = update_lib.make_optimizer(config.optim, config.steps * config.updates_per_step)
    opt_state = jax.jit(tx.init, out_shardings=_opt_shardings(tx, params, mesh))(params)
    rep = parallel.replicated(mesh)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=_replicate(np.int32(0), rep),
        iteration=_replicate(np.int32(0), rep),
        rng=_replicate(np.asarray(jax.random.PRNGKey(config.seed + 1)), rep),
    )
    # Commit every leaf to its sharding, so the first update sees what later ones see.
    return jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))


def abstract_state(config: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[Any, TrainState]:
    """(graphdef, the `TrainState` as `jax.ShapeDtypeStruct`s with shardings): nothing is
    allocated, so a run of any size can be lowered and compiled ahead of time (`plan`)."""
    graphdef, abs_params, shardings = _abstract_model(config, mesh, config.seed, Critic)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_params, shardings
    )
    tx = update_lib.make_optimizer(config.optim, config.steps * config.updates_per_step)
    opt_shardings = _opt_shardings(tx, params, mesh)
    opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        opt_shardings,
    )
    rep = parallel.replicated(mesh)

    def scalar(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    state = TrainState(
        params=params,
        opt_state=opt,
        step=scalar((), np.int32),
        iteration=scalar((), np.int32),
        rng=scalar((2,), np.uint32),
    )
    return graphdef, state


# Attention implementations that run on one kind of device only.
_ATTENTION_PLATFORMS = {
    "cudnn": ("gpu", "cuDNN flash attention, NVIDIA GPUs"),
    "splash": ("tpu", "Pallas splash attention, TPUs"),
}


def check_attention(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Refuses an attention implementation the mesh's devices cannot run (`cudnn` off a GPU,
    `splash` off a TPU), in one line, before anything is traced.

    Raises:
      ValueError: naming the implementation, the devices and what runs there.
    """
    impl = config.model.attention
    platform = mesh.devices.flat[0].platform
    needs, what = _ATTENTION_PLATFORMS.get(impl, (platform, ""))
    if needs != platform:
        raise ValueError(
            f"model.attention={impl!r} ({what}) cannot run on this run's {platform} devices; "
            f"use auto (the fastest one there), xla or xla-flash. Received: {impl!r} on {platform}"
        )


def check_param_dtype(config: TrainConfig) -> None:
    """Refuses training float16 parameters: AdamW keeps its moments in the parameters' dtype,
    and float16 holds neither the squared gradients nor `optim.eps`: the first update (of a
    finite gradient, so the non-finite guard lets it through) writes NaN and inf into the
    parameters, and every later one is skipped. (float16 parameters still serve `score` and
    evaluation.)

    Raises:
      ValueError: one line with what to use instead.
    """
    if config.model.param_dtype == "float16":
        raise ValueError(
            "model.param_dtype='float16' cannot be trained: AdamW's moments are kept in the "
            f"parameters' dtype and float16 holds neither squared gradients nor optim.eps="
            f"{config.optim.eps:g}, so the first update writes NaN and inf into the parameters "
            "and every later one is skipped. Keep float32 "
            "master parameters (with --model.dtype float16 or bfloat16 compute) or use "
            "bfloat16. Received: model.param_dtype='float16'"
        )


def state_bytes(state: Any) -> dict[jax.Device, int]:
    """Bytes of `state` (arrays or sharded `jax.ShapeDtypeStruct`s) that each device holds."""
    held: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        for device in leaf.sharding.device_set:
            held[device] += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return dict(held)


def _memory_limit(device: jax.Device) -> int | None:
    """An accelerator's memory in bytes as its runtime reports it, or None where it does not."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_state_fits(config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Refuses a run whose parameters and optimizer state alone exceed a device's memory, before
    anything is allocated (`abstract_state`: shapes and shardings only).

    The state is a lower bound of what a run needs (gradients, activations and the compiler's
    temporaries come on top: `critic-jax plan` sizes those), so a run this refuses could never
    start, and one it lets through may still not fit. Accelerators are compared with the
    memory their runtime reports; CPU devices share this host's RAM, so their sum is compared
    with it.

    Raises:
      ValueError: one line with the bytes needed, the memory there is and what to change.
    """
    _, state = abstract_state(config, mesh)
    held = state_bytes(state)
    local = [d for d in held if d.process_index == jax.process_index()]
    if not local:
        return
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    plan = "size the run first with `critic-jax plan` (the same flags)"
    if local[0].platform == "cpu":
        need, limit = sum(held[d] for d in local), _host_memory()
        where = f"this host's {len(local)} CPU device(s) together"
        fix = f"run it on accelerators (fake CPU devices share one host's memory), or {plan}"
    else:
        fix = f"split the state over more devices (--mesh.fsdp), or {plan}"
        device = max(local, key=held.__getitem__)
        need, limit = held[device], _memory_limit(device)
        where = f"device {device.id} ({device.device_kind})"
    if limit is not None and need > limit:
        gib = 2**30
        raise ValueError(
            f"The parameters and optimizer state of this run ({params / 1e9:.2f} B parameters, "
            f"{config.model.param_dtype} with the optimizer's moments) alone need "
            f"{need / gib:.2f} GiB on {where}, which has {limit / gib:.2f} GiB: {fix}. "
            f"Received: mesh {dict(mesh.shape)}, model.param_dtype={config.model.param_dtype}"
        )


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
    """The mesh and the logical-axis rules in scope while the update is traced, so that kernels
    which cannot be partitioned automatically (Pallas splash attention) run in a `shard_map`."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        yield


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A run's static parts: the mesh, the model's graph, the jitted update and evaluation."""

    config: TrainConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    batch_keys: tuple[str, ...]
    update: Any  # jitted (state, batch) -> (state, metrics), state donated
    evaluate: Any  # jitted (params, eval batch) -> metrics


def batch_keys(config: TrainConfig) -> tuple[str, ...]:
    """The arrays of a rollout batch that the update reads, for this config."""
    keys = update_lib.BATCH_KEYS
    if config.ppo.use_rollout_old_values:
        keys += ("old_values",)
    if config.data.packed:
        keys += ("segment_ids",)
    return keys


def default_loss_fn(config: TrainConfig) -> update_lib.LossFn:
    """The critic's loss for `config`: the clipped value loss, or HL-Gauss cross-entropy."""
    m = config.model
    if getattr(m, "value_head", "scalar") != "hl-gauss":
        return functools.partial(update_lib.critic_loss, ppo=config.ppo)
    support = np.linspace(m.value_min, m.value_max, m.value_bins, dtype=np.float32)
    sigma = m.value_sigma_ratio * float(support[1] - support[0])
    return functools.partial(update_lib.critic_loss, ppo=config.ppo, support=support, sigma=sigma)


def make_trainer(
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    graphdef: Any,
    state: TrainState,
    *,
    loss_fn: update_lib.LossFn | None = None,
) -> Trainer:
    """Jits the update once (explicit in/out shardings, the state donated) and the evaluation.

    `state` may be real or abstract (`abstract_state`): only its shardings are read.
    """
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    keys = batch_keys(config)
    batch_sh = {k: parallel.batch_sharding(mesh, 2) for k in keys}
    rep = parallel.replicated(mesh)
    apply_fn = update_lib.make_apply_fn(graphdef, mesh)
    tx = update_lib.make_optimizer(config.optim, config.steps * config.updates_per_step)
    update = jax.jit(
        update_lib.make_update(
            apply_fn,
            tx,
            config.ppo,
            mesh=mesh,
            loss_fn=loss_fn or default_loss_fn(config),
            split_layers=config.model.unrolled,
        ),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
        compiler_options=parallel.compiler_options(mesh),
    )
    evaluate = jax.jit(
        functools.partial(update_lib.evaluate, apply_fn=apply_fn, ppo=config.ppo),
        in_shardings=(
            state_sh.params,
            {k: parallel.batch_sharding(mesh, 2) for k in update_lib.EVAL_KEYS},
        ),
        out_shardings=rep,
        compiler_options=parallel.compiler_options(mesh),
    )
    return Trainer(config, mesh, graphdef, keys, update, evaluate)


_INT_KEYS = ("tokens", "attention_mask", "segment_ids")


def host_batch(
    batch: dict[str, np.ndarray], keys: tuple[str, ...], *, vocab_size: int
) -> dict[str, np.ndarray]:
    """The arrays `keys` of a host batch, cast to the update's dtypes and checked.

    Raises:
      ValueError: when a key is missing or a token id is outside [0, vocab_size).
    """
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"Rollout batch lacks {missing}. Received keys: {sorted(batch)}")
    out = {}
    for k in keys:
        x = np.asarray(batch[k])
        out[k] = x.astype(np.int32) if k in _INT_KEYS else x.astype(np.float32)
    tokens = np.asarray(batch["tokens"])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)].flat[0]
        raise ValueError(
            f"A rollout batch holds token id {bad}, outside the model's vocabulary "
            f"[0, {vocab_size}). Received: token id {bad}"
        )
    return out


def held_out(config: TrainConfig, mesh: jax.sharding.Mesh, rows: int | None = None):
    """This process's slice of the held-out batch with true values, placed on the mesh
    (synthetic data only; None for Parquet rollouts, whose true values are unknown)."""
    if config.data.path is not None:
        return None
    dp = parallel.batch_parallel_size(mesh)
    rows = rows or config.log.eval_rows
    rows = max(dp, rows - rows % dp)
    full = data_lib.held_out_batch(config.data, seed=config.seed, gamma=config.ppo.gamma, n=rows)
    per = rows // jax.process_count()
    lo = jax.process_index() * per
    local = {k: np.asarray(full[k][lo : lo + per]) for k in update_lib.EVAL_KEYS}
    local = host_batch(local, update_lib.EVAL_KEYS, vocab_size=config.model.vocab_size)
    return parallel.make_global_batch(local, mesh)
