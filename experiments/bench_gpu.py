"""The critic update on one NVIDIA GPU: tokens/s, model FLOPs utilisation, peak memory, and cuDNN
attention against the XLA path. A prepared script of a few minutes for a lent H100/H200.

    python experiments/bench_gpu.py                       # Llama-3.2-1B shape, T = 4096, bf16
    python experiments/bench_gpu.py --preset qwen2.5-0.5b --seq-len 8192 --steps 4
    python experiments/bench_gpu.py --attention xla --preset default --layers 1 --seq-len 64 \
        --batch 2 --steps 1                                # a smoke test on any backend

It builds the trainer's own update (`train.make_trainer`: old values, GAE, epochs x minibatches,
AdamW, the state donated) for the preset at `--seq-len`, bf16 compute with float32 master
parameters, full remat and `model.attention="cudnn"`, times `--steps` updates after one warm-up,
and prints one JSON line. MFU = model FLOPs of the update (`plan.model_flops_per_token`: the
old-values forward and `ppo_epochs` forward + backward passes; remat recomputation not counted)
per second over the chip's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax import parallel
from critic_jax import train as train_lib
from critic_jax.config import PPOConfig, TrainConfig, with_preset
from critic_jax.data import DataConfig
from critic_jax.models import ModelConfig
from critic_jax.models.attention import dot_product_attention
from critic_jax.plan import model_flops_per_token

# Dense bf16 peak of one chip (FLOP/s), by the start of `device_kind`.
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def attention_agreement(seq_len: int) -> dict[str, float]:
    """Max |cuDNN - XLA flash| of one packed bf16 attention call and of its q-gradient."""
    rng = np.random.default_rng(0)
    b, n, g, h = 2, 8, 2, 64
    q = jnp.asarray(rng.normal(size=(b, seq_len, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(b, seq_len, g, h)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(b, seq_len, g, h)), jnp.bfloat16)
    seg = np.ones((b, seq_len), np.int32)
    seg[0, seq_len // 3 :] = 2  # two packed sequences in row 0
    seg[1, -seq_len // 4 :] = 0  # right padding in row 1

    def run(impl):
        def loss(q):
            out = dot_product_attention(q, k, v, jnp.asarray(seg), implementation=impl)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        (_, out), dq = jax.jit(jax.value_and_grad(loss, has_aux=True))(q)
        return np.asarray(out, np.float32), np.asarray(dq, np.float32)

    out_c, dq_c = run("cudnn")
    out_x, dq_x = run("xla-flash")
    return {
        "attention_max_abs_diff": float(np.abs(out_c - out_x).max()),
        "attention_grad_max_abs_diff": float(np.abs(dq_c - dq_x).max()),
        "attention_grad_scale": float(np.abs(dq_x).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="llama3.2-1b", help="a model preset, or 'default' (the tiny CLI model)"
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="rows per update (one minibatch)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test)")
    parser.add_argument("--attention", default="cudnn")
    args = parser.parse_args()

    device = jax.devices()[0]
    if args.attention == "cudnn" and device.platform != "gpu":
        sys.exit(
            f"bench_gpu: the cuDNN attention needs an NVIDIA GPU; this backend is "
            f"{device.platform}. A smoke test elsewhere: --attention xla --preset default "
            "--layers 1 --seq-len 64 --batch 2 --steps 1"
        )
    base = ModelConfig() if args.preset == "default" else with_preset(ModelConfig(), args.preset)
    model = dataclasses.replace(
        base,
        dtype="bfloat16",
        param_dtype="float32",
        remat=args.remat,
        attention=args.attention,
    )
    if args.layers is not None:
        model = dataclasses.replace(model, num_layers=args.layers)
    config = TrainConfig(
        steps=args.steps + 1,
        model=model,
        ppo=PPOConfig(ppo_epochs=1, minibatch_size=args.batch),
        data=dataclasses.replace(DataConfig(), batch_size=args.batch),
        mesh=parallel.MeshConfig(data=1, num_devices=1),
    )
    mesh = parallel.make_mesh(config.mesh)
    graphdef, params = train_lib.build_critic(config, mesh)
    state = train_lib.init_state(config, mesh, params)
    trainer = train_lib.make_trainer(config, mesh, graphdef, state)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len)
    mask = np.zeros(shape, np.float32)
    mask[:, args.seq_len // 8 :] = 1.0  # a prompt, then the response
    batch = {
        "tokens": rng.integers(1, model.vocab_size, shape).astype(np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "mask": mask,
        "rewards": (rng.normal(size=shape) * mask).astype(np.float32),
    }
    batch = parallel.make_global_batch({k: batch[k] for k in trainer.batch_keys}, mesh)
    with train_lib.mesh_context(mesh):
        t0 = time.perf_counter()
        compiled = trainer.update.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq_len
    flops = model_flops_per_token(config, args.seq_len) * tokens
    peak = next((v for k, v in PEAK_BF16.items() if device.device_kind.startswith(k)), None)
    stats = device.memory_stats() or {}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device.device_kind,
        "preset": args.preset,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "remat": args.remat,
        "compile_seconds": compile_s,
        "seconds_per_update": seconds,
        "tokens_per_second": tokens / seconds,
        "model_tflops_per_second": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "loss": float(metrics["loss"]),
    }
    if device.platform == "gpu":
        report.update(attention_agreement(min(args.seq_len, 4096)))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
