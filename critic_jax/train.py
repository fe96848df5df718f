"""The critic update of one PPO iteration as one jitted, sharded call, and the loop around it.

One iteration takes a rollout batch `[B, T]` and, inside a single `jax.jit`:

1. evaluates the critic on the batch for the rollout's old values (or takes them from the data),
2. computes GAE returns with `compute_gae`,
3. runs `ppo_epochs` passes over shuffled minibatches (`lax.scan`), each minibatch split into
   micro-batches for gradient accumulation (`lax.scan`), with `value_loss` reduced over the whole
   minibatch, so accumulation and sharding never change the gradient,
4. applies AdamW (clip by global norm, warmup + cosine), skipping non-finite updates.

The host loop only feeds batches, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from critic_jax import data as data_lib
from critic_jax import parallel
from critic_jax.advantages import compute_gae
from critic_jax.checkpoint import Checkpointer, abstract_like
from critic_jax.config import OptimConfig, PPOConfig, TrainConfig, to_dict
from critic_jax.losses import reduction_denominator, value_loss
from critic_jax.masking import masked_mean
from critic_jax.metrics import explained_variance, value_metrics
from critic_jax.models import Critic, config_from_hf, critic_from_hf

BATCH_KEYS = ("tokens", "attention_mask", "mask", "rewards")


@flax.struct.dataclass
class TrainState:
    """Everything an update changes.

    Attributes:
      params: the critic's `nnx.Param` state.
      opt_state: optax state.
      step: int32 scalar, optimizer updates taken (skipped ones included).
      iteration: int32 scalar, rollout batches consumed.
      rng: uint32[2] key for the minibatch shuffles.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    iteration: jax.Array
    rng: jax.Array


