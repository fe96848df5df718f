"""The host loop: build the state on the mesh, jit the update once, feed batches, log, checkpoint.

`run(config, hooks)` is the one training loop of the project; `critic-jax train`, the experiments
and the benchmarks all drive it (or `make_trainer`, its set-up, alone). The loop only moves data
and decides when to log, evaluate, checkpoint and stop; the update itself is `critic_jax.update`.

Hooks let a caller change what the loop does without copying it: the model (`build_model`, e.g.
a shared actor-critic trunk) and its loss (`loss_fn`), the initial parameters, a transform of each
host batch (reward noise), the evaluation cadence, and a callback after every iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import signal
import time
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
from critic_jax.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    restore_state,
    save_state,
)
from critic_jax.config import TrainConfig, from_dict, to_dict
from critic_jax.models import Critic, config_from_hf, critic_from_hf
from critic_jax.update import TrainState

# Settings a resumed run may change; any other difference from the checkpoint's config is refused
# (the state or the data it was trained on would no longer match what the run says it is).
RESUMABLE_KEYS = ("steps", "workdir", "log", "checkpoint", "stop")


class TrainingError(RuntimeError):
    """A run that cannot go on or would learn nothing (one line, for the command line)."""


class Interrupted(Exception):  # noqa: N818 - the name says what happened
    """SIGINT / SIGTERM arrived before there was any trained state to save."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} before the first update")
        self.signum = signum


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hooks:
    """What a caller of `run` may change without copying the loop.

    Attributes:
      build_model: `(config, mesh) -> (graphdef, params)` with params placed on the mesh;
        default `build_critic` (a `Critic`, random or `config.init_from`).
      loss_fn: `(outputs, minibatch) -> scalar`; default the critic's loss for `config`.
      initial_params: `(params) -> params` replacing the fresh parameters before training (same
        tree and shapes; they are placed like the fresh ones). Not applied on resume.
      transform_batch: `(host batch dict) -> host batch dict`, applied to each batch before it
        is placed on the devices (e.g. reward noise).
      on_iteration: called after every iteration with `(iteration, metrics or None, state)`;
        metrics on logging and evaluation iterations.
      on_event: called with one-line messages (restored, preempted, warnings).
      eval_every: evaluate against true values every this many iterations (None:
        `config.log.eval_every`), and also before the first update when `eval_at_start`.
      eval_at_start: evaluate the initial parameters (reported as iteration 0).
    """

    build_model: Callable[[TrainConfig, jax.sharding.Mesh], tuple[Any, Any]] | None = None
    loss_fn: update_lib.LossFn | None = None
    initial_params: Callable[[Any], Any] | None = None
    transform_batch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    on_iteration: Callable[[int, dict[str, float] | None, TrainState], None] | None = None
    on_event: Callable[[str], None] | None = None
    eval_every: int | None = None
    eval_at_start: bool = False


# --- set-up -------------------------------------------------------------------------------------


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
    the value pretraining of VC-PPO continues this way)."""
    if config.init_from is None:
        return config
    if is_workdir(config.init_from):
        saved, _ = config_of_workdir(config.init_from)
        return dataclasses.replace(config, model=saved.model)
    path = Path(config.init_from) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Received: init_from={config.init_from}") from e
    m = config.model
    model = config_from_hf(hf, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    return dataclasses.replace(config, model=model)


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
    m = config.model
    # Each device reads only its slice of each tensor: no host holds the whole model.
    critic = critic_from_hf(
        config.init_from,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        remat=m.remat,
        attention=m.attention,
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
            apply_fn, tx, config.ppo, mesh=mesh, loss_fn=loss_fn or default_loss_fn(config)
        ),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(update_lib.evaluate, apply_fn=apply_fn, ppo=config.ppo),
        in_shardings=(
            state_sh.params,
            {k: parallel.batch_sharding(mesh, 2) for k in update_lib.EVAL_KEYS},
        ),
        out_shardings=rep,
    )
    return Trainer(config, mesh, graphdef, keys, update, evaluate)


# --- host-side helpers ----------------------------------------------------------------------------

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


def _host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _json_safe(x: Any) -> Any:
    """NaN and infinities become None, so every file written is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


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


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

    def __init__(
        self,
        workdir: Path,
        *,
        tensorboard: bool,
        resume_iteration: int = 0,
        on_event: Callable[[str], None] = lambda s: None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the lines up to the resumed iteration, drop damaged ones
            keep, damaged = [], 0
            for line in self.path.read_text(errors="replace").splitlines():
                row = _parse_line(line)
                if row is None:
                    damaged += line.strip() != ""
                elif row.get("iteration", 0) <= resume_iteration:
                    keep.append(json.dumps(row, allow_nan=False))
            if damaged:
                on_event(f"warning: dropped {damaged} damaged line(s) of {self.path}")
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = _json_safe({"iteration": iteration, **metrics})
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, iteration)

    def last(self) -> dict[str, Any]:
        """The last line written (after a resume that had nothing left to run)."""
        if not (self.enabled and self.path.exists()):
            return {}
        rows = [r for r in map(_parse_line, self.path.read_text().splitlines()) if r]
        return rows[-1] if rows else {}

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parse_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("iteration", 0), int):
        return None
    return row


