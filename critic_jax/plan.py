"""Will a run fit? The real update, lowered and compiled ahead of time on abstract inputs.

`plan(config, seq_len=..., target=...)` builds the trainer's own jitted update
(`train.make_trainer`) over an abstract state (`train.abstract_state`: `jax.ShapeDtypeStruct`s,
nothing allocated) and an abstract `[batch_size, seq_len]` batch, compiles it for the target's
devices and reads the compiler's per-device memory figures and FLOP count. Targets:

- `cpu`: this machine's CPU with `devices` fake devices (set before JAX starts; see the CLI).
  CPU figures overstate accelerator memory (XLA:CPU does not rematerialise to save memory).
- `tpu-<chip>:<topology>` (e.g. `tpu-v5e:2x4`, `tpu-v5p:2x2x2`): libtpu's compile-only devices
  (the `tpu` extra: `jax[tpu]`, the libtpu release the installed jax pins); no TPU is needed,
  and the figures are the TPU compiler's own. They are those of one libtpu release: another
  schedules the same program differently (Qwen2.5-0.5B at T = 32768 on v5e 2x4 peaks at
  7.33 GiB a chip with libtpu 0.0.42.1, the release jax 0.10.2 pins, and at 6.45 GiB with
  0.0.52), so the report names the compiler and says when it is not the pinned one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax.config import TrainConfig

GIB = 2**30
# High-bandwidth memory of one chip, for `fits` when --device-memory is not given.
TPU_MEMORY = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# The TPU compiler's refusal of a program whose temporaries exceed the chip's memory.
_OOM = re.compile(r"HLO temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G")
_TARGET = re.compile(r"^tpu-(?P<chip>v[0-9]+[a-z]*):(?P<topology>[0-9]+(x[0-9]+)+)$")


def parse_bytes(text: str) -> int:
    """'80GiB', '16GB', '512MiB', '1e9' -> a positive number of bytes.

    Raises:
      ValueError: on anything else, including zero, a negative or an infinite size.
    """
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", text)
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    scale.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})
    try:
        size = float(m[1]) * scale[m[2] or "B"]
    except (TypeError, ValueError):  # no match, or no number ('.', 'e')
        size = math.nan
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(
            f"Cannot read a memory size from {text!r}: a positive number of bytes with an "
            f"optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 80GiB. Received: {text!r}"
        )
    return int(size)


def compiler_version(target: str) -> tuple[str, str | None]:
    """(the compiler that `target` compiles with, e.g. "libtpu 0.0.42.1"; a warning when that
    libtpu is not the release the installed jax pins for TPUs, else None)."""
    version = importlib.metadata.version
    if target == "cpu":
        return f"jaxlib {version('jaxlib')}", None
    try:
        found = version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "libtpu (version unknown)", None
    requirements = [
        r.replace(" ", "").replace("'", '"') for r in importlib.metadata.requires("jax") or []
    ]
    pins = [
        r.split(";")[0][len("libtpu==") :]
        for r in requirements
        if r.startswith("libtpu==") and 'extra=="tpu"' in r
    ]
    pinned = pins[0] if pins else None
    prefix = pinned[:-2] if pinned and pinned.endswith(".*") else None  # PEP 440 "==X.*"
    if pinned is None or found in (pinned, prefix) or (prefix and found.startswith(prefix + ".")):
        return f"libtpu {found}", None
    return f"libtpu {found}", (
        f"libtpu {found} is not the release jax {version('jax')} pins ({pinned}); another release "
        f"may compile the update to a different peak: pip install 'jax[tpu]=={version('jax')}'"
    )


def target_devices(target: str) -> tuple[list[Any], int | None]:
    """(devices, memory per device in bytes or None) of `target`.

    Raises:
      ValueError: on an unknown target, or a TPU target without libtpu.
    """
    if target == "cpu":
        return jax.devices("cpu"), None
    m = _TARGET.match(target)
    if not m:
        raise ValueError(
            f"Unknown plan target {target!r}; valid: cpu, or tpu-<chip>:<topology> such as "
            f"tpu-v5e:2x4 or tpu-v5p:2x2x2. Received: {target!r}"
        )
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(
            f"Target {target!r} compiles with libtpu's compile-only devices: pip install "
            f"'critic_jax[tpu]' (or 'jax[tpu]'). Received: {target!r}"
        ) from None
    from jax.experimental import topologies

    # Compile-only clients of several processes may share libtpu; no TPU host to discover.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{m['chip']}:{m['topology']}"
        )
    except Exception as e:  # noqa: BLE001 - libtpu's own words on a chip or shape it lacks
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"libtpu cannot make the TPU topology of target {target!r} ({reason}); examples: "
            f"tpu-v5e:2x4, tpu-v5p:2x2x2, tpu-v6e:2x4. Received: {target!r}"
        ) from None
    return list(topology.devices), TPU_MEMORY.get(m["chip"])


def model_flops_per_token(config: TrainConfig, seq_len: int) -> float:
    """Matmul FLOPs of one PPO iteration per rollout token: the old-values forward pass plus
    `ppo_epochs` forward and backward passes (3x forward), causal attention at its average
    context of T/2; recomputation under remat is not counted (model FLOPs, as for MFU)."""
    m = config.model
    per_layer = (
        m.d_model * m.num_heads * m.head_dim * 2  # q and o
        + m.d_model * m.num_kv_heads * m.head_dim * 2  # k and v
        + 3 * m.d_model * m.mlp_dim
    )
    head = m.value_bins if m.value_head == "hl-gauss" else 1
    forward = 2 * (m.num_layers * per_layer + m.d_model * head)
    forward += m.num_layers * 2 * 2 * m.num_heads * m.head_dim * seq_len / 2
    return float(forward * (1 + 3 * config.ppo.ppo_epochs))


def plan(
    config: TrainConfig,
    *,
    seq_len: int,
    target: str = "cpu",
    device_memory: int | None = None,
) -> dict[str, Any]:
    """Compiles one PPO iteration's update of `config` for `target` and reports its cost.

    Args:
      config: the run, as `critic-jax train` would take it (mesh, model, batch sizes, PPO).
      seq_len: the rollout width T.
      target: "cpu" or a TPU topology such as "tpu-v5e:2x4".
      device_memory: bytes of memory per device for `fits`; None: the chip's HBM for TPU
        targets, unknown (fits None) for CPU.

    Returns:
      A JSON-ready dict: target, devices, mesh, tokens per iteration, per-device
      `argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes`, `peak_bytes_per_device`,
      `compile_seconds`, `flops_per_token` (`model_flops_per_token`: matmul FLOPs of the
      whole iteration per token), `compiled_flops_per_token` (the compiler's cost analysis,
      which counts the body of each loop, the scanned layers and minibatches, once),
      `device_memory`, `fits`, `compiler` (e.g. "libtpu 0.0.42.1"), and `compiler_warning`
      when that libtpu is not the release the installed jax pins.

    Raises:
      ValueError: on an invalid target, mesh or config.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1. Received: {seq_len}")
    devices, chip_memory = target_devices(target)
    if config.mesh.num_devices > 0:
        if config.mesh.num_devices > len(devices):
            raise ValueError(
                f"mesh.num_devices={config.mesh.num_devices} but the target has {len(devices)} "
                f"devices. Received: {config.mesh.num_devices}"
            )
        devices = devices[: config.mesh.num_devices]
    shape = config.check_mesh(len(devices))
    mesh = jax.sharding.Mesh(
        np.asarray(devices).reshape(shape),
        parallel.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES),
    )
    if target != "cpu" and config.model.attention == "auto":
        # "auto" decides by the process's backend, which is the CPU here.
        model = dataclasses.replace(config.model, attention="splash")
        config = dataclasses.replace(config, model=model)
    config = train_lib.resolve_config(config)
    train_lib.check_attention(config, mesh)
    train_lib.check_param_dtype(config)
    t0 = time.perf_counter()
    graphdef, state = train_lib.abstract_state(config, mesh)
    trainer = train_lib.make_trainer(config, mesh, graphdef, state)
    rows = config.data.batch_size
    batch = {
        k: jax.ShapeDtypeStruct(
            (rows, seq_len),
            np.int32 if k in ("tokens", "attention_mask", "segment_ids") else np.float32,
            sharding=parallel.batch_sharding(mesh, 2),
        )
        for k in trainer.batch_keys
    }
    with train_lib.mesh_context(mesh):
        lowered = trainer.update.lower(state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses what cannot fit
            oom = _OOM.search(str(e))
            if oom is None:
                raise
            compiled = None
    compile_seconds = time.perf_counter() - t0
    report = {
        "target": target,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(zip(parallel.MESH_AXES, shape, strict=True)),
        "seq_len": seq_len,
        "tokens_per_iteration": config.data.batch_size * seq_len,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
    }
    report["compiler"], warning = compiler_version(target)
    if warning is not None:
        report["compiler_warning"] = warning
    if compiled is None:  # the compiler's own verdict: the temporaries alone exceed the chip
        temp, hbm = float(oom[1]) * GIB, float(oom[2]) * GIB
        return {
            **report,
            "temp_bytes": int(temp),
            "peak_bytes_per_device": int(temp),
            "compile_seconds": compile_seconds,
            "flops_per_token": model_flops_per_token(config, seq_len),
            "device_memory": int(device_memory if device_memory is not None else hbm),
            "fits": False,
            "note": "the compiler refused: " + " ".join(oom[0].split()),
        }
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float((cost or {}).get("flops", float("nan"))) * len(devices)
    # Arguments and outputs live throughout (minus the donated ones), temporaries on top; the
    # compiler's own peak, where it reports one above that, wins.
    peak = max(
        int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes,
    )
    limit = device_memory if device_memory is not None else chip_memory
    tokens = rows * seq_len
    return {
        **report,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes_per_device": int(peak),
        "compile_seconds": compile_seconds,
        "flops_per_token": model_flops_per_token(config, seq_len),
        "compiled_flops_per_token": flops / tokens,
        "device_memory": limit,
        "fits": None if limit is None else bool(peak <= limit),
    }
