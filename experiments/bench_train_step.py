"""Critic train-step throughput: critic_jax's update against a PyTorch reference, in one run.

Both sides take one optimizer step on the same problem: a Llama critic (hidden 256, 4 layers,
4 heads, MLP 688, vocab 32000), a batch of 8 x 512 tokens, float32, the clipped masked value loss
and AdamW. The JAX side is the trainer's own set-up and jitted update (`critic_jax.train`'s
`build_critic`, `init_state`, `make_trainer` around `critic_jax.update.make_update`: GAE, the
loss, gradient-norm clipping, AdamW with its schedule, the non-finite guard, the state donated)
with one optimizer step per call, once with the minibatch in one piece and once split
into micro-batches of one sequence (gradient accumulation inside the jit: the same gradient). The
PyTorch side is transformers' `LlamaModel` (SDPA attention) + `Linear(hidden, 1)` +
`torch.optim.AdamW`, the reference being the whole batch in one piece; the same split into
micro-batches is timed too, so both frameworks get the same trick. Also measured: each
framework's float32 matmul peak on this machine (a 2048 x 2048 matmul), the model's training
FLOPs per token, the fraction of the peak each step reaches, and the compile time of the first
JAX update. Every JAX function is jitted with the compiler options the trainer uses
(`critic_jax.parallel.compiler_options`). A last row, the matmul floor, runs only the update's
matrix products (the same shapes, micro-batches and backward, with no norm, softmax, rope, loss
or optimizer): the time no implementation of this step can beat on this machine; each row's
`times_floor` is its time over the floor's. The implementations are timed in alternating rounds,
so a change in the machine's load hits all of them alike; in each round an implementation runs
three times back to back and the last two are timed (steps of a training loop, each after a step
of its own, not after another framework's).

    python experiments/bench_train_step.py [--batch 8] [--seq 512] [--micro 8] [--repeats 7]

Writes bench_train_step.{csv,md} to experiments/results/ (or `--results DIR`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax import parallel, train
from critic_jax.config import PPOConfig, TrainConfig
from critic_jax.data import DataConfig
from critic_jax.models import ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"


def model_config() -> ModelConfig:
    return dataclasses.replace(
        ModelConfig.tiny(vocab_size=32000),
        d_model=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        mlp_dim=688,
    )


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only.

    Per layer: q/k/v/o projections, the SwiGLU MLP, and attention scores and mixing (causal: on
    average half of the keys, counted in full as is usual for MFU). The embedding is a lookup and
    the value head is negligible.
    """
    d, h, kv, hd, m = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    proj = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = 3 * d * m
    attn = 2 * seq * h * hd
    return 3 * 2 * cfg.num_layers * (proj + mlp + attn)


def compiler_options() -> dict[str, str]:
    """The compiler options the trainer jits its update with on one device of this machine."""
    return parallel.compiler_options(parallel.make_mesh(None, jax.devices()[:1]))


def jax_matmul(n: int = 2048) -> Callable[[], None]:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x, compiler_options=compiler_options())
    return lambda: f(a).block_until_ready()


def jax_update(cfg: ModelConfig, batch: int, seq: int, micro: int):
    """The trainer's update for one optimizer step; returns (step function, compile seconds)."""
    config = TrainConfig(
        steps=1000,
        model=cfg,
        ppo=PPOConfig(
            minibatch_size=batch, micro_batches=micro, ppo_epochs=1, use_rollout_old_values=True
        ),
        data=DataConfig(batch_size=batch),
    )
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, params = train.build_critic(config, mesh)
    state = train.init_state(config, mesh, params)
    trainer = train.make_trainer(config, mesh, graphdef, state)
    rng = np.random.default_rng(0)
    local = {
        "tokens": rng.integers(0, cfg.vocab_size, (batch, seq)),
        "attention_mask": np.ones((batch, seq)),
        "mask": np.ones((batch, seq)),
        "rewards": rng.normal(size=(batch, seq)) * 0.1,
        "old_values": rng.normal(size=(batch, seq)),
    }
    local = train.host_batch(local, trainer.batch_keys, vocab_size=cfg.vocab_size)
    data = parallel.make_global_batch(local, mesh)
    t0 = time.perf_counter()
    compiled = trainer.update.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        new_state, metrics = compiled(holder[0], data)
        metrics["loss"].block_until_ready()
        holder[0] = new_state

    return run, compile_s


