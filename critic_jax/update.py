"""The critic update of one PPO iteration, as pure functions composed in one jitted call.

Data flow, top to bottom, for one rollout batch `[B, T]`:

1. `old_values`: the critic's values on the batch before the update (or the rollout's own);
2. `gae_targets`: `compute_gae` returns (critic λ) and, for the logs, the policy's advantages;
3. `ppo_epochs` passes over shuffled minibatches (`lax.scan`); each minibatch
   (`minibatch_step`) accumulates the gradient over micro-batches (`accumulate_gradients`,
   `lax.scan`) of `minibatch_loss`, whose loss is reduced over the whole minibatch, so
   accumulation and sharding never change the gradient; then AdamW (clip by global norm, warmup +
   cosine) applies it, skipping non-finite updates.

The model enters only through `apply_fn(params, batch) -> outputs`, a dict with at least `values`
`[B, T]` (and `value_logits` `[B, T, K]` for a distributional head, `lm_logits` for a shared
trunk), and the loss through `loss_fn(outputs, minibatch) -> scalar`; so a shared actor-critic
trunk or another value head plugs into the same update. `make_update` binds them; the trainer
jits the result once, with shardings and the state donated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from critic_jax import parallel
from critic_jax.advantages import compute_gae, length_adaptive_lam
from critic_jax.config import OptimConfig, PPOConfig
from critic_jax.losses import hl_gauss_loss, reduction_denominator, value_loss
from critic_jax.masking import masked_mean
from critic_jax.metrics import (
    advantage_metrics,
    explained_variance,
    value_error_metrics,
    value_metrics,
)

Batch = dict[str, jax.Array]
ApplyFn = Callable[[Any, Batch], dict[str, jax.Array]]
LossFn = Callable[[dict[str, jax.Array], Batch], jax.Array]

# Arrays of a rollout batch the update reads (plus `old_values` and `segment_ids` when present).
BATCH_KEYS = ("tokens", "attention_mask", "mask", "rewards")
OPTIONAL_BATCH_KEYS = ("old_values", "segment_ids")
EVAL_KEYS = ("tokens", "attention_mask", "mask", "rewards", "true_values", "true_advantages")


@flax.struct.dataclass
class TrainState:
    """Everything an update changes.

    Attributes:
      params: the model's `nnx.Param` state.
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


def skipped_updates(opt_state: Any) -> jax.Array:
    """Updates that `make_optimizer`'s non-finite guard skipped so far (int32 scalar)."""
    return opt_state.total_notfinite


# --- the model and the loss -------------------------------------------------------------------


def make_apply_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh) -> ApplyFn:
    """`apply_fn` of a `Critic` or `ActorCritic` graph: `(params, batch) -> outputs`.

    Outputs: `values` [B, T]; `value_logits` [B, T, K] when the critic has an HL-Gauss head;
    `lm_logits` [B, T, V] for an `ActorCritic`. The embedding is looked up on its own shards
    (`critic_jax.models.embedding.lookup`): neither the table nor its gradient is gathered.
    """

    def apply_fn(params: Any, batch: Batch) -> dict[str, jax.Array]:
        # The mesh and the rule table in scope while the model is traced: activations are
        # constrained by logical names, and kernels that cannot be partitioned automatically
        # (Pallas splash attention) run in a `shard_map`.
        with (
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(parallel.LOGICAL_AXIS_RULES),
        ):
            return _apply(params, batch)

    def _apply(params: Any, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        kwargs = {}
        if "segment_ids" in batch:
            kwargs["segment_ids"] = batch["segment_ids"]
        if hasattr(model, "logits_and_values") and model.config.value_head == "hl-gauss":
            logits, values = model.logits_and_values(
                batch["tokens"], batch["attention_mask"], **kwargs
            )
            return {"values": values, "value_logits": logits}
        out = model(batch["tokens"], batch["attention_mask"], **kwargs)
        if isinstance(out, tuple):  # ActorCritic: (lm logits, values)
            return {"lm_logits": out[0], "values": out[1]}
        return {"values": out}

    return apply_fn


def ppo_value_loss(values: jax.Array, mb: Batch, ppo: PPOConfig) -> jax.Array:
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
        segment_ids=mb.get("segment_ids"),
    )


