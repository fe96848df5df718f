"""Configuration: frozen, keyword-only dataclasses composed into one validated `TrainConfig`.

Each section lives beside the code that owns it (`ModelConfig` in `models`, `MeshConfig` in
`parallel`, `DataConfig` in `data`, `CheckpointConfig` in `checkpoint`); this module adds the PPO
and optimizer sections and the checks that span sections (batch divisibility against the mesh,
vocabulary against the data). `tyro` turns `TrainConfig` into the command line; an experiment is a
function returning a `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from critic_jax import _checks
from critic_jax.advantages import GAE_METHODS
from critic_jax.checkpoint import CheckpointConfig
from critic_jax.data import DataConfig
from critic_jax.losses import LOSS_TYPES, REDUCTIONS
from critic_jax.models import PRESETS, ModelConfig
from critic_jax.parallel import MeshConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """The critic's side of one PPO iteration.

    Attributes:
      gamma: discount in [0, 1].
      lam: GAE λ in [0, 1]; 0 gives the TD(0) target r_t + γ V_{t+1}.
      clip_eps: value clipping radius around the rollout's old values; None disables clipping.
      loss_type: "mse" or "huber".
      huber_delta: Huber transition point.
      reduction: how token losses become one scalar (see `critic_jax.value_loss`).
      ppo_epochs: passes over the rollout batch per iteration.
      minibatch_size: rows per optimizer update (global, over all devices).
      micro_batches: gradient-accumulation chunks per minibatch (same gradient, less memory).
      gae_method: "scan" or "associative".
      policy_lam: GAE λ of the policy's advantages (logged, evaluated against the true
        advantages and written by `critic-jax score`); the critic's targets use `lam`
        (decoupled GAE, VC-PPO: `lam` 1.0 for the critic, `policy_lam` 0.95 for the policy).
      adaptive_lam_alpha: if set, the policy's λ is length-adaptive per row (VAPO):
        λ = 1 − 1/(α·l), l the row's action count; `policy_lam` is then unused, except for
        packed rows (several rollouts a row), which keep `policy_lam`.
      use_rollout_old_values: take `old_values` from the data when it has them, instead of
        evaluating the critic on the batch before the update.
    """

    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float | None = 0.2
    loss_type: str = "mse"
    huber_delta: float = 1.0
    reduction: str = "token-mean"
    ppo_epochs: int = 2
    minibatch_size: int = 16
    micro_batches: int = 1
    gae_method: str = "scan"
    policy_lam: float = 0.95
    adaptive_lam_alpha: float | None = None
    use_rollout_old_values: bool = False

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"ppo.gamma must be in [0, 1]. Received: {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"ppo.lam must be in [0, 1]. Received: {self.lam}")
        if not 0.0 <= self.policy_lam <= 1.0:
            raise ValueError(f"ppo.policy_lam must be in [0, 1]. Received: {self.policy_lam}")
        if self.adaptive_lam_alpha is not None and not (
            math.isfinite(self.adaptive_lam_alpha) and self.adaptive_lam_alpha > 0
        ):
            raise ValueError(
                f"ppo.adaptive_lam_alpha must be > 0 or None. Received: {self.adaptive_lam_alpha}"
            )
        if self.clip_eps is not None and not self.clip_eps > 0.0:
            raise ValueError(f"ppo.clip_eps must be > 0 or None. Received: {self.clip_eps}")
        _checks.option("ppo.loss_type", self.loss_type, LOSS_TYPES)
        _checks.option("ppo.reduction", self.reduction, REDUCTIONS)
        _checks.option("ppo.gae_method", self.gae_method, GAE_METHODS)
        if not (self.huber_delta > 0.0 and math.isfinite(self.huber_delta)):
            raise ValueError(f"ppo.huber_delta must be > 0. Received: {self.huber_delta}")
        for name in ("ppo_epochs", "minibatch_size", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1. Received: {getattr(self, name)}")
        if self.minibatch_size % self.micro_batches:
            raise ValueError(
                "ppo.minibatch_size must be divisible by ppo.micro_batches. "
                f"Received: minibatch_size={self.minibatch_size}, "
                f"micro_batches={self.micro_batches}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with global-norm clipping and a linear-warmup + cosine schedule.

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: optimizer updates of linear warmup from 0.
      end_lr_ratio: final learning rate as a fraction of the peak (cosine decay).
      weight_decay: decoupled weight decay.
      b1: Adam's first-moment decay, in [0, 1).
      b2: Adam's second-moment decay, in [0, 1).
      eps: Adam's denominator epsilon, > 0.
      grad_clip: global-norm clip; 0 disables.
    """

    learning_rate: float = 2e-3
    warmup_steps: int = 20
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"optim.learning_rate must be > 0. Received: {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0. Received: {self.warmup_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"optim.end_lr_ratio must be in [0, 1]. Received: {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0. Received: {self.weight_decay}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(
                f"optim.b1 and optim.b2 must be in [0, 1). Received: {self.b1}, {self.b2}"
            )
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"optim.eps must be > 0 and finite. Received: {self.eps}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"optim.grad_clip must be >= 0 and finite. Received: {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"optim.weight_decay must be finite. Received: {self.weight_decay}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Logging and evaluation.

    Attributes:
      every: log metrics every this many iterations.
      eval_every: evaluate against held-out data every this many iterations (0: only at the end).
      eval_rows: held-out rows for evaluation.
      tensorboard: write TensorBoard event files.
    """

    every: int = 10
    eval_every: int = 0
    eval_rows: int = 512
    tensorboard: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1. Received: {self.every}")
        if self.eval_every < 0:
            raise ValueError(f"log.eval_every must be >= 0. Received: {self.eval_every}")
        if self.eval_rows < 1:
            raise ValueError(f"log.eval_rows must be >= 1. Received: {self.eval_rows}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopConfig:
    """Stop before `steps` once the critic has settled (value pretraining, VC-PPO).

    The criterion reads the training batches' explained variance, `1 − Var[R − V] / Var[R]` of
    the critic's values before each update against that update's returns (logged as
    `explained_variance`): it needs no held-out data, so it works on Parquet rollouts too.

    Attributes:
      explained_variance: stop once the explained variance has been at least this for
        `patience` logged iterations in a row; None never stops early.
      patience: consecutive logged iterations (every `log.every`) the threshold must hold.
    """

    explained_variance: float | None = None
    patience: int = 5

    def __post_init__(self):
        ev = self.explained_variance
        if ev is not None and not (math.isfinite(ev) and ev <= 1.0):
            raise ValueError(f"stop.explained_variance must be <= 1 or None. Received: {ev}")
        if self.patience < 1:
            raise ValueError(f"stop.patience must be >= 1. Received: {self.patience}")


def _default_model() -> ModelConfig:
    # HL-Gauss bins (`--model.value-head hl-gauss`) cover the default MRP's returns: its V* lies
    # in [-3.0, 2.9] and sampled returns spread wider.
    return ModelConfig.tiny(vocab_size=DataConfig().mrp.vocab_size, value_min=-6.0, value_max=6.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs.

    Attributes:
      steps: PPO iterations (rollout batches); each is `ppo_epochs * batch_size/minibatch_size`
        optimizer updates inside one jitted call.
      seed: seeds the model, the data order and the minibatch shuffles.
      workdir: metrics, TensorBoard events, checkpoints and `summary.json` go here.
      init_from: a Hugging Face checkpoint directory to start the critic from: a reward model
        (`...ForSequenceClassification`, trunk and score head), a critic
        (`...ForTokenClassification`) or the actor (`...ForCausalLM`, trunk and a zero head). Its
        `config.json` replaces the architecture in `model`; `model`'s dtypes and remat still apply.
    """

    steps: int = 400
    seed: int = 0
    workdir: str = "runs/default"
    init_from: str | None = None
    model: ModelConfig = dataclasses.field(default_factory=_default_model)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    stop: StopConfig = dataclasses.field(default_factory=StopConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1. Received: {self.steps}")
        if not self.workdir:
            raise ValueError(f"workdir must be a non-empty path. Received: {self.workdir!r}")
        batch = self.data.batch_size
        if batch % self.ppo.minibatch_size:
            raise ValueError(
                "data.batch_size must be a multiple of ppo.minibatch_size. "
                f"Received: batch_size={batch}, minibatch_size={self.ppo.minibatch_size}"
            )
        if self.data.path is None and self.model.vocab_size < self.data.mrp.vocab_size:
            raise ValueError(
                "model.vocab_size is smaller than the synthetic data's vocabulary. "
                f"Received: model.vocab_size={self.model.vocab_size}, "
                f"data.mrp.vocab_size={self.data.mrp.vocab_size}"
            )

    @property
    def updates_per_step(self) -> int:
        return self.ppo.ppo_epochs * (self.data.batch_size // self.ppo.minibatch_size)

    def check_mesh(self, num_devices: int, process_count: int = 1) -> tuple[int, int, int]:
        """Validates the mesh against the devices and the batch sizes; returns its shape.

        Raises:
          ValueError: if the mesh does not fill the devices, or a batch does not split evenly over
            the data-parallel degree (data * fsdp), or heads over `tensor`.
        """
        shape = self.mesh.resolve(num_devices)
        data, fsdp, tensor = shape
        dp = data * fsdp
        micro = self.ppo.minibatch_size // self.ppo.micro_batches
        if micro % dp:
            raise ValueError(
                "Each micro-batch (ppo.minibatch_size / ppo.micro_batches rows) must split evenly "
                f"over the data-parallel degree data*fsdp = {data}*{fsdp} = {dp}. Received: "
                f"minibatch_size={self.ppo.minibatch_size}, micro_batches={self.ppo.micro_batches}"
            )
        if self.data.batch_size % dp or self.data.batch_size % process_count:
            raise ValueError(
                f"data.batch_size must be divisible by data*fsdp = {dp} and by the process count "
                f"{process_count}. Received: batch_size={self.data.batch_size}"
            )
        for name in ("num_heads", "num_kv_heads"):
            heads = getattr(self.model, name)
            if heads % tensor:
                raise ValueError(
                    f"model.{name} must be divisible by mesh.tensor. "
                    f"Received: {name}={heads}, tensor={tensor}"
                )
        if self.model.mlp_dim % tensor or self.model.vocab_size % tensor:
            raise ValueError(
                "model.mlp_dim and model.vocab_size must be divisible by mesh.tensor. Received: "
                f"mlp_dim={self.model.mlp_dim}, vocab_size={self.model.vocab_size}, tensor={tensor}"
            )
        if self.model.d_model % fsdp:
            raise ValueError(
                "model.d_model must be divisible by mesh.fsdp. "
                f"Received: d_model={self.model.d_model}, fsdp={fsdp}"
            )
        return shape


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def with_preset(model: ModelConfig, name: str) -> ModelConfig:
    """`model` with the shape of preset `name` (its numerics, head and remat settings kept), so
    that `--model.preset NAME` sets the shape and every other `--model.*` flag one field."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown model.preset {name!r}; valid: {', '.join(PRESETS)}. Received: {name!r}"
        )
    shape = set(PRESETS[name])
    keep = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in shape and f.name != "preset"
    }
    return ModelConfig(preset=name, **keep)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raises unless `value` (from JSON) fits the field's type hint (int for float is fine)."""
    allowed = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t in (str, bool) and isinstance(value, t):
            return
        if t is str and isinstance(value, bool):  # older boolean options (model.remat)
            return
    names = " or ".join(
        "null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed
    )
    raise ValueError(f"Config key {name!r} must be {names}. Received: {value!r}")


def from_dict(
    cls: type, values: dict[str, Any], *, base: Any | None = None, prefix: str = ""
) -> Any:
    """Builds config `cls` from a (partial, nested) dict over `base` (default: `cls()`).

    Unknown keys raise ValueError naming them, so a typo in a config file never passes silently.
    """
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    updates = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(
                f"Unknown config key {prefix + key!r} for {cls.__name__}; valid: "
                f"{', '.join(fields)}. Received: {key!r}"
            )
        current = getattr(base, key)
        where = f"{prefix}{key}"
        if dataclasses.is_dataclass(current) or dataclasses.is_dataclass(hints.get(key)):
            if not isinstance(value, dict):
                raise ValueError(
                    f"Config key {where!r} is a section and needs a JSON object. "
                    f"Received: {value!r}"
                )
            section = type(current) if dataclasses.is_dataclass(current) else hints[key]
            kwargs = {"base": current} if dataclasses.is_dataclass(current) else {}
            if section is ModelConfig and isinstance(value.get("preset"), str):
                kwargs["base"] = with_preset(current or ModelConfig(), value["preset"])
            updates[key] = from_dict(section, value, prefix=f"{where}.", **kwargs)
        else:
            _check_type(where, value, hints[key])
            updates[key] = value
    return dataclasses.replace(base, **updates)


def load(path: str | Path, *, base: TrainConfig | None = None) -> TrainConfig:
    """Reads a JSON config file (a partial nested dict) over `base`.

    Raises:
      ValueError: on an unreadable file, invalid JSON, unknown keys or invalid values.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"Cannot read config file {path}: {e.strerror}. Received: {path}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {path} is not valid JSON: {e}. Received: {path}") from e
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a JSON object. Received: {type(values)}")
    return from_dict(TrainConfig, values, base=base)
