"""The benchmark scripts run end to end at tiny shapes and write complete, finite tables."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_gae_writes_every_method(tmp_path):
    _run("bench_gae.py", "--shapes", "2x16", "--repeats", "2", "--results", str(tmp_path))
    with open(tmp_path / "bench_gae.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert any("scan" in m for m in methods) and any("floor" in m for m in methods), methods
    for r in rows:
        assert float(r["median_ms"]) > 0 and math.isfinite(float(r["median_ms"])), r
    assert "2x16" in (tmp_path / "bench_gae.md").read_text()


def test_bench_train_step_writes_every_row(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _run(
        "bench_train_step.py",
        *("--batch", "2", "--seq", "16", "--micro", "2", "--repeats", "1"),
        *("--results", str(tmp_path)),
    )
    with open(tmp_path / "bench_train_step.csv") as f:
        rows = {r["impl"]: r for r in csv.DictReader(f)}
    assert len(rows) == 5, list(rows)
    assert any(name.startswith("matmul floor") for name in rows)
    reference = next(r for name, r in rows.items() if "(reference)" in name)
    assert float(reference["speedup_vs_reference"]) == 1.0
    for name, r in rows.items():
        for key in ("ms_per_step", "tokens_per_s", "fraction_of_peak"):
            value = float(r[key])
            assert value > 0 and math.isfinite(value), (name, key, value)


def test_bench_load_measures_both_ways(tmp_path):
    _run("bench_load.py", "--layers", "1", "--vocab", "512", "--results", str(tmp_path))
    with open(tmp_path / "bench_load.csv") as f:
        rows = {r["way"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"sliced", "whole"}
    for r in rows.values():
        model = float(r["model_mib"])
        assert int(r["devices_holding_the_embedding"]) == 8
        # The devices' buffers are host memory on a CPU: the model is resident after the load.
        assert float(r["peak_above_start_mib"]) >= float(r["resident_after_mib"]) >= 0.9 * model


def test_bench_packing_writes_both_layouts(tmp_path):
    _run(
        "bench_packing.py",
        *("--rollouts", "24", "--max-len", "64", "--batch", "2", "--rounds", "1", "--steps", "1"),
        *("--d-model", "32", "--mlp-dim", "64", "--num-heads", "2", "--head-dim", "16"),
        *("--results", str(tmp_path)),
    )
    with open(tmp_path / "bench_packing.csv") as f:
        rows = {r["layout"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"padded", "packed"}, list(rows)
    assert float(rows["packed"]["padding_fraction"]) < float(rows["padded"]["padding_fraction"])
    for name, r in rows.items():
        assert int(r["compilations"]) == 1, (name, r["compilations"])
        value = float(r["real_tokens_per_s"])
        assert value > 0 and math.isfinite(value), (name, value)
    assert "padding_fraction" in (tmp_path / "bench_packing.md").read_text()


def test_bench_gpu_runs_end_to_end_off_a_gpu():
    # The GPU script's set-up, update, timing and report, with the XLA attention at a tiny
    # shape, so that a lent GPU's few minutes are not spent on a broken script.
    out = _run(
        "bench_gpu.py",
        *("--attention", "xla", "--preset", "default", "--layers", "1"),
        *("--seq-len", "64", "--batch", "2", "--steps", "1"),
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["tokens_per_second"] > 0 and math.isfinite(report["loss"]), report
    assert report["mfu"] is None  # no bf16 peak is known for a CPU
    # The default cuDNN attention refuses a backend without it, in one line.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_gpu.py")],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "needs an NVIDIA GPU" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