def make_optimizer(config: OptimConfig, total_updates: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(warmup + cosine), wrapped to skip non-finite updates."""
    warmup = min(config.warmup_steps, max(total_updates - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        # Start above 0 so that the very first update already moves the parameters.
        init_value=config.learning_rate / (warmup + 1),
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_updates, warmup + 1),
        end_value=config.learning_rate * config.end_lr_ratio,
    )
    chain = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        ),
    )
    # A non-finite gradient leaves params and moments untouched and is counted in the state.
    return optax.apply_if_finite(chain, max_consecutive_errors=2**31 - 1)


def _constrain(x: jax.Array, mesh, batch_axis: int) -> jax.Array:
    spec = [None] * x.ndim
    spec[batch_axis] = parallel.BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def ppo_value_loss(values: jax.Array, mb: dict[str, jax.Array], ppo: PPOConfig) -> jax.Array:
    """`value_loss` of `values` against `mb["returns"]`, clipped around `mb["old_values"]` on
    `mb["mask"]`, with the loss type, clip radius and reduction of `ppo`."""
    return value_loss(
        values,
        mb["old_values"],
        mb["returns"],
        mb["mask"],
        clip_eps=ppo.clip_eps,
        loss_type=ppo.loss_type,
        huber_delta=ppo.huber_delta,
        reduction=ppo.reduction,
    )


def make_update_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    ppo: PPOConfig,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure critic update `(state, batch) -> (state, metrics)` for one rollout batch.

    `batch` holds `[B, T]` arrays `tokens`, `attention_mask`, `mask`, `rewards` and, when
    `ppo.use_rollout_old_values`, `old_values`. `B` must be a multiple of `ppo.minibatch_size`.
    The caller jits it once (see `jit_update`).
    """

    def apply(params, tokens, attention_mask):
        params = parallel.gather_lookup_tables(params, mesh)
        return nnx.merge(graphdef, params)(tokens, attention_mask)

    def minibatch_loss(params, mb, scale):
        values = apply(params, mb["tokens"], mb["attention_mask"])
        return ppo_value_loss(values, mb, ppo) * scale, values

    grad_fn = jax.value_and_grad(minibatch_loss, has_aux=True)

    def minibatch_step(carry, mb):
        params, opt_state = carry
        total = reduction_denominator(mb["mask"], ppo.reduction)
        micro = jax.tree.map(
            lambda x: _constrain(
                x.reshape(ppo.micro_batches, x.shape[0] // ppo.micro_batches, *x.shape[1:]),
                mesh,
                1,
            ),
            mb,
        )

        def micro_step(acc, m):
            grads_acc, loss_acc = acc
            scale = jnp.where(
                total > 0, reduction_denominator(m["mask"], ppo.reduction) / total, 0.0
            )
            (loss, values), grads = grad_fn(params, m, scale)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss), values

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss), values = jax.lax.scan(micro_step, (zeros, jnp.float32(0.0)), micro)
        values = values.reshape(mb["mask"].shape)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = value_metrics(
            values, mb["old_values"], mb["returns"], mb["mask"], clip_eps=ppo.clip_eps
        )
        stats = {
            "loss": loss,
            "grad_norm": grad_norm,
            "skipped": 1.0 - finite.astype(jnp.float32),
            "clipfrac": stats["clipfrac"],
            "value_mse": stats["value_mse"],
            "vpred_mean": stats["vpred_mean"],
        }
        return (params, opt_state), stats

    def update(state: TrainState, batch: dict[str, jax.Array]):
        tokens, attention_mask = batch["tokens"], batch["attention_mask"]
        mask, rewards = batch["mask"], batch["rewards"]
        rows, length = tokens.shape
        n_mb = rows // ppo.minibatch_size

        def chunks(x):  # [B, ...] -> [n_mb, mb, ...], rows of each chunk over the batch axes
            return _constrain(x.reshape(n_mb, ppo.minibatch_size, *x.shape[1:]), mesh, 1)

        if ppo.use_rollout_old_values:
            old_values = batch["old_values"].astype(jnp.float32)
        else:
            # Chunked so evaluating a large rollout batch costs one minibatch of activations.
            old_values = jax.lax.map(
                lambda tm: apply(state.params, *tm), (chunks(tokens), chunks(attention_mask))
            ).reshape(rows, length)
            old_values = jax.lax.stop_gradient(old_values)
        advantages, returns = compute_gae(
            rewards, old_values, mask, gamma=ppo.gamma, lam=ppo.lam, method=ppo.gae_method
        )
        data = {
            "tokens": tokens,
            "attention_mask": attention_mask,
            "mask": mask,
            "old_values": old_values,
            "returns": returns,
        }
        rng, shuffle_rng = jax.random.split(state.rng)

        def epoch(carry, key):
            perm = jax.random.permutation(key, rows)
            mbs = jax.tree.map(lambda x: chunks(x[perm]), data)
            return jax.lax.scan(minibatch_step, carry, mbs)

        keys = jax.random.split(shuffle_rng, ppo.ppo_epochs)
        (params, opt_state), stats = jax.lax.scan(epoch, (state.params, state.opt_state), keys)
        n_updates = ppo.ppo_epochs * n_mb
        metrics = {k: v.mean() for k, v in stats.items()}
        metrics["skipped"] = stats["skipped"].sum()
        metrics["loss_first"] = stats["loss"][0, 0]
        metrics["loss_last"] = stats["loss"][-1, -1]
        metrics["returns_mean"] = masked_mean(returns, mask)
        metrics["advantages_mean"] = masked_mean(advantages, mask)
        metrics["explained_variance"] = explained_variance(old_values, returns, mask)
        metrics["valid_tokens"] = (mask != 0).sum().astype(jnp.float32)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            step=state.step + n_updates,
            iteration=state.iteration + 1,
            rng=rng,
        )
        return new_state, metrics

    return update