class _Signals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between phases and updates.

    Installed before any JAX work, so a signal during start-up or compilation never interrupts
    XLA; a second signal exits at once (the process has been asked twice).
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:
            # A line of its own: a progress bar may be half-way through a line.
            os.write(2, b"\ncritic-jax: interrupted twice; exiting without a save\n")
            os._exit(128 + signum)
        self.signum = signum

    def check(self) -> None:
        """Raises `Interrupted` if a signal came while there was nothing to save yet."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            # After a signal the run has saved and is ending: a repeated Ctrl-C must not kill it
            # on its way out.
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else old)


class WorkdirLock:
    """An exclusive lock on a workdir (`WORKDIR/.lock`, `fcntl.flock`): one live run per workdir.

    The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a
    stale lock file never blocks a new run; the file only records the holder's pid for the
    message.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self._file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise TrainingError(
                f"workdir {self.path.parent} is in use by a running training process "
                f"(pid {holder}); wait for it or choose another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict | None, config: TrainConfig, step: int) -> None:
    """Refuses a resume whose config differs from the checkpoint's outside `RESUMABLE_KEYS`.

    Raises:
      TrainingError: naming every changed key, with the saved and the new value.
    """
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(to_dict(config))
    changed = [
        k
        for k in sorted(set(old) | set(new))
        if k.split(".")[0] not in RESUMABLE_KEYS and old.get(k) != new.get(k)
    ]
    if changed:
        listing = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise TrainingError(
            f"cannot resume from checkpoint step {step}: these settings differ from the run "
            f"that saved it ({listing}); only {', '.join(RESUMABLE_KEYS)} may change on resume. "
            "Use a new --workdir, or --checkpoint.restore false to start over in this one"
        )


# --- the loop ---------------------------------------------------------------------------------


def run(config: TrainConfig, hooks: Hooks = Hooks()) -> dict[str, Any]:
    """Trains for `config.steps` iterations (or until `config.stop` says the critic settled)
    and returns the summary (also written to `WORKDIR/summary.json`). Resumes from the
    workdir's latest checkpoint when there is one.

    Raises:
      ValueError: on an invalid config, data or checkpoint for this run (one line each).
      TrainingError: when the workdir is in use, a resume changes a fixed setting, or the
        updates are (nearly) all non-finite: a run that learns nothing never ends as a success.
      CheckpointError: when a checkpoint cannot be written or restored.
      Interrupted: on SIGINT / SIGTERM before the first update (nothing written).
    """
    workdir = Path(config.workdir)
    with _Signals() as signals, contextlib.ExitStack() as stack:
        parallel.initialize_distributed()
        if jax.process_index() == 0:  # the processes of one run share the workdir
            stack.enter_context(WorkdirLock(workdir))
        config = resolve_config(config)
        mesh = parallel.make_mesh(config.mesh)
        config.check_mesh(mesh.size, jax.process_count())
        # The data first: a bad rollout file is reported before minutes of model set-up.
        iterator = data_lib.make_rollout_iterator(
            config.data,
            seed=config.seed,
            gamma=config.ppo.gamma,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            vocab_size=config.model.vocab_size,
        )
        graphdef, params = (hooks.build_model or build_critic)(config, mesh)
        signals.check()
        state = init_state(config, mesh, params)
        trainer = make_trainer(config, mesh, graphdef, state, loss_fn=hooks.loss_fn)
        on_event = hooks.on_event or (lambda s: None)
        ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint, on_warning=on_event)
        try:
            return _Loop(config, hooks, trainer, iterator, ckpt, signals).run(state)
        finally:
            ckpt.close()


