"""Update throughput against the number of devices, and parameter memory per device under fsdp.

Each device count n runs in its own process (`jax_num_cpu_devices` must be set before JAX starts):
the trainer's own set-up (`train.build_critic`, `init_state`, `make_trainer`) builds the state,
and its one jitted update is timed over a few rollout batches on a mesh data=n (pure data
parallelism) and on a mesh fsdp=n, where the bytes of parameter (and AdamW state) shards that live
on device 0 are also counted. The devices here are fake CPU devices that share this machine's
cores, so throughput cannot grow with n: the measurement shows the cost of the partitioned
program and its collectives, not a speed-up. The memory numbers are exact on any hardware.

    python experiments/exp_scaling.py                 # ~4 minutes on 2 cores
    python experiments/exp_scaling.py --devices 1 2 4 8 16 --iterations 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_MARK = "RESULT "


def worker(n: int, iterations: int, fsdp_throughput: bool) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", n)

    from critic_jax import data as data_lib
    from critic_jax import parallel, train
    from critic_jax.config import TrainConfig, from_dict

    assert len(jax.devices()) == n, jax.devices()
    out = {"devices": n, "cores": os.cpu_count()}

    def config_for(data: int, fsdp: int) -> TrainConfig:
        return from_dict(TrainConfig, {"steps": iterations, "mesh": {"data": data, "fsdp": fsdp}})

    def bytes_on(tree, device) -> int:
        return sum(
            s.data.nbytes
            for leaf in jax.tree.leaves(tree)
            for s in leaf.addressable_shards
            if s.device == device
        )

    def set_up(config: TrainConfig):
        """The trainer's own set-up: parameters and state placed on the mesh, the update jitted."""
        mesh = parallel.make_mesh(config.mesh)
        config.check_mesh(mesh.size)
        graphdef, params = train.build_critic(config, mesh)
        state = train.init_state(config, mesh, params)
        return mesh, state, train.make_trainer(config, mesh, graphdef, state)

    def throughput(config: TrainConfig) -> dict:
        mesh, state, trainer = set_up(config)
        it = data_lib.make_rollout_iterator(config.data, seed=0, gamma=config.ppo.gamma)
        vocab = config.model.vocab_size
        batches = [
            parallel.make_global_batch(
                train.host_batch(next(it), trainer.batch_keys, vocab_size=vocab), mesh
            )
            for _ in range(iterations + 1)
        ]
        t0 = time.perf_counter()
        compiled = trainer.update.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batches[0])  # warm-up
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[1:]:
            state, m = compiled(state, b)
        jax.block_until_ready((state, m))
        dt = time.perf_counter() - t0
        tokens = config.data.batch_size * config.data.mrp.seq_len
        return {
            "compile_seconds": compile_s,
            "iterations_per_second": iterations / dt,
            "updates_per_second": iterations * config.updates_per_step / dt,
            "tokens_per_second": iterations * tokens / dt,
        }

    out.update({f"dp_{k}": v for k, v in throughput(config_for(n, 1)).items()})

    config = config_for(1, n)
    _, state, _ = set_up(config)
    dev0 = jax.devices()[0]
    out["param_bytes_total"] = sum(x.nbytes for x in jax.tree.leaves(state.params))
    out["param_bytes_device0"] = bytes_on(state.params, dev0)
    out["opt_state_bytes_device0"] = bytes_on(state.opt_state, dev0)
    out["param_count"] = sum(x.size for x in jax.tree.leaves(state.params))
    if fsdp_throughput:
        out.update({f"fsdp_{k}": v for k, v in throughput(config).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--iterations", type=int, default=20, help="timed PPO iterations")
    parser.add_argument(
        "--no-fsdp-throughput", dest="fsdp_throughput", action="store_false", help="skip fsdp=n"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        result = worker(args.worker, args.iterations, args.fsdp_throughput)
        print(_MARK + json.dumps(result), flush=True)
        return

    from _common import log, save_figure, subplots, write_csv

    rows = []
    for n in args.devices:
        log(f"{n} fake CPU devices: starting a worker process")
        cmd = [sys.executable, __file__, "--worker", str(n), "--iterations", str(args.iterations)]
        if not args.fsdp_throughput:
            cmd.append("--no-fsdp-throughput")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"worker for {n} devices failed (exit {proc.returncode})")
        row = json.loads(lines[-1][len(_MARK) :])
        rows.append(row)
        log(
            f"  data={n}: {row['dp_updates_per_second']:.1f} updates/s, "
            f"{row['dp_tokens_per_second']:.0f} tokens/s "
            f"(compile {row['dp_compile_seconds']:.0f}s);"
            f" fsdp={n}: params on device 0 {row['param_bytes_device0'] / 1024:.1f} KiB of "
            f"{row['param_bytes_total'] / 1024:.1f} KiB"
        )
    write_csv("exp_scaling.csv", rows)

    fig, axes = subplots(1, 2, figsize=(10, 3.4))
    ns = [r["devices"] for r in rows]
    axes[0].plot(ns, [r["dp_updates_per_second"] for r in rows], "o-", label="data = n")
    if args.fsdp_throughput:
        axes[0].plot(ns, [r["fsdp_updates_per_second"] for r in rows], "s-", label="fsdp = n")
    axes[0].set_title(f"optimizer updates / s ({rows[0]['cores']} CPU cores shared)")
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    kib = [r["param_bytes_device0"] / 1024 for r in rows]
    axes[1].plot(ns, kib, "o-", label="params on device 0")
    axes[1].plot(ns, [r["opt_state_bytes_device0"] / 1024 for r in rows], "s-", label="AdamW state")
    axes[1].plot(ns, [rows[0]["param_bytes_total"] / 1024 / n for n in ns], "k:", label="total / n")
    axes[1].set_title("memory per device under fsdp = n (KiB)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("fake CPU devices n")
    save_figure(fig, "exp_scaling.png")


if __name__ == "__main__":
    main()