def make_eval_fn(graphdef: nnx.GraphDef) -> Callable[[Any, dict[str, jax.Array]], dict]:
    """`(params, batch) -> metrics` of the critic against known true values.

    `relative_value_error` = RMSE(V - V*) / std(V*) over valid tokens;
    `explained_variance_vs_true` = 1 - Var(V* - V) / Var(V*).
    """

    def evaluate(params, batch):
        values = nnx.merge(graphdef, params)(batch["tokens"], batch["attention_mask"])
        true, mask = batch["true_values"], batch["mask"]
        valid = mask != 0
        err = jnp.where(valid, values - true, 0.0)
        rmse = jnp.sqrt(masked_mean(err**2, mask))
        mean_true = masked_mean(true, mask)
        std_true = jnp.sqrt(masked_mean(jnp.where(valid, true - mean_true, 0.0) ** 2, mask))
        return {
            "relative_value_error": rmse / jnp.maximum(std_true, 1e-12),
            "value_rmse": rmse,
            "true_value_std": std_true,
            "explained_variance_vs_true": explained_variance(values, true, mask),
        }

    return evaluate


@dataclasses.dataclass
class Setup:
    """A run's static parts: the mesh, the model's graph, the optimizer and the jitted calls."""

    config: TrainConfig
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    state_shardings: Any
    batch_keys: tuple[str, ...]
    update: Any  # the jitted update
    evaluate: Any  # the jitted evaluation


def build_model(config: TrainConfig, mesh: jax.sharding.Mesh, *, seed: int | None = None):
    """Creates the critic's parameters directly in their sharded layout.

    Returns:
      (graphdef, params) with every parameter placed by `parallel.LOGICAL_AXIS_RULES`.
    """
    seed = config.seed if seed is None else seed
    if config.init_from is not None:
        config = with_checkpoint_model(config)

    def make_params():
        return nnx.state(Critic(config.model, rngs=nnx.Rngs(seed)), nnx.Param)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        abstract = nnx.eval_shape(lambda: Critic(config.model, rngs=nnx.Rngs(seed)))
        graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"The critic has non-parameter state, unsupported. Received: {rest}")
        shardings = parallel.state_shardings(abs_params, mesh)
        if config.init_from is None:
            params = jax.jit(make_params, out_shardings=shardings)()
            return graphdef, params
    loaded = nnx.state(_load_critic(config), nnx.Param)
    leaves = []
    for (path, x), want, sharding in zip(
        jax.tree_util.tree_leaves_with_path(loaded),
        jax.tree.leaves(abs_params),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        if x.shape != want.shape:
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)} of {config.init_from} has shape "
                f"{x.shape}, the model expects {want.shape}. Received: {config.init_from}"
            )
        leaves.append(_replicate(np.asarray(x, want.dtype), sharding))
    return graphdef, jax.tree.unflatten(jax.tree.structure(abs_params), leaves)


def _load_critic(config: TrainConfig) -> Critic:
    m = config.model
    return critic_from_hf(config.init_from, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)


def with_checkpoint_model(config: TrainConfig) -> TrainConfig:
    """`config` with `model` taken from the `init_from` checkpoint's architecture."""
    path = Path(config.init_from) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Received: init_from={config.init_from}") from e
    m = config.model
    model = config_from_hf(hf, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    return dataclasses.replace(config, model=model)


def init_state(config: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh, sharded `TrainState` (and the model's graph) for `config` on `mesh`."""
    graphdef, params = build_model(config, mesh)
    tx = make_optimizer(config.optim, config.steps * config.updates_per_step)
    rep = parallel.replicated(mesh)
    # Adam moments are sharded like their parameters (ZeRO under fsdp); counters are replicated.
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: rep,
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=_replicate(np.int32(0), rep),
        iteration=_replicate(np.int32(0), rep),
        rng=_replicate(np.asarray(jax.random.PRNGKey(config.seed + 1)), rep),
    )
    # Commit every leaf to its sharding, so the first update sees what later ones see.
    return graphdef, jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))


