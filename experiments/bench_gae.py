"""How fast is `compute_gae` against the GAE loops RLHF frameworks use?

Times, side by side in one run and on the same float32 [B, T] inputs (right-padded masks):
- `compute_gae`, method "scan" and "associative", jitted, scalar γ and λ (the common call);
- `compute_gae` scan with a per-row λ ([B], as `length_adaptive_lam` gives), and with a per-row λ
  plus `segment_ids` (each row packed as two rollouts), and `decoupled_gae` (two λ, one scan);
- a NumPy reverse loop over T, vectorised over the batch (the OpenRLHF/TRL algorithm);
- the same loop in PyTorch, when torch is importable;
- `rlax.truncated_generalized_advantage_estimation` vmapped over the batch and jitted (it has no
  mask; it gets discount γ·mask, which is right only for right padding);
- the memory-traffic floor: a jitted elementwise op that reads 3 and writes 2 [B, T] float32
  arrays, timed in the same run (it is the least any GAE must do: read rewards, values, mask and
  write advantages, returns).

Every JAX function is compiled and warmed up before timing; each timing ends with
`block_until_ready`. The JAX functions are timed in alternating rounds, one call each per round,
and the order rotates from round to round: a function that runs right after another one that read
the same inputs finds them in cache, so a fixed order favours whoever comes second. The machine's
load average is printed beside every table: on a shared machine, compare ratios within one run.
Reports the median over `--repeats` rounds (fewer for the slow host loops).

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

# Scan variants measured on this 2-core CPU shared with other jobs, each against rlax in the same
# run with rotating order: (variant, its median ms, rlax's in the same run), shapes
# 256x2048 / 64x1024 / 16x8192 / 4x65536. Earlier measurements (complex packing, time blocks,
# unrolling, chunked scans) are in the git history of this file.
VARIANTS = (
    (
        "complex64-packed (e, c), pre-shifted, time blocks of 8 for B >= 64, unroll 4 for B <= 8 "
        "(the previous kept variant)",
        "2.46 / 0.33 / 0.53 / 1.00",
        "1.83 / 0.33 / 0.54 / 0.90",
    ),
    (
        "plain time-major scan over [B] vectors, e and c float32 [T, B], pre-shifted",
        "4.15 / 0.77 / 0.78 / 0.99",
        "3.48 / 0.78 / 0.74 / 1.04",
    ),
    (
        "same, the scan emits g_t and the output is shifted afterwards",
        "2.52 / 0.52 / - / -",
        "2.24 / 0.53 / - / -",
    ),
    (
        "same with unroll 2",
        "8.62 / 0.91 / 1.01 / 1.28",
        "3.30 / 0.59 / 0.58 / 1.50",
    ),
    (
        "raw inputs transposed first, all elementwise work time-major",
        "15.4 / 1.65 / 0.79 / 1.48",
        "3.30 / 0.59 / 0.58 / 1.50",
    ),
    (
        "c replaced by the mask (bool), c = where(m, γλ, 1) in the body",
        "2.75 / 0.53 / 0.63 / 1.28",
        "2.24 / 0.53 / 0.58 / 1.50",
    ),
    (
        "**kept**: e float32 + one uint8 step kind (transparent / valid / reset) per position, "
        "c = γλ of the row picked in the body; per-row λ and segments use the same scan",
        "1.69 / 0.34 / 0.60 / 1.03",
        "1.83 / 0.33 / 0.54 / 0.90",
    ),
    (
        "kept + time blocks of 4 / 8 per scan step",
        "3.50 / 0.55 and 2.44 / 0.43 (256x2048 / 64x1024)",
        "1.83 / 0.33",
    ),
    (
        "kept, kind as int32 instead of uint8",
        "4.06 / 0.76 / 0.77 / 1.22",
        "3.48 / 0.78 / 0.74 / 1.04",
    ),
    (
        "kept, two-level: time cut into 8-64 chunks folded into the batch, the scan also "
        "carries the chunk's product of c, chunk carries fixed up afterwards",
        "- / - / 0.62-1.03 / 3.9-7.4",
        "- / - / 0.59 / 3.33 (median; best 0.92)",
    ),
    (
        "segment_ids: next segment's id found by an associative fill before the scan, vs "
        "carried in the scan (kept)",
        "13.8 vs 11.6 / 0.81 / 1.66 / 2.51 vs 1.83",
        "8.07 and 8.76 / 0.44 / 0.83 / 1.41 and 1.23",
    ),
    (
        "no transposes: fori_loop over [B, k] blocks of the [B, T] inputs, k = 8 / 16 / 32, "
        "everything fused in the body",
        "3.7-11 / 0.54-0.99 / 1.6-2.7 / 7-21",
        "3.56 / 0.41 / 0.68 / 1.19",
    ),
)
NOTES = (
    "\n## Scan variants measured during development\n\n"
    "Median ms, each variant and rlax timed in the same run on the same 2-core CPU, shared with "
    "other jobs (load 1.5-4), so absolute numbers drift between runs: compare within a row. "
    "Shapes 256x2048 / 64x1024 / 16x8192 / 4x65536.\n\n"
    "| variant | variant ms | rlax ms, same run |\n|---|---|---|\n"
    + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in VARIANTS)
    + "\nThe loop body costs the same in every variant; what differs is the bytes moved through "
    "the transposes into and out of the time-major scan, and which function finds the inputs in "
    "cache. Before the timing rounds rotated, the function timed right after another one that "
    "read the same inputs looked up to 1.7x faster than it is (measured on the scan alone).\n"
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
    """Median and best ms of each jitted fn, in alternating rounds whose order rotates."""
    for fn in fns.values():  # compile, then warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
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

    def gae(method):
        fn = functools.partial(critic_jax.compute_gae, gamma=GAMMA, lam=LAM, method=method)
        return jax.jit(lambda r, v, m, lam, ids: fn(r, v, m))

    def _drop_extra(fn):
        return jax.jit(lambda r, v, m, lam, ids: fn(r, v, m))

    jitted = {
        "memory floor (jit elementwise)": _drop_extra(memory_floor),
        "compute_gae scan": gae("scan"),
        "compute_gae associative": gae("associative"),
        "compute_gae scan, per-row lam": jax.jit(
            lambda r, v, m, lam, ids: critic_jax.compute_gae(r, v, m, gamma=GAMMA, lam=lam)
        ),
        "compute_gae scan, per-row lam + segment_ids": jax.jit(
            lambda r, v, m, lam, ids: critic_jax.compute_gae(
                r, v, m, gamma=GAMMA, lam=lam, segment_ids=ids
            )
        ),
        "decoupled_gae (value lam 1, policy lam 0.95)": jax.jit(
            lambda r, v, m, lam, ids: critic_jax.decoupled_gae(r, v, m, gamma=GAMMA, policy_lam=LAM)
        ),
    }
    if have_rlax:
        jitted["rlax (vmap, jit)"] = _drop_extra(rlax_gae)
    rows_out = []
    for rows, length in shapes:
        r, v, m = _inputs(rows, length)
        # Per-row λ all equal to LAM and two packed rollouts per row: the same answer as above.
        lam = np.full(rows, LAM, np.float32)
        ids = np.where(m != 0, 1 + (np.arange(length) >= length // 4), 0).astype(np.int32)
        args = tuple(jnp.asarray(x) for x in (r, v, m, lam, ids))
        # Same answer as the framework loop on right-padded masks (masked entries are 0 in both).
        want, _ = numpy_loop(r.astype(np.float64), v.astype(np.float64), m.astype(np.float64))
        for name in ("compute_gae scan", "compute_gae associative", "decoupled_gae"):
            name = next(k for k in jitted if k.startswith(name))
            got, _ = jitted[name](*args)
            np.testing.assert_allclose(np.asarray(got), want * m, rtol=1e-3, atol=1e-3)

        slow_repeats = max(1, min(repeats, 3 if length >= 65536 else 5))
        load_start = _load()
        timings = _interleaved_median_ms(jitted, args, repeats)
        load = max(load_start, _load())
        timings["numpy loop"] = _median_ms(numpy_loop, (r, v, m), slow_repeats)
        if torch is not None:
            tr, tv, tm = (torch.from_numpy(x) for x in (r, v, m))
            timings["torch loop"] = _median_ms(
                functools.partial(torch_loop, torch), (tr, tv, tm), slow_repeats
            )
        best = {k: b for k, (_, b) in timings.items()}
        timings = {k: m for k, (m, _) in timings.items()}
        floor = timings["memory floor (jit elementwise)"]
        print(f"{rows}x{length}: load average {load:.2f}", flush=True)
        for method, ms in timings.items():
            rows_out.append(
                {
                    "shape": f"{rows}x{length}",
                    "method": method,
                    "median_ms": ms,
                    "best_ms": best[method],
                    "mtokens_per_s": rows * length / ms / 1e3,
                    "speedup_vs_rlax": timings.get("rlax (vmap, jit)", np.nan) / ms,
                    "best_speedup_vs_rlax": best.get("rlax (vmap, jit)", np.nan) / best[method],
                    "speedup_vs_numpy": timings["numpy loop"] / ms,
                    "speedup_vs_torch": timings.get("torch loop", np.nan) / ms,
                    "x_floor": ms / floor,
                    "floor_gb_per_s": 5 * 4 * rows * length / floor / 1e6,
                    "load_avg": load,
                }
            )
            print(
                f"  {method:44s} {ms:10.3f} ms  x{ms / floor:8.1f} floor  "
                f"x{timings.get('rlax (vmap, jit)', np.nan) / ms:5.2f} rlax "
                f"(best: x{best.get('rlax (vmap, jit)', np.nan) / best[method]:5.2f})",
                flush=True,
            )
    return rows_out


def _load() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


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
        "| method | median ms | best ms | Mtok/s | speedup vs rlax | best vs best rlax "
        "| vs numpy | vs torch | x memory floor |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    tables = []
    for shape in dict.fromkeys(row["shape"] for row in rows_out):
        rows = [row for row in rows_out if row["shape"] == shape]
        lines = [
            f"| {row['method']} | {row['median_ms']:.3f} | {row['best_ms']:.3f} | "
            f"{row['mtokens_per_s']:.1f} | {row['speedup_vs_rlax']:.2f} | "
            f"{row['best_speedup_vs_rlax']:.2f} | "
            f"{row['speedup_vs_numpy']:.1f} | {row['speedup_vs_torch']:.1f} | "
            f"{row['x_floor']:.1f} |"
            for row in rows
        ]
        tables.append(
            f"### {shape} (load average {rows[0]['load_avg']:.2f})\n\n" + header + "\n".join(lines)
        )
    text = (
        "# GAE benchmark\n\n"
        f"`{command}` on {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, float32, gamma={GAMMA}, lam={LAM}, right-padded masks "
        f"(the segment rows pack each row as two rollouts). Load average {_load():.2f} when it "
        "ended; each table gives the highest 1-minute load average seen while its JAX functions "
        "were timed. Speedups are other_time / this_time. The memory floor is a jitted "
        "elementwise op reading 3 and writing 2 [B, T] float32 arrays, timed in the same run. "
        "Speedups, Mtok/s and x floor use the medians of rounds in rotating order; `best` is the "
        "fastest call, and `best vs best rlax` the ratio of the fastest calls, which other "
        "processes disturb least on a loaded machine.\n\n" + "\n\n".join(tables) + "\n" + NOTES
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