def critic_loss(
    outputs: dict[str, jax.Array],
    mb: Batch,
    *,
    ppo: PPOConfig,
    support: jax.Array | None = None,
    sigma: float | None = None,
) -> jax.Array:
    """The critic's loss on one (micro-)batch: the clipped value loss of `outputs["values"]`, or,
    for an HL-Gauss head (`support` given), the cross-entropy of `outputs["value_logits"]`
    against the HL-Gauss target of the returns, with the reduction of `ppo`."""
    if support is None:
        return ppo_value_loss(outputs["values"], mb, ppo)
    return hl_gauss_loss(
        outputs["value_logits"],
        mb["returns"],
        mb["mask"],
        support=support,
        sigma=sigma,
        reduction=ppo.reduction,
        segment_ids=mb.get("segment_ids"),
    )


# --- the stages of one update -------------------------------------------------------------------


def _split_rows(x: jax.Array, parts: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """[B, ...] -> [parts, B / parts, ...], the rows of each part over the batch axes."""
    x = x.reshape(parts, x.shape[0] // parts, *x.shape[1:])
    return parallel.with_logical_constraint(x, (None, "batch"), mesh)


def old_values(
    apply_fn: ApplyFn, params: Any, batch: Batch, *, chunks: int, mesh: jax.sharding.Mesh
) -> jax.Array:
    """The critic's values `[B, T]` on `batch`, evaluated `chunks` row-chunks at a time (so a
    large rollout batch costs one chunk of activations), with no gradient."""
    inputs = {k: batch[k] for k in ("tokens", "attention_mask", "segment_ids") if k in batch}
    split = jax.tree.map(lambda x: _split_rows(x, chunks, mesh), inputs)
    values = jax.lax.map(lambda b: apply_fn(params, b)["values"], split)
    return jax.lax.stop_gradient(values.reshape(batch["tokens"].shape))


def policy_lam(mask: jax.Array, ppo: PPOConfig, segment_ids=None) -> jax.Array | float:
    """The policy's λ: `ppo.policy_lam`, or per row `length_adaptive_lam` when
    `ppo.adaptive_lam_alpha` is set. Packed rows hold several rollouts of different lengths and
    λ is one value per row, so they use the fixed `ppo.policy_lam` (`critic-jax score`, which
    reads one rollout per row, applies the length-adaptive λ)."""
    if ppo.adaptive_lam_alpha is None or segment_ids is not None:
        return ppo.policy_lam
    return length_adaptive_lam(mask, alpha=ppo.adaptive_lam_alpha)


def gae_targets(batch: Batch, values: jax.Array, ppo: PPOConfig) -> tuple[jax.Array, jax.Array]:
    """(policy advantages, critic returns) of `batch` under `values`: the critic's targets use
    `ppo.lam`, the policy's advantages `policy_lam` (decoupled GAE when they differ)."""
    seg = batch.get("segment_ids")
    kwargs = dict(gamma=ppo.gamma, method=ppo.gae_method, segment_ids=seg)
    _, returns = compute_gae(batch["rewards"], values, batch["mask"], lam=ppo.lam, **kwargs)
    lam = policy_lam(batch["mask"], ppo, seg)
    advantages, _ = compute_gae(batch["rewards"], values, batch["mask"], lam=lam, **kwargs)
    return advantages, returns


def unstack_layers(params: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(params with each stacked layer parameter, a `Variable` whose leading logical axis is
    "layers", split into its per-layer slices; the function that stacks such a tree back).

    The micro-batch loop of `accumulate_gradients` differentiates with respect to the slices and
    stacks them inside the loss, where the compiler folds the stack into the model's per-layer
    reads: each layer's weights are sliced once per minibatch rather than once per micro-batch,
    and each micro-batch's gradient is accumulated per layer, not re-stacked (written-out layer
    loops only: a scanned loop reads the stack itself).
    """

    def stacked(x) -> bool:
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        return bool(names) and names[0] == "layers"

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    marks = jax.tree.leaves(jax.tree.map(stacked, params, is_leaf=is_variable))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [tuple(x) if m else x for x, m in zip(leaves, marks, strict=True)]

    def restack(tree: Any) -> Any:
        parts = treedef.flatten_up_to(tree)
        return jax.tree_util.tree_unflatten(
            treedef, [jnp.stack(p) if m else p for p, m in zip(parts, marks, strict=True)]
        )

    return jax.tree_util.tree_unflatten(treedef, leaves), restack


def minibatch_loss(
    params: Any, mb: Batch, scale: jax.Array, *, apply_fn: ApplyFn, loss_fn: LossFn
) -> tuple[jax.Array, jax.Array]:
    """(`loss_fn` of the model's outputs on `mb`, times `scale`; the values `[b, T]`)."""
    outputs = apply_fn(params, mb)
    return loss_fn(outputs, mb) * scale, outputs["values"]


def accumulate_gradients(
    params: Any,
    mb: Batch,
    *,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    ppo: PPOConfig,
    mesh: jax.sharding.Mesh,
    split_layers: bool = False,
) -> tuple[Any, jax.Array, jax.Array]:
    """Gradient of the minibatch loss, summed over `ppo.micro_batches` micro-batches.

    Each micro-batch's loss is scaled by `reduction_denominator(micro) / ...(minibatch)`, so the
    sum is the loss reduced over the whole minibatch, whatever the split. `split_layers`: the
    model's layers run written out, so their slices are taken once for all micro-batches
    (`unstack_layers`).

    Returns:
      (grads, loss, values [b, T] of the minibatch).
    """
    seg = mb.get("segment_ids")
    total = reduction_denominator(mb["mask"], ppo.reduction, segment_ids=seg)
    micro = jax.tree.map(lambda x: _split_rows(x, ppo.micro_batches, mesh), mb)
    if split_layers and ppo.micro_batches > 1:
        pieces, restack = unstack_layers(params)
    else:
        pieces, restack = params, lambda tree: tree

    def loss(pieces, m, scale):
        return minibatch_loss(restack(pieces), m, scale, apply_fn=apply_fn, loss_fn=loss_fn)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def micro_step(acc, m):
        grads_acc, loss_acc = acc
        part = reduction_denominator(m["mask"], ppo.reduction, segment_ids=m.get("segment_ids"))
        scale = jnp.where(total > 0, part / jnp.maximum(total, 1.0), 0.0)
        (part_loss, values), grads = grad_fn(pieces, m, scale)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + part_loss), values

    zeros = jax.tree.map(jnp.zeros_like, pieces)
    (grads, total_loss), values = jax.lax.scan(micro_step, (zeros, jnp.float32(0.0)), micro)
    return restack(grads), total_loss, values.reshape(mb["mask"].shape)


def minibatch_step(
    carry: tuple[Any, Any],
    mb: Batch,
    *,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    ppo: PPOConfig,
    mesh: jax.sharding.Mesh,
    split_layers: bool = False,
) -> tuple[tuple[Any, Any], dict[str, jax.Array]]:
    """One optimizer update on one minibatch: `(params, opt_state) -> (params, opt_state)`."""
    params, opt_state = carry
    grads, loss, values = accumulate_gradients(
        params,
        mb,
        apply_fn=apply_fn,
        loss_fn=loss_fn,
        ppo=ppo,
        mesh=mesh,
        split_layers=split_layers,
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    stats = value_metrics(
        values, mb["old_values"], mb["returns"], mb["mask"], clip_eps=ppo.clip_eps
    )
    return (params, opt_state), {
        "loss": loss,
        "grad_norm": grad_norm,
        "skipped": 1.0 - finite.astype(jnp.float32),
        "clipfrac": stats["clipfrac"],
        "value_mse": stats["value_mse"],
        "vpred_mean": stats["vpred_mean"],
    }


def update(
    state: TrainState,
    batch: Batch,
    *,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    ppo: PPOConfig,
    mesh: jax.sharding.Mesh,
    split_layers: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The critic update of one PPO iteration on one rollout batch.

    Args:
      state: the `TrainState`.
      batch: `[B, T]` arrays `tokens`, `attention_mask`, `mask`, `rewards`, optionally
        `segment_ids` (packed rows) and, with `ppo.use_rollout_old_values`, `old_values`.
        B must be a multiple of `ppo.minibatch_size`.
      apply_fn, loss_fn: the model and its loss (see the module docstring).
      tx: the optimizer of `make_optimizer`.
      ppo: the PPO section of the config.
      mesh: the device mesh (for sharding constraints).
      split_layers: the model's layers run written out (`ModelConfig.unrolled`): slice them once
        per minibatch for all its micro-batches (`unstack_layers`). Same numbers either way.

    Returns:
      (the new state, metrics: float32 scalars averaged over the iteration's updates).
    """
    rows = batch["tokens"].shape[0]
    n_mb = rows // ppo.minibatch_size
    if ppo.use_rollout_old_values:
        values = batch["old_values"].astype(jnp.float32)
    else:
        values = old_values(apply_fn, state.params, batch, chunks=n_mb, mesh=mesh)
    advantages, returns = gae_targets(batch, values, ppo)
    model_inputs = ("tokens", "attention_mask", "mask", "segment_ids")
    data = {k: batch[k] for k in model_inputs if k in batch}
    data.update(old_values=values, returns=returns)
    rng, shuffle_rng = jax.random.split(state.rng)
    step = functools.partial(
        minibatch_step,
        apply_fn=apply_fn,
        loss_fn=loss_fn,
        tx=tx,
        ppo=ppo,
        mesh=mesh,
        split_layers=split_layers,
    )

    def epoch(carry, key):
        perm = jax.random.permutation(key, rows)
        minibatches = jax.tree.map(lambda x: _split_rows(x[perm], n_mb, mesh), data)
        return jax.lax.scan(step, carry, minibatches)

    keys = jax.random.split(shuffle_rng, ppo.ppo_epochs)
    (params, opt_state), stats = jax.lax.scan(epoch, (state.params, state.opt_state), keys)
    mask = batch["mask"]
    metrics = {k: v.mean() for k, v in stats.items()}
    metrics.update(
        skipped=stats["skipped"].sum(),
        loss_first=stats["loss"][0, 0],
        loss_last=stats["loss"][-1, -1],
        returns_mean=masked_mean(returns, mask),
        advantages_mean=masked_mean(advantages, mask),
        explained_variance=explained_variance(values, returns, mask),
        valid_tokens=jnp.sum(mask != 0, dtype=jnp.float32),
    )
    new_state = TrainState(
        params=params,
        opt_state=opt_state,
        step=state.step + ppo.ppo_epochs * n_mb,
        iteration=state.iteration + 1,
        rng=rng,
    )
    return new_state, metrics


def make_update(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    ppo: PPOConfig,
    *,
    mesh: jax.sharding.Mesh,
    loss_fn: LossFn | None = None,
    split_layers: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`update` with the model, loss, optimizer and config bound: `(state, batch) -> (state,
    metrics)`, pure, for the caller to jit once. `loss_fn` defaults to the scalar value loss;
    `split_layers` as in `update`."""
    loss_fn = loss_fn or functools.partial(critic_loss, ppo=ppo)
    return functools.partial(
        update,
        apply_fn=apply_fn,
        loss_fn=loss_fn,
        tx=tx,
        ppo=ppo,
        mesh=mesh,
        split_layers=split_layers,
    )


def evaluate(params: Any, batch: Batch, *, apply_fn: ApplyFn, ppo: PPOConfig) -> Batch:
    """The critic against known true values: `(params, batch) -> metrics`.

    `batch` holds `tokens`, `attention_mask`, `mask`, `rewards`, `true_values` and
    `true_advantages` ([B, T]). Returns `value_error_metrics` of the values against V* and
    `advantage_metrics` of the policy's GAE advantages (λ of `policy_lam`) under these values
    against A*.
    """
    values = apply_fn(params, batch)["values"]
    mask = batch["mask"]
    out = value_error_metrics(values, batch["true_values"], mask)
    advantages, _ = gae_targets(batch, values, ppo)
    out.update(advantage_metrics(advantages, batch["true_advantages"], mask))
    return out
