"""How fast is `compute_gae` against the GAE loops RLHF frameworks use?

Times, side by side in one run and on the same float32 [B, T] inputs (right-padded masks):
- `compute_gae`, method "scan" and "associative", jitted;
- a NumPy reverse loop over T, vectorised over the batch (the OpenRLHF/TRL algorithm);
- the same loop in PyTorch, when torch is importable;
- `rlax.truncated_generalized_advantage_estimation` vmapped over the batch and jitted (it has no
  mask; it gets discount γ·mask, which is right only for right padding);
- the memory-traffic floor: a jitted elementwise op that reads 3 and writes 2 [B, T] float32
  arrays, timed in the same run (it is the least any GAE must do: read rewards, values, mask and
  write advantages, returns).

Every JAX function is compiled and warmed up before timing; each timing ends with
`block_until_ready`; the JAX functions take turns call by call, so that load from other processes
hits them alike. Reports the median over `--repeats` calls (fewer for the slow host loops).

    python experiments/bench_gae.py [--shapes 64x1024,16x8192] [--repeats 20]

Writes bench_gae.csv and bench_gae.md to experiments/results/ (or `--results DIR`).
"""

import argparse
import csv
import functools
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import critic_jax

GAMMA, LAM = 0.99, 0.95
DEFAULT_SHAPES = "64x1024,16x8192,256x2048,4x65536"
RESULTS = Path(__file__).resolve().parent / "results"

# Loop-body and layout variants measured while building `compute_gae(method="scan")` on this
# 2-core CPU shared with other jobs, each against rlax in the same interleaved run:
# (variant, its best-of-N ms, rlax's in the same run), shapes 64x1024/16x8192/256x2048/4x65536.
VARIANTS = (
    (
        "straightforward skip-mask scan: carry (A, V_next), `where` in the body",
        "0.63 / 2.05 / 3.77 / 1.59",
        "1.04 / 0.90 / 3.48 / 1.32",
    ),
    (
        "one multiply-add g = e + c*g, carry g = γ(V_t' + λA_t'), two [T, B] inputs, "
        "emits the incoming carry",
        "0.40 / 1.03 / 4.57 / 1.46",
        "0.40 / 0.87 / 4.68 / 0.99",
    ),
    (
        "same, emits the new carry (no per-step carry copy), shifted afterwards",
        "0.36 / 0.86 / 4.62 / 0.92",
        "same run",
    ),
    (
        "same with unroll 2 / 4 / 8",
        "0.60-0.66 / 0.84-1.76 / 7.4-7.7 / 0.69-1.81",
        "same run",
    ),
    ("e and c stacked as [T, 2, B]", "0.75 / 0.75 / 9.35 / 0.82", "same run"),
    (
        "fori_loop over the columns of [B, T], no transposes",
        "0.91 / 0.94 / 8.84 / 1.32",
        "0.45 / 0.50 / 2.94 / 1.31",
    ),
    (
        "e and c packed in one complex64 [T, B] array",
        "0.31 / 0.51 / 4.15 / 1.03",
        "0.44 / 0.55 / 3.54 / 0.93",
    ),
    (
        "complex packing + inputs pre-shifted one step (the scan emits g_{t+1})",
        "0.32 / 0.53 / 4.21 / 1.28",
        "0.41 / 0.66 / 3.92 / 1.26",
    ),
    (
        "+ time blocks [T/k, B, k], k = 2 / 4 / 8 / 16 steps per scan step",
        "256x2048: 3.74 / 3.81 / 3.30 / 5.81; 64x1024: 0.39 / 0.30 / 0.26 / 0.74; "
        "16x8192: 1.19 / 1.02 / 1.10 / 3.71",
        "3.49; 0.39; 0.78",
    ),
    ("the scan also emits A (third input r - V)", "256x2048: 6.23", "3.32"),
    ("optimisation barriers to keep the transposes unfused", "no gain (within noise)", ""),
    (
        "two-level chunked scan (32 or 128 chunks per row)",
        "0.49-0.66 / 0.85-0.87 / 2.1-2.7 / 1.81-1.83",
        "1.04 / 0.90 / 3.48 / 1.32",
    ),
    (
        "**kept**: pre-shifted complex64 input; k = 8 blocks for B >= 64, one step per scan "
        "step otherwise; unroll 4 for B <= 8",
        "0.41 / 0.79 / 3.63 / 1.01",
        "0.66 / 1.26 / 4.29 / 1.27",
    ),
)
NOTES = (
    "\n## Scan variants measured during development\n\n"
    "ms (median or best of N calls; variant and rlax timed in the same run, taking turns except "
    "in the first and the chunked rows) on the same 2-core CPU, shared with other jobs "
    "(load 3-6), so absolute numbers drift between runs: compare within a row. "
    "Shapes 64x1024 / 16x8192 / 256x2048 / 4x65536.\n\n"
    "| variant | variant ms | rlax ms, same run |\n|---|---|---|\n"
    + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in VARIANTS)
    + "\nOn this CPU the transposes between the [B, T] arguments and the time-major scan cost "
    "more than the recurrence itself; the kept variant moves one transposed array in and one "
    "out.\n"
)


def numpy_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """OpenRLHF/TRL: zero the masked entries, then one reverse pass over T for the whole batch."""
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[-1]
    advantages = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[0], rewards.dtype)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def torch_loop(torch, rewards, values, mask, gamma=GAMMA, lam=LAM):
    """The same loop in PyTorch (as the PyTorch frameworks run it)."""
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[-1]
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    columns = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        columns.append(last)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, advantages + values


