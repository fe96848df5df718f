"""Host memory of loading a Hugging Face checkpoint onto a mesh: sliced reads against a whole load.

Writes a ~0.5 GB float32 Llama-shaped checkpoint (`critic_to_hf`; vocab 32000, width 1024,
8 layers, MLP 2816: 126 M parameters), then, in a fresh process per way of loading with 8 fake
CPU devices and an `fsdp = 8` mesh, measures the process's resident memory (`VmRSS`, and its
peak `VmHWM`, from /proc/self/status) before and after:

- `sliced`: `critic_from_hf(path, shardings=...)`, the trainer's way: each device's slice of each
  tensor is read from the file on its own, so no host ever holds the whole model;
- `whole`: `critic_from_hf(path)` onto one device, then `jax.device_put` onto the same shardings
  (what a loader without slicing does).

On CPU the devices' buffers live in host memory, so both end with the model's bytes resident;
the difference is the peak on the way there.

    python experiments/bench_load.py [--layers 8] [--vocab 32000] [--results DIR]

Writes bench_load.{csv,md} to experiments/results/ (or `--results DIR`). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
WAYS = ("sliced", "whole")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(way: str, path: str) -> None:
    """Loads `path` one way in this (fresh) process and prints one JSON line of memory figures."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import nnx

    from critic_jax import parallel
    from critic_jax.models import critic_from_hf

    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=8))
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # the backend started
    before = _status_kib("VmRSS")
    if way == "sliced":
        critic = critic_from_hf(path, shardings=lambda p: parallel.state_shardings(p, mesh))
        params = nnx.state(critic, nnx.Param)
    else:
        critic = critic_from_hf(path)
        params = nnx.state(critic, nnx.Param)
        params = jax.device_put(params, parallel.state_shardings(params, mesh))
        del critic
    jax.block_until_ready(params)
    leaves = jax.tree.leaves(params)
    print(
        json.dumps(
            {
                "way": way,
                "parameters": int(sum(x.size for x in leaves)),
                "model_mib": sum(x.size * x.dtype.itemsize for x in leaves) / MIB,
                "devices_holding_the_embedding": len(
                    params["backbone"]["embed"][...].sharding.device_set
                ),
                "rss_before_mib": before / 1024,
                "peak_above_start_mib": (_status_kib("VmHWM") - before) / 1024,
                "resident_after_mib": (_status_kib("VmRSS") - before) / 1024,
            }
        )
    )


def write_checkpoint(path: Path, layers: int, vocab: int) -> int:
    """A float32 Llama-shaped critic of `layers` layers written to `path`; returns its bytes."""
    import dataclasses

    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    from flax import nnx

    from critic_jax.models import Critic, ModelConfig, critic_to_hf

    config = dataclasses.replace(
        ModelConfig.tiny(vocab_size=vocab),
        d_model=1024,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=2816,
    )
    critic_to_hf(Critic(config, rngs=nnx.Rngs(0)), path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "critic"
        size = write_checkpoint(path, args.layers, args.vocab)
        print(f"checkpoint: {size / 1e6:.0f} MB of safetensors at {path}")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        for way in WAYS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, str(path)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=900,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["checkpoint_mb"] = size / 1e6
            rows.append(row)
            print(row)
    args.results.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(args.results / "bench_load.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    head = ["way", "checkpoint MB", "model MiB", "peak above start MiB", "resident after MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['checkpoint_mb']:.0f} | {r['model_mib']:.0f} | "
            f"{r['peak_above_start_mib']:.0f} | {r['resident_after_mib']:.0f} |"
        )
    table = "\n".join(lines)
    (args.results / "bench_load.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