class _Loop:
    """The state of one run of the host loop (see `run`)."""

    def __init__(self, config, hooks, trainer, iterator, ckpt, signals):
        self.config, self.hooks, self.trainer = config, hooks, trainer
        self.iterator, self.ckpt, self.signals = iterator, ckpt, signals
        self.workdir = Path(config.workdir)
        self.on_event = hooks.on_event or (lambda s: None)
        self.on_iteration = hooks.on_iteration or (lambda i, m, s: None)
        self.eval_every = config.log.eval_every if hooks.eval_every is None else hooks.eval_every
        self.evaluation = held_out(config, trainer.mesh)

    def evaluate(self, params) -> dict[str, float]:
        if not self.evaluation:
            return {}
        with mesh_context(self.trainer.mesh):
            return _host(self.trainer.evaluate(params, self.evaluation))

    def next_batch(self):
        raw = next(self.iterator)
        if self.hooks.transform_batch is not None:
            raw = self.hooks.transform_batch(dict(raw))
        local = host_batch(raw, self.trainer.batch_keys, vocab_size=self.config.model.vocab_size)
        return parallel.make_global_batch(local, self.trainer.mesh)

    def restore(self, state: TrainState) -> tuple[TrainState, int]:
        """The state to start from and its iteration: the checkpoint to resume, or fresh."""
        config, ckpt = self.config, self.ckpt
        restore_step = config.checkpoint.restore_step
        if not config.checkpoint.restore or (ckpt.latest_step() is None and restore_step is None):
            if self.hooks.initial_params is not None:
                like = state.params
                shardings = jax.tree.map(lambda x: x.sharding, like)
                params = place_like(self.hooks.initial_params(like), like, shardings)
                state = state.replace(params=params)
            return state, 0
        if restore_step is not None and restore_step not in ckpt.all_steps():
            raise CheckpointError(
                f"no checkpoint step {restore_step} in {ckpt.directory}; saved steps: "
                f"{ckpt.all_steps() or 'none'}"
            )
        # Check the settings first: a changed model shape must be named as such, not reported
        # as a damaged checkpoint by a failed restore.
        candidate = restore_step if restore_step is not None else ckpt.latest_step()
        check_resume_config(ckpt.saved_config(candidate), config, candidate)
        step, state, data_state = restore_state(ckpt, state, restore_step)
        if step != candidate:
            check_resume_config(ckpt.saved_config(step), config, step)
        self.iterator.set_state(data_state)
        moved = ckpt.supersede_after(step)
        if moved:
            self.on_event(
                f"resuming from step {step}: the later checkpoints {moved} of the earlier run "
                f"were moved to {ckpt.directory}-superseded/"
            )
        self.on_event(f"resumed from checkpoint step {step} in {ckpt.directory}")
        return state, int(state.iteration)

    def run(self, state: TrainState) -> dict[str, Any]:
        state, start = self.restore(state)
        self.signals.check()
        if start >= self.config.steps:  # a finished run: report it, rewrite nothing
            summary_path = self.workdir / "summary.json"
            try:
                return json.loads(summary_path.read_text())
            except (OSError, ValueError):
                self.on_event(f"warning: {summary_path} is missing or damaged; nothing to run")
            return {"steps": start, "nothing_to_run": True}
        if self.hooks.eval_at_start and start == 0:
            self.on_iteration(0, self.evaluate(state.params), state)
        # A checkpoint stores the iterator's position just after the batch of the last finished
        # update, not its current one: the loop fetches one batch ahead.
        self.position = self.iterator.get_state()
        batch = self.next_batch()
        t0 = time.perf_counter()
        with mesh_context(self.trainer.mesh):
            compiled = self.trainer.update.lower(state, batch).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.signals.check()
        writer = MetricsWriter(
            self.workdir,
            tensorboard=self.config.log.tensorboard,
            resume_iteration=start,
            on_event=self.on_event,
        )
        try:
            return self.iterate(state, batch, compiled, start, writer)
        finally:
            writer.close()

    def save(self, state: TrainState, iteration: int, *, force: bool = False) -> None:
        save_state(
            self.ckpt,
            iteration,
            state,
            data_state=self.position,
            config=to_dict(self.config),
            force=force,
        )

    def iterate(self, state, batch, compiled, start, writer) -> dict[str, Any]:
        config = self.config
        ahead = self.iterator.get_state()
        tokens_per_batch = config.data.batch_size * batch["tokens"].shape[1]
        last: dict[str, float] = {}
        stop_reason, settled = None, 0
        t_start = time.perf_counter()
        done = start
        for it in range(start, config.steps):
            state, metrics = compiled(state, batch)
            done = it + 1
            self.position = ahead
            if done < config.steps:  # prepare the next batch while the update runs
                batch = self.next_batch()
                ahead = self.iterator.get_state()
            host = None
            evaluating = bool(self.eval_every) and done % self.eval_every == 0
            if done % config.log.every == 0 or done == config.steps or evaluating:
                host = _host(metrics)
                if evaluating:
                    host.update(self.evaluate(state.params))
                elapsed = time.perf_counter() - t_start
                host["tokens_per_second"] = (done - start) * tokens_per_batch / max(elapsed, 1e-9)
                writer.write(done, host)
                last = host
                _check_learning(state, done - start, config)
                settled = settled + 1 if _settled(host, config) else 0
                if settled >= config.stop.patience:
                    stop_reason = (
                        f"explained variance >= {config.stop.explained_variance} for "
                        f"{settled} logged iterations"
                    )
            self.on_iteration(done, host, state)
            if config.checkpoint.every and done % config.checkpoint.every == 0:
                self.save(state, done)
            if self.signals.signum is not None or stop_reason:
                break
        elapsed = time.perf_counter() - t_start
        self.save(state, done, force=True)
        self.ckpt.wait()
        if self.signals.signum is not None and done < config.steps:
            self.on_event(
                f"preempted: saved checkpoint at iteration {done} in {self.ckpt.directory}"
            )
            return {"preempted": True, "steps": done}
        _check_learning(state, done - start, config, final=True)
        if stop_reason:
            self.on_event(f"stopped at iteration {done}: {stop_reason}")
        mesh = self.trainer.mesh
        summary: dict[str, Any] = {
            "steps": done,
            "stopped_early": stop_reason,
            "optimizer_updates": int(state.step),
            "final_loss": last.get("loss"),
            "explained_variance": last.get("explained_variance"),
            "skipped_updates": int(jax.device_get(update_lib.skipped_updates(state.opt_state))),
            "tokens_per_second": (done - start) * tokens_per_batch / max(elapsed, 1e-9),
            "compile_seconds": self.compile_seconds,
            "train_seconds": elapsed,
            "devices": mesh.size,
            "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        }
        summary.update(self.evaluate(state.params))
        summary = _json_safe(summary)
        if jax.process_index() == 0:
            text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
            (self.workdir / "summary.json").write_text(text)
        return summary


def _settled(host: dict[str, float], config: TrainConfig) -> bool:
    threshold = config.stop.explained_variance
    return threshold is not None and host.get("explained_variance", -math.inf) >= threshold


def _check_learning(state: TrainState, iterations: int, config: TrainConfig, final=False) -> None:
    """Raises `TrainingError` when every update so far (or, at the end, most of them) was
    non-finite and skipped: such a run has learned nothing and must not end as a success."""
    skipped = int(jax.device_get(update_lib.skipped_updates(state.opt_state)))
    taken = iterations * config.updates_per_step
    if taken == 0:
        return
    if skipped == taken or (final and skipped > taken // 2):
        raise TrainingError(
            f"{skipped} of {taken} optimizer updates had a non-finite loss or gradient and were "
            "skipped: the critic learns nothing. Check the rewards (NaN/inf at action tokens, "
            "an overflowing KL term), the learning rate and optim.eps"
        )


def train(
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float] | None], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`run` with a progress callback `on_step(iteration, metrics or None)` (a progress bar)."""
    on_iteration = None if on_step is None else (lambda i, m, s: on_step(i, m))
    return run(config, Hooks(on_iteration=on_iteration, on_event=on_event))