def rlax_gae(rewards, values, mask):
    import rlax

    discount = GAMMA * mask
    bootstrapped = jnp.concatenate([values, jnp.zeros_like(values[:, :1])], axis=1)
    gae = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(0, 0, None, 0))
    advantages = gae(rewards, discount, LAM, bootstrapped)
    return advantages, advantages + values


def memory_floor(rewards, values, mask):
    """One elementwise pass: reads 3 and writes 2 [B, T] float32 arrays."""
    return rewards + values * mask, rewards - values * mask


def _interleaved_median_ms(fns, args, repeats):
    """Median ms of each jitted fn; the fns take turns so that load from other processes on a
    shared machine hits all of them alike."""
    for fn in fns.values():  # compile, then warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * float(np.median(t)), 1e3 * min(t)) for name, t in times.items()}


def _median_ms(fn, args, repeats):
    """Median ms of a slow host loop, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * min(times)


def _inputs(rows, length, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(rows, length)).astype(np.float32)
    values = rng.normal(size=(rows, length)).astype(np.float32)
    lengths = rng.integers(length // 2, length + 1, size=rows)
    mask = (np.arange(length) < lengths[:, None]).astype(np.float32)
    return rewards, values, mask


def run(shapes, repeats):
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    try:
        import rlax  # noqa: F401

        have_rlax = True
    except ImportError:
        have_rlax = False

    gae = {
        m: jax.jit(functools.partial(critic_jax.compute_gae, gamma=GAMMA, lam=LAM, method=m))
        for m in ("scan", "associative")
    }
    rows_out = []
    for rows, length in shapes:
        r, v, m = _inputs(rows, length)
        jr, jv, jm = (jnp.asarray(x) for x in (r, v, m))
        # Same answer as the framework loop on right-padded masks (masked entries are 0 in both).
        want, _ = numpy_loop(r.astype(np.float64), v.astype(np.float64), m.astype(np.float64))
        for fn in gae.values():
            got, _ = fn(jr, jv, jm)
            np.testing.assert_allclose(np.asarray(got), want * m, rtol=1e-3, atol=1e-3)

        slow_repeats = max(1, min(repeats, 3 if length >= 65536 else 5))
        jitted = {
            "memory floor (jit elementwise)": jax.jit(memory_floor),
            "compute_gae scan": gae["scan"],
            "compute_gae associative": gae["associative"],
        }
        if have_rlax:
            jitted["rlax (vmap, jit)"] = jax.jit(rlax_gae)
        timings = _interleaved_median_ms(jitted, (jr, jv, jm), repeats)
        timings["numpy loop"] = _median_ms(numpy_loop, (r, v, m), slow_repeats)
        if torch is not None:
            tr, tv, tm = (torch.from_numpy(x) for x in (r, v, m))
            timings["torch loop"] = _median_ms(
                functools.partial(torch_loop, torch), (tr, tv, tm), slow_repeats
            )
        best = {k: b for k, (_, b) in timings.items()}
        timings = {k: m for k, (m, _) in timings.items()}
        floor = timings["memory floor (jit elementwise)"]
        for method, ms in timings.items():
            rows_out.append(
                {
                    "shape": f"{rows}x{length}",
                    "method": method,
                    "median_ms": ms,
                    "best_ms": best[method],
                    "mtokens_per_s": rows * length / ms / 1e3,
                    "speedup_vs_rlax": timings.get("rlax (vmap, jit)", np.nan) / ms,
                    "speedup_vs_numpy": timings["numpy loop"] / ms,
                    "speedup_vs_torch": timings.get("torch loop", np.nan) / ms,
                    "x_floor": ms / floor,
                    "floor_gb_per_s": 5 * 4 * rows * length / floor / 1e6,
                }
            )
            print(
                f"{rows}x{length:<6} {method:32s} {ms:10.3f} ms  x{ms / floor:8.1f} floor",
                flush=True,
            )
    return rows_out


def _write(rows_out, command, results: Path = RESULTS):
    results.mkdir(parents=True, exist_ok=True)
    keys = list(rows_out[0])
    with open(results / "bench_gae.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {k: v if isinstance(v, str) else f"{v:.6g}" for k, v in row.items()} for row in rows_out
        )
    header = (
        "| shape | method | median ms | best ms | Mtok/s | speedup vs rlax | vs numpy | vs torch "
        "| x memory floor |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows_out:
        lines.append(
            f"| {row['shape']} | {row['method']} | {row['median_ms']:.3f} | {row['best_ms']:.3f} | "
            f"{row['mtokens_per_s']:.1f} | {row['speedup_vs_rlax']:.2f} | "
            f"{row['speedup_vs_numpy']:.1f} | {row['speedup_vs_torch']:.1f} | "
            f"{row['x_floor']:.1f} |"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (
        "# GAE benchmark\n\n"
        f"`{command}` on {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, float32, gamma={GAMMA}, lam={LAM}, right-padded masks; "
        f"load average {load:.2f} when it ended. Speedups are other_time / this_time. "
        "The memory floor is a jitted elementwise op reading 3 and writing 2 [B, T] float32 "
        "arrays, timed in the same run. Speedups, Mtok/s and x floor use the medians; `best` "
        "is the fastest call.\n\n" + header + "\n".join(lines) + "\n" + NOTES
    )
    (results / "bench_gae.md").write_text(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxT list")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per JAX method")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the tables go")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    command = "python experiments/bench_gae.py"
    if args.shapes != DEFAULT_SHAPES:
        command += f" --shapes {args.shapes}"
    if args.repeats != 30:
        command += f" --repeats {args.repeats}"
    print(_write(run(shapes, args.repeats), command, args.results))


if __name__ == "__main__":
    main()
