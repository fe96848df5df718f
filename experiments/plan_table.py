"""The planner table of issue 12: `critic-jax plan --json` for real model shapes and targets.

Each row runs `python -m critic_jax plan ... --json` in its own subprocess, one at a time (each
compile of a real-size model takes minutes, and compile times are only comparable when nothing
else of ours runs beside them), and appends the report to `results/plan_table.csv`; the markdown
table `results/plan_table.md` is rewritten after every row, so a partial run still leaves a
table. Rows already in the CSV are skipped unless `--force` is given (a rerun resumes).

Rows (all defaults of `critic-jax train` kept unless listed: ppo_epochs 2, one minibatch per
iteration where batch == minibatch, micro_batches 1, scalar value head, attention "auto", which
the planner turns into Pallas splash on TPU targets and the XLA path on CPU):

- `8b-v5p`: Llama-3-8B shape, T 8192, batch 8 / minibatch 8 (one row per chip), data 1 x fsdp 8,
  bf16 compute / f32 master, remat full, on tpu-v5p:2x2x2 (target: peak <= 24 GiB a chip).
- `8b-cpu`: the same on 8 fake CPU devices (may take long; timeout 15 min).
- `qwen05-v5e-32k`: Qwen2.5-0.5B shape, T 32768, batch 8 / minibatch 8, fsdp 8, bf16 / f32,
  remat full, on tpu-v5e:2x4 (target: peak <= 8 GiB a chip).
- `depth-4`, `depth-32`: compile time of the update at 4 and 32 layers, width 256 (4 heads of
  64, MLP 688), T 2048, batch 8 / minibatch 8, one CPU device, f32, remat none, the layers
  scanned at both depths (target: 32-layer compile <= 1.5x the 4-layer one).
- `depth-{4,32}-r2/-r3`: two more interleaved runs of the depth pair (the verdict takes the
  median of each depth), and `depth-{4,32}-bf16-full`: the pair in bf16 / f32 with full remat.
- extras: Llama-3.2-1B shape at T 8192 on v5e 2x4 with remat full / none / dots, and the
  Llama-3-8B row on v5p with remat dots / none (what the remat policy saves). A TPU compile that
  cannot fit is refused by the compiler ("CompileTimeHbmOom"); the table reads the temporaries it
  needed from that message.

Usage:
  python experiments/plan_table.py                 # every row, in order
  python experiments/plan_table.py --only 8b-v5p   # one row (ids above; comma-separated)
  python experiments/plan_table.py --table-only    # rewrite plan_table.md from the CSV
  python experiments/plan_table.py --dump 8b-v5p   # compile one row in this process and print
      the compiler's memory analysis and the largest buffers of its optimized HLO (the HLO text
      goes to /tmp/plan_table_<id>.hlo): where a target is missed, this says what holds memory
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
CSV_PATH = RESULTS / "plan_table.csv"
MD_PATH = RESULTS / "plan_table.md"
GIB = 2**30

BF16 = ["--model.dtype", "bfloat16", "--model.param-dtype", "float32"]
ROW8 = ["--data.batch-size", "8", "--ppo.minibatch-size", "8"]
FSDP8 = ["--mesh.data", "1", "--mesh.fsdp", "8"]
WIDTH256 = [
    "--model.d-model", "256", "--model.num-heads", "4", "--model.num-kv-heads", "4",
    "--model.head-dim", "64", "--model.mlp-dim", "688", "--model.layer-loop", "scan",
]  # fmt: skip

# Each row: id, model label, T, target, (fake CPU devices), flags, timeout (s), and the issue's
# target as (key, limit, text) or None.
ROWS: list[dict] = [
    dict(
        id="8b-v5p", model="Llama-3-8B", seq_len=8192, target="tpu-v5p:2x2x2",
        args=["--model.preset", "llama3-8b", *BF16, "--model.remat", "full", *ROW8, *FSDP8],
        timeout=1500, goal=("peak", 24 * GIB, "peak <= 24 GiB/chip"),
    ),
    dict(
        id="qwen05-v5e-32k", model="Qwen2.5-0.5B", seq_len=32768, target="tpu-v5e:2x4",
        args=["--model.preset", "qwen2.5-0.5b", *BF16, "--model.remat", "full", *ROW8, *FSDP8],
        timeout=1500, goal=("peak", 8 * GIB, "peak <= 8 GiB/chip"),
    ),
    dict(
        id="depth-4", model="width 256, 4 layers", seq_len=2048, target="cpu", devices=1,
        args=[*WIDTH256, "--model.num-layers", "4", *ROW8], timeout=900, goal=None,
    ),
    dict(
        id="depth-32", model="width 256, 32 layers", seq_len=2048, target="cpu", devices=1,
        args=[*WIDTH256, "--model.num-layers", "32", *ROW8], timeout=900,
        goal=("compile_ratio", 1.5, "compile <= 1.5x the 4-layer one"),
    ),
    dict(
        id="8b-cpu", model="Llama-3-8B", seq_len=8192, target="cpu", devices=8,
        args=["--model.preset", "llama3-8b", *BF16, "--model.remat", "full", *ROW8, *FSDP8],
        timeout=900, goal=None,
    ),
    dict(
        id="1b-v5e-full", model="Llama-3.2-1B", seq_len=8192, target="tpu-v5e:2x4",
        args=["--model.preset", "llama3.2-1b", *BF16, "--model.remat", "full", *ROW8, *FSDP8],
        timeout=1200, goal=None,
    ),
    dict(
        id="1b-v5e-none", model="Llama-3.2-1B", seq_len=8192, target="tpu-v5e:2x4",
        args=["--model.preset", "llama3.2-1b", *BF16, "--model.remat", "none", *ROW8, *FSDP8],
        timeout=1200, goal=None,
    ),
    dict(
        id="1b-v5e-dots", model="Llama-3.2-1B", seq_len=8192, target="tpu-v5e:2x4",
        args=["--model.preset", "llama3.2-1b", *BF16, "--model.remat", "dots", *ROW8, *FSDP8],
        timeout=1200, goal=None,
    ),
    # Repeats of the depth pair, interleaved (compile seconds on a loaded machine are noisy; the
    # table's verdict uses the median of each depth), and the pair again with bf16 + full remat.
    *[
        dict(
            id=f"depth-{n}-r{rep}", model=f"width 256, {n} layers", seq_len=2048, target="cpu",
            devices=1, args=[*WIDTH256, "--model.num-layers", str(n), *ROW8], timeout=900,
            goal=None if n == 4 else ("compile_ratio", 1.5, "compile <= 1.5x the 4-layer one"),
        )
        for rep in (2, 3) for n in (4, 32)
    ],
    *[
        dict(
            id=f"depth-{n}-bf16-full", model=f"width 256, {n} layers", seq_len=2048,
            target="cpu", devices=1, timeout=900,
            args=[*WIDTH256, "--model.num-layers", str(n), *BF16, "--model.remat", "full", *ROW8],
            goal=None if n == 4 else ("compile_ratio", 1.5, "compile <= 1.5x the 4-layer one"),
        )
        for n in (4, 32)
    ],
    *[
        dict(
            id=f"8b-v5p-{remat}", model="Llama-3-8B", seq_len=8192, target="tpu-v5p:2x2x2",
            args=["--model.preset", "llama3-8b", *BF16, "--model.remat", remat, *ROW8, *FSDP8],
            timeout=1500, goal=None,
        )
        for remat in ("dots", "none")
    ],
]  # fmt: skip

FIELDS = [
    "id", "model", "seq_len", "target", "devices", "mesh", "dtype", "remat",
    "peak_gib", "temp_gib", "argument_gib", "output_gib", "alias_gib", "compile_s", "wall_s",
    "flops_per_token", "compiled_flops_per_token", "parameters", "device_memory_gib", "fits",
    "compiler", "load_before", "load_after", "status", "error", "command",
]  # fmt: skip


def flag(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def command(row: dict) -> list[str]:
    cmd = [sys.executable, "-m", "critic_jax", "plan", *row["args"]]
    cmd += ["--seq-len", str(row["seq_len"]), "--target", row["target"]]
    if row.get("devices"):
        cmd += ["--devices", str(row["devices"])]
    return [*cmd, "--json"]


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_row(row: dict) -> dict:
    cmd = command(row)
    out = {k: "" for k in FIELDS}
    out.update(
        id=row["id"], model=row["model"], seq_len=row["seq_len"], target=row["target"],
        dtype=f"{flag(row['args'], '--model.dtype', 'float32')} / "
        f"{flag(row['args'], '--model.param-dtype', 'float32')}",
        remat=flag(row["args"], "--model.remat", "none"),
        command=" ".join(["python", *cmd[1:]]), load_before=loadavg(),
    )  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {row['id']}: {out['command']}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=row["timeout"])
    except subprocess.TimeoutExpired:
        out.update(status="timeout", error=f"no result after {row['timeout']} s")
        out.update(wall_s=f"{time.perf_counter() - t0:.0f}", load_after=loadavg())
        return out
    out.update(wall_s=f"{time.perf_counter() - t0:.0f}", load_after=loadavg())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        # The TPU compiler's "out of memory" message names the bytes it needed.
        hbm = [ln for ln in text if re.search(r"(?i)resource_exhausted|out of memory|hbm", ln)]
        out.update(status=f"exit {proc.returncode}", error=" | ".join((hbm or text)[-3:])[:2000])
        return out
    r = json.loads(lines[-1])
    mesh = r["mesh"]
    if "argument_bytes" not in r:  # the TPU compiler refused the program: its note says why
        out.update(
            devices=r["devices"], compiler=r.get("compiler", ""), fits="False",
            status="compiler OOM", error=r.get("note", ""),
        )  # fmt: skip
        return out
    out.update(
        devices=r["devices"],
        mesh=" x ".join(f"{k} {v}" for k, v in mesh.items() if v != 1) or "1 device",
        peak_gib=f"{r['peak_bytes_per_device'] / GIB:.2f}",
        temp_gib=f"{r['temp_bytes'] / GIB:.2f}",
        argument_gib=f"{r['argument_bytes'] / GIB:.2f}",
        output_gib=f"{r['output_bytes'] / GIB:.2f}",
        alias_gib=f"{r['alias_bytes'] / GIB:.2f}",
        compile_s=f"{r['compile_seconds']:.1f}",
        flops_per_token=f"{r['flops_per_token']:.3e}",
        compiled_flops_per_token=f"{r['compiled_flops_per_token']:.3e}",
        parameters=r["parameters"],
        device_memory_gib="" if r["device_memory"] is None else f"{r['device_memory'] / GIB:.2f}",
        fits="" if r["fits"] is None else str(r["fits"]),
        compiler=r["compiler"] + (" (not the release jax pins)" if "compiler_warning" in r else ""),
        status="ok",
    )
    return out


def read_csv() -> list[dict]:
    if not CSV_PATH.exists():
        return []
    with CSV_PATH.open() as f:
        return list(csv.DictReader(f))


def write_csv(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    order = {r["id"]: i for i, r in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    with CSV_PATH.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def verdict(row: dict, by_id: dict[str, dict]) -> str:
    spec = next((s for s in ROWS if s["id"] == row["id"]), None)
    if spec is None or spec["goal"] is None:
        return ""
    key, limit, text = spec["goal"]
    if row["status"] != "ok":
        return f"{text}: no figure"
    if key == "peak":
        return f"{text}: {'met' if float(row['peak_gib']) * GIB <= limit else 'MISSED'}"
    base = by_id.get(row["id"].replace("-32", "-4"))
    if not base or base["status"] != "ok":
        return f"{text}: no 4-layer figure"
    ratio = float(row["compile_s"]) / float(base["compile_s"])
    return f"{text}: {ratio:.2f}x, {'met' if ratio <= limit else 'MISSED'}"


def depth_summary(rows: list[dict]) -> list[str]:
    """Median compile seconds of the f32 depth runs at 4 and 32 layers, and their ratio."""
    out = []
    for tag, pattern in (
        ("f32, remat none", r"depth-(4|32)(-r\d+)?$"),
        ("bf16, remat full", r"depth-(4|32)-bf16-full$"),
    ):
        times: dict[str, list[float]] = {"4": [], "32": []}
        for r in rows:
            m = re.match(pattern, r["id"])
            if m and r["status"] == "ok":
                times[m.group(1)].append(float(r["compile_s"]))
        if times["4"] and times["32"]:
            a, b = float(np.median(times["4"])), float(np.median(times["32"]))
            out.append(
                f"- Compile-time target ({tag}): median over {len(times['4'])} / "
                f"{len(times['32'])} runs, 4 layers {a:.1f} s, 32 layers {b:.1f} s: "
                f"{b / a:.2f}x (target <= 1.5x: {'met' if b / a <= 1.5 else 'MISSED'})."
            )
    return out


# What the TPU compiler's buffer assignment of the `8b-v5p` row holds (from
# `XLA_FLAGS=--xla_dump_to=DIR`, the memory-usage report, libtpu 0.0.42.1, 2026-12-01).
NOTES = [
    "Where the Llama-3-8B / v5p / full-remat peak goes (libtpu 0.0.42.1, the memory-usage "
    "report of the TPU compile, per chip): arguments 10.49 GiB (f32 parameters and both Adam "
    "moments, split 8 ways); the saved block inputs bf16[32, 1, 8192, 4096] = 2.0 GiB (what "
    "full remat keeps); f32 buffers of the stacked MLP weights' size (gradients and optimizer "
    "temporaries, 896 MiB each); bf16 copies of the whole split MLP stacks (448 MiB each, about "
    "2.2-2.6 GiB: the compiler casts the stack once per minibatch instead of one layer at a "
    "time; an optimisation barrier on the layer slice did not keep the cast in the loop, 23.79 "
    "GiB); one layer's working set (bf16[1, 8192, 14336] intermediates, 224 MiB each). The "
    "peak is in the backward pass, not the optimizer: plain SGD instead of AdamW and its "
    "non-finite guard peaks at 23.81 GiB, the guard as elementwise selects instead of a "
    "`lax.cond` at 23.98 GiB (2026-12-01, neither kept). The "
    "embedding is looked up and scattered on its own shards (`models.embedding.lookup`). "
    "Compiler releases differ: with libtpu 0.0.52 (not the release jax 0.10.2 pins) the same "
    "update peaks at 21.88 GiB (8B) and 6.45 GiB (Qwen2.5-0.5B, T = 32768); the earlier 5.17 "
    "GiB of that row was 0.0.52 before the rotary rewrite of 2026-11-30 (a flip of a [.., 2, "
    "head_dim/2] view instead of split and concatenate), which 0.0.52 compiles to 1.3 GiB more "
    "and 0.0.42.1 to the same peak (7.31 vs 7.33 GiB).",
]


def write_md(rows: list[dict]) -> None:
    rows = [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]
    by_id = {r["id"]: r for r in rows}
    order = {r["id"]: i for i, r in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    head = [
        "model shape", "T", "target", "devices / mesh", "dtype (compute / params), remat",
        "peak GiB / device", "temp GiB", "compile s", "model FLOPs / token", "fits",
        "compiler", "load avg (1/5/15 min, before)", "target",
    ]  # fmt: skip
    lines = [
        "# critic-jax plan: real shapes (issue 12)",
        "",
        "Written by `experiments/plan_table.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" ({os.cpu_count()} CPU cores shared with other jobs; compile seconds are wall-clock "
        "under the load average shown, so they are inflated and noisy).",
        "",
        "Defaults kept: ppo_epochs 2, batch 8 = minibatch 8 (one optimizer update per epoch, "
        "one row per device where fsdp = 8), micro_batches 1, scalar value head, Adam, "
        "attention auto (splash on the TPU targets, the XLA path on CPU). TPU figures come from "
        "libtpu's compile-only devices (the compiler column: the release the installed jax "
        "pins; another release compiles the same update to other figures); CPU figures "
        "overstate accelerator memory (XLA:CPU does not rematerialise). FLOPs / token: the "
        "planner's model FLOPs of the whole PPO iteration (old-values pass + 2 epochs of "
        "forward and backward).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r["status"] == "ok":
            devmesh = f"{r['devices']} / {r['mesh']}"
            fits = r["fits"] or "n/a"
            if r["device_memory_gib"]:
                fits += f" (of {r['device_memory_gib']})"
            cells = [r["peak_gib"], r["temp_gib"], r["compile_s"], r["flops_per_token"], fits]
        elif oom := re.search(
            r"HLO temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G", r["error"]
        ):
            # The TPU compiler refuses a program that cannot fit: its message names the need.
            devmesh = "8 / fsdp 8" if "--mesh.fsdp 8" in r["command"] else ""
            cells = [
                f"> {oom[2]} (OOM)", oom[1], "-", "-",
                f"False: compiler OOM, temporaries {oom[1]} GiB > {oom[2]} GiB HBM",
            ]  # fmt: skip
        else:
            devmesh = ""
            cells = ["-", "-", f"{r['status']}: {r['error'][:300]}", "-", "-"]
        lines.append(
            "| "
            + " | ".join(
                [r["model"], r["seq_len"], r["target"], devmesh, f"{r['dtype']}, {r['remat']}"]
                + cells
                + [r.get("compiler") or "not recorded", r["load_before"], verdict(r, by_id)]
            )
            + " |"
        )
    lines += ["", *depth_summary(rows), "", *NOTES, "", "Commands:", ""]
    lines += [f"- `{r['id']}`: `{r['command']}`" for r in rows]
    MD_PATH.write_text("\n".join(lines) + "\n")


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16)\[([0-9,]*)\]")


def largest_buffers(hlo: str, top: int = 40) -> list[tuple[int, int, str, str]]:
    """(bytes, count, shape, example instruction) of the largest instruction results of `hlo`."""
    seen: dict[str, list] = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%?[\w.\-]+) = (\S+?\[[0-9,]*\])(?:\{[^}]*\})? (\S+?)\(", line)
        if not m:
            continue
        shape = _SHAPE.search(m.group(2))
        if not shape:
            continue
        dims = [int(d) for d in shape.group(2).split(",") if d]
        size = _DTYPE_BYTES[shape.group(1)]
        for d in dims:
            size *= d
        key = f"{shape.group(1)}[{shape.group(2)}] {m.group(3)}"
        entry = seen.setdefault(key, [size, 0, key, m.group(1)])
        entry[1] += 1
    return sorted((tuple(v) for v in seen.values()), reverse=True)[:top]


def dump(row: dict) -> None:
    """Compiles `row` through the CLI in this process, keeping the compiled executable."""
    import jax

    from critic_jax import cli

    kept = {}
    compile_ = jax.stages.Lowered.compile

    def keep(self, *a, **k):
        kept["compiled"] = compile_(self, *a, **k)
        return kept["compiled"]

    jax.stages.Lowered.compile = keep
    cmd = command(row)
    rc = cli.main(cmd[3:])
    compiled = kept.get("compiled")
    if compiled is None:
        print(f"no executable (exit {rc})")
        return
    print(compiled.memory_analysis())
    try:
        hlo = compiled.as_text()
    except Exception as e:  # noqa: BLE001 - libtpu's compile-only executables may not print
        print(
            f"as_text() failed ({str(e)[:200]}); for a TPU target, rerun with "
            "LIBTPU_INIT_ARGS='--xla_dump_to=DIR' and read DIR/*buffer-assignment.txt"
        )
        return
    path = Path(f"/tmp/plan_table_{row['id']}.hlo")
    path.write_text(hlo)
    print(f"HLO: {path} ({len(hlo)} chars); largest instruction results (per device):")
    for size, count, key, name in largest_buffers(hlo):
        print(f"  {size / GIB:8.3f} GiB x{count:3d}  {key}  e.g. {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated row ids")
    p.add_argument("--force", action="store_true", help="rerun rows already in the CSV")
    p.add_argument("--table-only", action="store_true", help="rewrite the markdown only")
    p.add_argument("--dump", default="", help="row id: print its memory analysis and buffers")
    a = p.parse_args()
    if a.dump:
        dump(next(r for r in ROWS if r["id"] == a.dump))
        return
    done = {r["id"]: r for r in read_csv()}
    if not a.table_only:
        only = set(filter(None, a.only.split(",")))
        for row in ROWS:
            if (only and row["id"] not in only) or (row["id"] in done and not a.force and not only):
                continue
            result = run_row(row)
            print(json.dumps(result), flush=True)
            done[row["id"]] = result
            write_csv(list(done.values()))
            write_md(list(done.values()))
    write_md(list(done.values()))


if __name__ == "__main__":
    main()