def jax_matmul_floor(cfg: ModelConfig, batch: int, seq: int, micro: int) -> Callable[[], None]:
    """The update's matmuls alone: per micro-batch, the forward and backward of every layer's
    q/k/v/o projections, block-causal attention products and SwiGLU MLP with the nonlinearities,
    norms and softmax left out (only the gate * up product and the residual adds remain), the
    gradients accumulated over micro-batches as in the trainer. No loss, GAE or optimizer."""
    d, n, g, hd, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    block = cfg.attention_block_size or seq
    rng = np.random.default_rng(0)

    def weight(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.02, jnp.float32)

    layers = [
        {
            "q": weight(d, n, hd),
            "k": weight(d, g, hd),
            "v": weight(d, g, hd),
            "o": weight(n, hd, d),
            "gate": weight(d, f),
            "up": weight(d, f),
            "down": weight(f, d),
        }
        for _ in range(cfg.num_layers)
    ]

    def layer(p, x_btd):
        q_bnth = jnp.einsum("btd,dnh->bnth", x_btd, p["q"])
        k_bnsh = jnp.repeat(jnp.einsum("btd,dgh->bgth", x_btd, p["k"]), n // g, axis=1)
        v_bnsh = jnp.repeat(jnp.einsum("btd,dgh->bgth", x_btd, p["v"]), n // g, axis=1)
        out_bnth = jnp.concatenate(
            [
                jnp.einsum(
                    "bnqs,bnsh->bnqh",
                    jnp.einsum(
                        "bnqh,bnsh->bnqs", q_bnth[:, :, lo : lo + block], k_bnsh[:, :, : lo + block]
                    ),
                    v_bnsh[:, :, : lo + block],
                )
                for lo in range(0, seq, block)
            ],
            axis=2,
        )
        x_btd = x_btd + jnp.einsum("bnth,nhd->btd", out_bnth, p["o"])
        return x_btd + ((x_btd @ p["gate"]) * (x_btd @ p["up"])) @ p["down"]

    def loss(params, x_btd):
        for p in params:
            x_btd = layer(p, x_btd)
        return jnp.sum(x_btd)

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def step(params, x_mbtd):
        def accumulate(acc, x_btd):
            return jax.tree.map(jnp.add, acc, jax.grad(loss)(params, x_btd)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(accumulate, zeros, x_mbtd)[0]

    x = jnp.asarray(rng.normal(size=(micro, batch // micro, seq, d)), jnp.float32)
    return lambda: jax.block_until_ready(step(layers, x))


def torch_update(cfg: ModelConfig, batch: int, seq: int, micro: int):
    """transformers LlamaModel of the same shape as `cfg` + linear head + the clipped masked loss
    + AdamW, one step; the batch split into `micro` accumulated chunks. None when torch or
    transformers are missing."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaModel
    except ImportError:
        return None
    torch.manual_seed(0)
    body = LlamaModel(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=seq,
            attn_implementation="sdpa",
        )
    )
    head = torch.nn.Linear(cfg.d_model, 1)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq)
    old = torch.randn(batch, seq)
    ret = torch.randn(batch, seq)

    def run():
        opt.zero_grad(set_to_none=True)
        for rows in torch.arange(batch).chunk(micro):
            values = head(body(tokens[rows]).last_hidden_state).squeeze(-1)
            vc = old[rows] + (values - old[rows]).clamp(-0.2, 0.2)
            loss = torch.max((vc - ret[rows]) ** 2, (values - ret[rows]) ** 2)
            m = mask[rows]
            loss = 0.5 * ((loss * m).sum(-1) / m.sum(-1)).sum() / batch
            loss.backward()
        opt.step()

    return run


def torch_matmul(n: int = 2048) -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n)
    return lambda: a @ a


def alternate(fns: dict[str, Callable[[], None]], repeats: int, calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds.

    In each round every function runs `1 + calls` times back to back and only the last `calls`
    are timed: the untimed lead-in absorbs what the previous function left behind (XLA:CPU
    returns an update's scratch memory to the system after each call), so each function is timed
    as it runs in a training loop, after a step of its own.
    """
    for fn in fns.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=8, help="micro-batches of the split rows")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the tables go")
    args = ap.parse_args()
    cfg = model_config()
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    print(f"devices: {jax.devices()}  model FLOPs/token (train): {fpt / 1e6:.1f} M")
    # Both matmul peaks in alternating rounds, before anything else runs.
    matmuls = {"jax": jax_matmul(), "torch": torch_matmul()}
    matmuls = {name: fn for name, fn in matmuls.items() if fn is not None}
    peaks = {name: 2 * 2048**3 / t for name, t in alternate(matmuls, 2 * args.repeats).items()}
    peak = peaks["jax"]
    print(f"float32 matmul peaks (GFLOP/s): { {k: round(v / 1e9) for k, v in peaks.items()} }")
    impls: dict[str, tuple[Callable[[], None], float, float]] = {}
    for micro in (1, args.micro):
        run, compile_s = jax_update(cfg, args.batch, args.seq, micro)
        impls[f"critic_jax update, {micro} micro-batch(es)"] = (run, peak, compile_s)
        print(f"compiled the update with {micro} micro-batch(es) in {compile_s:.1f} s")
    reference = "PyTorch + transformers, whole batch (reference)"
    torch_whole = torch_update(cfg, args.batch, args.seq, 1)
    if torch_whole is not None:
        torch_peak = peaks["torch"]
        impls[reference] = (torch_whole, torch_peak, 0.0)
        impls[f"PyTorch + transformers, {args.micro} micro-batches"] = (
            torch_update(cfg, args.batch, args.seq, args.micro),
            torch_peak,
            0.0,
        )
    floor = f"matmul floor: the update's matmuls alone, {args.micro} micro-batches"
    impls[floor] = (
        jax_matmul_floor(cfg, args.batch, args.seq, args.micro),
        peak,
        0.0,
    )
    seconds = alternate({name: fn for name, (fn, _, _) in impls.items()}, args.repeats, calls=2)
    rows = []
    for name, (_, impl_peak, compile_s) in impls.items():
        t = seconds[name]
        row = {
            "impl": name,
            "ms_per_step": t * 1e3,
            "tokens_per_s": tokens / t,
            "gflops": fpt * tokens / t / 1e9,
            "matmul_peak_gflops": impl_peak / 1e9,
            "fraction_of_peak": fpt * tokens / t / impl_peak,
            "compile_s": compile_s,
        }
        if reference in seconds:
            row["speedup_vs_reference"] = seconds[reference] / t
        row["times_floor"] = t / seconds[floor]
        rows.append(row)
    args.results.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(args.results / "bench_train_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                f"{r.get(k, ''):.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                for k in keys
            )
            + " |"
        )
    table = "\n".join(lines)
    (args.results / "bench_train_step.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
