"""`critic-jax plan`: the real update compiled on abstract inputs, per-device memory, fits."""

import json
from pathlib import Path

import helpers
import pytest

from critic_jax import plan as plan_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.num-layers", "1", "--model.d-model", "32", "--model.mlp-dim", "64"]


def _plan(*args, timeout=600):
    return helpers.run_cli("plan", *args, timeout=timeout)


def test_parse_bytes():
    assert plan_lib.parse_bytes("80GiB") == 80 * 2**30
    assert plan_lib.parse_bytes("16GB") == 16 * 10**9
    assert plan_lib.parse_bytes("512") == 512
    assert plan_lib.parse_bytes(" 0.5GiB ") == 2**29
    # Nothing that is not a positive, finite size: no zero, sign, bare dot or exponent overflow.
    for text in ("lots", "", "0", "0GiB", "0.5", "-1GiB", ".", "e", "1e999", "1e999GiB", "8 XB"):
        with pytest.raises(ValueError, match="memory size"):
            plan_lib.parse_bytes(text)


@pytest.mark.parametrize(
    "installed, pin, warned",
    [
        ("0.0.42.1", 'libtpu==0.0.42.*; extra == "tpu"', False),
        ("0.0.42", 'libtpu==0.0.42.*; extra == "tpu"', False),
        ("0.0.52", 'libtpu==0.0.42.*; extra == "tpu"', True),
        ("0.0.420", 'libtpu==0.0.42.*; extra == "tpu"', True),
        ("0.0.52", "libtpu==0.0.52; extra == 'tpu'", False),
        ("0.0.52", None, False),  # a jax that pins nothing: nothing to compare with
    ],
)
def test_compiler_version_warns_when_libtpu_is_not_the_pinned_release(
    monkeypatch, installed, pin, warned
):
    versions = {"libtpu": installed, "jax": "0.10.2", "jaxlib": "0.10.2"}
    metadata = plan_lib.importlib.metadata
    monkeypatch.setattr(metadata, "version", versions.__getitem__)
    requires = ["jaxlib<=0.10.2,>=0.10.2", "requests; extra == 'tpu'"] + ([pin] if pin else [])
    monkeypatch.setattr(metadata, "requires", lambda name: requires)
    assert plan_lib.compiler_version("cpu") == ("jaxlib 0.10.2", None)
    compiler, warning = plan_lib.compiler_version("tpu-v5e:2x4")
    assert compiler == f"libtpu {installed}"
    assert (warning is not None) == warned
    if warned:
        assert installed in warning and "jax[tpu]==0.10.2" in warning


def test_plan_on_fake_cpu_devices_reports_memory_and_fits():
    args = ["--devices", "4", "--mesh.data", "1", "--mesh.fsdp", "4", "--seq-len", "64"]
    proc = _plan(*args, *TINY, "--device-memory", "1GiB", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["tokens_per_iteration"] == 64 * 64
    assert 0 < report["temp_bytes"] < report["peak_bytes_per_device"] < 2**30
    assert report["fits"] is True and report["compile_seconds"] > 0
    assert report["compiler"].startswith("jaxlib ") and "compiler_warning" not in report
    # Old values + 2 epochs x (forward + backward) = 7 forward passes of 2 FLOPs a parameter, plus
    # attention; the compiler's count sees each loop body once, so it is lower.
    matmul_params = report["parameters"] - 32 * 32 - 2 * 32 - 32 - 1  # embedding, norms, bias
    assert report["flops_per_token"] >= 7 * 2 * matmul_params
    assert 0 < report["compiled_flops_per_token"] < report["flops_per_token"]
    small = _plan(*args, *TINY, "--device-memory", "1KiB", "--json")
    assert json.loads(small.stdout.strip().splitlines()[-1])["fits"] is False


def test_plan_with_a_preset_keeps_single_field_overrides():
    proc = _plan(
        "--model.preset", "qwen2.5-0.5b", "--model.num-layers", "1", "--seq-len", "32", "--json"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # One Qwen2.5-0.5B block (d 896, mlp 4864, 14/2 heads of 64) + the 151936 x 896 embedding.
    assert 150e6 < report["parameters"] < 152e6


@pytest.mark.parametrize(
    "args, words",
    [
        (["--target", "tpu-v9x"], "target"),
        (["--devices", "0"], "devices"),
        (["--devices", "3", "--mesh.fsdp", "2"], "mesh"),
        (["--device-memory", "lots"], "memory"),
        (["--device-memory", "0"], "memory"),
        (["--seq-len"], "needs a value"),  # not the next flag taken as its value
        (["--target"], "needs a value"),
        (["--json=maybe"], "json"),
        (["--model.attention", "splash"], "splash"),  # a TPU kernel, planned for the CPU
        (["--model.attention", "cudnn", "--model.dtype", "bfloat16"], "cudnn"),
    ],
)
def test_plan_bad_input_is_one_line(args, words):
    proc = _plan(*args, *TINY)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("critic-jax: error:")]
    assert len(err) == 1 and words in err[0].lower(), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["tpu-v9:2x2", "tpu-v5e:3x3"])
def test_plan_topology_libtpu_rejects_is_one_line(target):
    # A chip libtpu does not know, or a shape that does not tile its hosts: libtpu's reason in
    # one line, no traceback.
    pytest.importorskip("libtpu")
    proc = _plan("--target", target, *TINY)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("critic-jax: error:")]
    assert len(err) == 1 and target in err[0] and "topology" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_plan_compiles_for_a_tpu_topology():
    pytest.importorskip("libtpu")
    args = ["--target", "tpu-v5e:2x2", "--mesh.data", "1", "--mesh.fsdp", "4", "--seq-len", "256"]
    proc = _plan(*args, *TINY, "--model.dtype", "bfloat16", "--model.remat", "full", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device_kind"].startswith("TPU") and report["devices"] == 4
    assert report["device_memory"] == 16 * 2**30 and report["fits"] is True
    assert report["compiler"].startswith("libtpu ")