def _replicate(x, sharding: NamedSharding) -> jax.Array:
    """Places a host value that every process holds identically onto `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def make_setup(config: TrainConfig, mesh: jax.sharding.Mesh, state: TrainState, graphdef) -> Setup:
    """Jits the update once: explicit in/out shardings, the state donated."""
    tx = make_optimizer(config.optim, config.steps * config.updates_per_step)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    keys = BATCH_KEYS + (("old_values",) if config.ppo.use_rollout_old_values else ())
    batch_sh = {k: parallel.batch_sharding(mesh, 2) for k in keys}
    rep = parallel.replicated(mesh)
    update = jax.jit(
        make_update_fn(graphdef, tx, config.ppo, mesh),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    eval_keys = ("tokens", "attention_mask", "mask", "true_values")
    evaluate = jax.jit(
        make_eval_fn(graphdef),
        in_shardings=(state_sh.params, {k: parallel.batch_sharding(mesh, 2) for k in eval_keys}),
        out_shardings=rep,
    )
    return Setup(config, mesh, graphdef, tx, state_sh, keys, update, evaluate)


# --- checkpoint form of the state: a nested dict of plain arrays -------------------------------


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def to_checkpoint_tree(state: TrainState) -> dict:
    """The state as nested dicts of arrays (the form Orbax stores), keyed by pytree paths."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = out
        names = [_key_name(p) for p in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_checkpoint_tree(tree: dict, like: TrainState) -> TrainState:
    """Inverse of `to_checkpoint_tree`, with the pytree structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = tree
        for p in path:
            node = node[_key_name(p)]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


# --- the loop ------------------------------------------------------------------------------------


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: Path, *, tensorboard: bool, resume_iteration: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop lines a resumed run is about to write again
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and _iteration_of(ln) <= resume_iteration]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _iteration_of(line: str) -> int:
    try:
        return int(json.loads(line).get("iteration", 0))
    except (ValueError, AttributeError):
        return 0


class _Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop checks between updates."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _host(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _local_batch(batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"Rollout batch lacks {missing}. Received keys: {sorted(batch)}")
    out = {}
    for k in keys:
        x = np.asarray(batch[k])
        out[k] = x.astype(np.int32) if k in ("tokens", "attention_mask") else x.astype(np.float32)
    return out


def train(
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float] | None], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Trains the critic for `config.steps` iterations; returns the summary (also written to
    `WORKDIR/summary.json`). Resumes from the workdir's latest checkpoint when there is one.

    Args:
      config: the run.
      on_step: called after every iteration with its index and, on logging iterations, the
        metrics (a progress bar).
      on_event: called with one-line messages (restored, preempted, ...).
    """
    on_step = on_step or (lambda i, m: None)
    on_event = on_event or (lambda s: None)
    parallel.initialize_distributed()
    workdir = Path(config.workdir)
    if config.init_from is not None:
        config = with_checkpoint_model(config)
    mesh = parallel.make_mesh(config.mesh)
    config.check_mesh(mesh.size, jax.process_count())

    graphdef, state = init_state(config, mesh)
    setup = make_setup(config, mesh, state, graphdef)
    iterator = data_lib.make_rollout_iterator(
        config.data,
        seed=config.seed,
        gamma=config.ppo.gamma,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckpt = Checkpointer(workdir / "checkpoints", config.checkpoint)
    start = 0
    if config.checkpoint.restore and (
        ckpt.latest_step() is not None or config.checkpoint.restore_step is not None
    ):
        step, tree, data_state = ckpt.restore(
            abstract_like(to_checkpoint_tree(state)), config.checkpoint.restore_step
        )
        state = from_checkpoint_tree(tree, state)
        iterator.set_state(data_state)
        start = int(state.iteration)
        on_event(f"resumed from checkpoint step {step} in {ckpt.directory}")
    writer = MetricsWriter(workdir, tensorboard=config.log.tensorboard, resume_iteration=start)
    held_out = _held_out(config, mesh)

    # A checkpoint stores the iterator's position just after the batch of the last finished
    # update (`position`), not its current one: the loop fetches one batch ahead (`ahead`).
    position = iterator.get_state()

    def save(it: int, force: bool = False):
        ckpt.save(
            it, to_checkpoint_tree(state), data_state=position, config=to_dict(config), force=force
        )

    batch = parallel.make_global_batch(_local_batch(next(iterator), setup.batch_keys), mesh)
    ahead = iterator.get_state()
    t0 = time.perf_counter()
    compiled = setup.update.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0

    tokens_per_batch = config.data.batch_size * batch["tokens"].shape[1]
    last: dict[str, float] = {}
    preempted = False
    t_start = time.perf_counter()
    done = start
    with _Preemption() as preemption:
        for it in range(start, config.steps):
            state, metrics = compiled(state, batch)
            done = it + 1
            position = ahead
            if done < config.steps:  # prepare the next batch while the update runs
                batch = parallel.make_global_batch(
                    _local_batch(next(iterator), setup.batch_keys), mesh
                )
                ahead = iterator.get_state()
            host = None
            if done % config.log.every == 0 or done == config.steps:
                host = _host(metrics)
                if config.log.eval_every and done % config.log.eval_every == 0 and held_out:
                    host.update(_host(setup.evaluate(state.params, held_out)))
                elapsed = time.perf_counter() - t_start
                host["tokens_per_second"] = (done - start) * tokens_per_batch / max(elapsed, 1e-9)
                writer.write(done, host)
                last = host
            on_step(done, host)
            if config.checkpoint.every and done % config.checkpoint.every == 0:
                save(done)
            if preemption.requested:
                preempted = done < config.steps
                break
    elapsed = time.perf_counter() - t_start
    save(done, force=True)
    ckpt.wait()
    if preempted:
        ckpt.close()
        writer.close()
        on_event(f"preempted: saved checkpoint at iteration {done} in {ckpt.directory}")
        return {"preempted": True, "steps": done}

    if not last and writer.enabled and writer.path.exists():  # nothing left to run after resume
        lines = writer.path.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    summary: dict[str, Any] = {
        "steps": done,
        "optimizer_updates": int(state.step),
        "final_loss": last.get("loss", float("nan")),
        "explained_variance": last.get("explained_variance", float("nan")),
        "skipped_updates": int(jax.device_get(state.opt_state.total_notfinite)),
        "tokens_per_second": (done - start) * tokens_per_batch / max(elapsed, 1e-9),
        "compile_seconds": compile_seconds,
        "train_seconds": elapsed,
        "devices": mesh.size,
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
    }
    if held_out:
        summary.update(_host(setup.evaluate(state.params, held_out)))
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    ckpt.close()
    return summary


def _held_out(config: TrainConfig, mesh) -> dict[str, jax.Array] | None:
    """This process's slice of the held-out batch with true values (synthetic data only)."""
    if config.data.path is not None:
        return None
    dp = parallel.batch_parallel_size(mesh)
    rows = max(dp, config.log.eval_rows - config.log.eval_rows % dp)
    full = data_lib.held_out_batch(config.data, seed=config.seed, gamma=config.ppo.gamma, n=rows)
    per = rows // jax.process_count()
    lo = jax.process_index() * per
    local = {
        k: np.asarray(full[k][lo : lo + per])
        for k in ("tokens", "attention_mask", "mask", "true_values")
    }
    local["tokens"] = local["tokens"].astype(np.int32)
    local["attention_mask"] = local["attention_mask"].astype(np.int32)
    local["mask"] = local["mask"].astype(np.float32)
    local["true_values"] = local["true_values"].astype(np.float32)
    return parallel.make_global_batch(local, mesh)


if __name__ == "__main__":
    import sys

    from critic_jax.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
