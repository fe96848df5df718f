"""Critic train-step throughput: critic_jax against a PyTorch reference, measured in one run.

Both sides take one optimizer step on the same problem: a Llama critic (hidden 256, 4 layers,
4 heads, MLP 688, vocab 32000), a batch of 8 x 512 tokens, float32, the clipped masked value loss
and AdamW. The PyTorch side is transformers' `LlamaModel` + `Linear(hidden, 1)`; the JAX side is
`critic_jax.models.Critic` + `critic_jax.value_loss` + optax AdamW under one `jax.jit` with the
state donated. Also measured here: the float32 matmul peak of each framework on this machine (a
2048 x 2048 matmul), the model's training FLOPs per token, the fraction of the peak each step
reaches, and the compile time of the first JAX step.

    python experiments/bench_train_step.py [--batch 8] [--seq 512] [--repeats 5]

Writes experiments/results/bench_train_step.{csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import critic_jax
from critic_jax.models import Critic, ModelConfig

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


def timeit(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    t = timeit(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 / t


def jax_step(cfg: ModelConfig, batch: int, seq: int, repeats: int):
    critic = Critic(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(critic, nnx.Param)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones((batch, seq), jnp.float32)
    old = jnp.asarray(rng.normal(size=(batch, seq)), jnp.float32)
    ret = jnp.asarray(rng.normal(size=(batch, seq)), jnp.float32)

    def loss_fn(p):
        values = nnx.merge(graphdef, p)(tokens)
        return critic_jax.value_loss(values, old, ret, mask, clip_eps=0.2)

    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state).compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def run():
        p, o, loss = compiled(*state)
        loss.block_until_ready()
        state[:] = [p, o]

    return timeit(run, repeats), compile_s


def torch_step(batch: int, seq: int, repeats: int):
    try:
        import torch
        from transformers import LlamaConfig, LlamaModel
    except ImportError:
        return None, None
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    body = LlamaModel(cfg)
    head = torch.nn.Linear(256, 1)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, 32000, (batch, seq))
    mask = torch.ones(batch, seq)
    old = torch.randn(batch, seq)
    ret = torch.randn(batch, seq)

    def run():
        values = head(body(tokens).last_hidden_state).squeeze(-1)
        vc = old + (values - old).clamp(-0.2, 0.2)
        loss = torch.max((vc - ret) ** 2, (values - ret) ** 2)
        loss = 0.5 * ((loss * mask).sum(-1) / mask.sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / timeit(lambda: a @ a, repeats)
    return timeit(run, repeats), peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = model_config()
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    print(f"devices: {jax.devices()}  model FLOPs/token (train): {fpt / 1e6:.1f} M")
    peak = jax_matmul_peak()
    print(f"JAX float32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    t_jax, compile_s = jax_step(cfg, args.batch, args.seq, args.repeats)
    print(f"JAX step: {t_jax * 1e3:.0f} ms  (compile {compile_s:.1f} s)")
    t_torch, torch_peak = torch_step(args.batch, args.seq, args.repeats)
    rows = [
        {
            "impl": "critic_jax (jit, donated)",
            "ms_per_step": t_jax * 1e3,
            "tokens_per_s": tokens / t_jax,
            "gflops": fpt * tokens / t_jax / 1e9,
            "matmul_peak_gflops": peak / 1e9,
            "fraction_of_peak": fpt * tokens / t_jax / peak,
            "compile_s": compile_s,
        }
    ]
    if t_torch is not None:
        rows.append(
            {
                "impl": "PyTorch + transformers LlamaModel",
                "ms_per_step": t_torch * 1e3,
                "tokens_per_s": tokens / t_torch,
                "gflops": fpt * tokens / t_torch / 1e9,
                "matmul_peak_gflops": torch_peak / 1e9,
                "fraction_of_peak": fpt * tokens / t_torch / torch_peak,
                "compile_s": 0.0,
            }
        )
        rows[0]["speedup_vs_torch"] = t_torch / t_jax
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(RESULTS / "bench_train_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
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
    (RESULTS / "bench_train_step.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
