"""The host loop: build the state on the mesh, jit the update once, feed batches, log, checkpoint.

`run(config, hooks)` is the one training loop of the project; `critic-jax train`, the experiments
and the benchmarks all drive it (or its set-up, `critic_jax.setup`, alone). The loop only moves
data and decides when to log, evaluate, checkpoint and stop; the update itself is
`critic_jax.update`, the workdir's files and rules are `critic_jax.workdir`.

Hooks let a caller change what the loop does without copying it: the model (`build_model`, e.g.
a shared actor-critic trunk) and its loss (`loss_fn`), the initial parameters, a transform of each
host batch (reward noise), the evaluation cadence, and a callback after every iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from critic_jax import data as data_lib
from critic_jax import parallel
from critic_jax import update as update_lib
from critic_jax.checkpoint import Checkpointer, CheckpointError, restore_state, save_state
from critic_jax.config import TrainConfig, to_dict

# The set-up and the workdir rules, re-exported: `train` is where a caller looks for them.
from critic_jax.setup import (  # noqa: F401
    Trainer,
    abstract_state,
    batch_keys,
    build_critic,
    check_attention,
    check_param_dtype,
    check_state_fits,
    config_of_workdir,
    default_loss_fn,
    held_out,
    host_batch,
    init_state,
    is_workdir,
    make_trainer,
    mesh_context,
    params_of_workdir,
    place_like,
    resolve_config,
)
from critic_jax.update import TrainState
from critic_jax.workdir import (  # noqa: F401
    RESUMABLE_KEYS,
    Interrupted,
    MetricsWriter,
    Signals,
    TrainingError,
    WorkdirLock,
    check_resume_config,
    json_safe,
)


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


def _rates(slots: int, real_local: int, elapsed: float) -> dict[str, float]:
    """Row slots and attended tokens per second. The attended count is this process's; packed
    rows of different processes hold different numbers, so it is summed over the processes
    (one small collective, at logging time only)."""
    real = real_local
    if jax.process_count() > 1:
        real = int(np.sum(multihost_utils.process_allgather(np.asarray(real_local, np.int64))))
    seconds = max(elapsed, 1e-9)
    return {"tokens_per_second": slots / seconds, "real_tokens_per_second": real / seconds}


def _host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


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
    with Signals() as signals, contextlib.ExitStack() as stack:
        parallel.initialize_distributed()
        if jax.process_index() == 0:  # the processes of one run share the workdir
            stack.enter_context(WorkdirLock(workdir))
        config = resolve_config(config)
        mesh = parallel.make_mesh(config.mesh)
        config.check_mesh(mesh.size, jax.process_count())
        check_attention(config, mesh)
        check_param_dtype(config)
        # The data first: a bad rollout file is reported before minutes of model set-up.
        iterator = data_lib.make_rollout_iterator(
            config.data,
            seed=config.seed,
            gamma=config.ppo.gamma,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            vocab_size=config.model.vocab_size,
        )
        if hooks.build_model is None:  # the state's shapes are known before it is allocated
            check_state_fits(config, mesh)
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
        self.fetched_real_tokens = 0  # attended tokens of the last batch fetched, this process

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
        self.fetched_real_tokens = int(np.count_nonzero(local["attention_mask"]))
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
        # The metrics of iterations after the restored checkpoint are dropped now: the resumed
        # run writes them again.
        writer = MetricsWriter(
            self.workdir,
            tensorboard=self.config.log.tensorboard,
            resume_iteration=start,
            on_event=self.on_event,
        )
        try:
            return self.compile_and_iterate(state, start, writer)
        finally:
            writer.close()

    def compile_and_iterate(self, state: TrainState, start: int, writer) -> dict[str, Any]:
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
        return self.iterate(state, batch, compiled, start, writer)

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
        batch_real, real_done = self.fetched_real_tokens, 0
        last: dict[str, float] = {}
        stop_reason, settled = None, 0
        t_start = time.perf_counter()
        done = start
        for it in range(start, config.steps):
            state, metrics = compiled(state, batch)
            done = it + 1
            real_done += batch_real
            self.position = ahead
            if done < config.steps:  # prepare the next batch while the update runs
                batch = self.next_batch()
                batch_real = self.fetched_real_tokens
                ahead = self.iterator.get_state()
            host = None
            evaluating = bool(self.eval_every) and done % self.eval_every == 0
            if done % config.log.every == 0 or done == config.steps or evaluating:
                host = _host(metrics)
                if evaluating:
                    host.update(self.evaluate(state.params))
                elapsed = time.perf_counter() - t_start
                host.update(_rates((done - start) * tokens_per_batch, real_done, elapsed))
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
            **_rates((done - start) * tokens_per_batch, real_done, elapsed),
            "compile_seconds": self.compile_seconds,
            "train_seconds": elapsed,
            "devices": mesh.size,
            "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        }
        summary.update(self.evaluate(state.params))
        summary = json_safe(summary)
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
