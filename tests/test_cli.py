"""`critic-jax` end to end, and its answers to bad input: one line, exit code 2."""

import json
from pathlib import Path

import helpers
import pytest

from critic_jax import cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.batch-size", "32", "--ppo.minibatch-size", "16", "--log.every", "5"]


def _run(*args, timeout=300):
    return helpers.run_cli(*args, timeout=timeout)


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "make-rollouts" in out


def test_train_writes_summary_metrics_events_and_checkpoints(tmp_path):
    wd = tmp_path / "run"
    proc = _run("train", "--steps", "10", "--workdir", str(wd), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relative_value_error" in proc.stdout
    summary = json.loads((wd / "summary.json").read_text())
    for key in (
        "steps",
        "final_loss",
        "relative_value_error",
        "explained_variance_vs_true",
        "tokens_per_second",
        "real_tokens_per_second",
        "compile_seconds",
    ):
        assert key in summary
    assert summary["steps"] == 10
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [5, 10]
    assert any((wd / "tensorboard").iterdir())
    assert (wd / "checkpoints" / "10").is_dir()


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--ppo.gamma", "1.5"], "gamma"),
        (["train", "--steps", "0"], "steps"),
        (["train", "--ppo.reduction", "mean"], "reduction"),
        (["train", "--mesh.data", "3"], "device"),
        (["train", "--data.batch-size", "30"], "batch_size"),
        (["train", "--config", "/nonexistent/config.json"], "config"),
        (["frobnicate"], "subcommand"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words, tmp_path):
    proc = _run(*args, "--workdir", str(tmp_path / "wd")) if args[0] == "train" else _run(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("critic-jax: error:"), proc.stderr
    assert words in err[0]


def test_config_file_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"ppo": {"gama": 0.9}}))
    proc = _run("train", "--config", str(path))
    assert proc.returncode == 2 and "gama" in proc.stderr and "Traceback" not in proc.stderr


def test_config_file_sets_values(tmp_path):
    from critic_jax import config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 7, "ppo": {"lam": 0.5}}))
    cfg = config.load(path)
    assert cfg.steps == 7 and cfg.ppo.lam == 0.5 and cfg.ppo.gamma == 1.0


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("critic-jax: error:"), proc.stderr[-3000:]
    for w in words:
        assert w in err[0], err[0]


def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _one_line_error(_run("train", "--steps", "2", "--workdir", str(blocker / "run"), *SMALL))


def test_bad_rollout_files_are_one_line(tmp_path):
    _one_line_error(
        _run("train", "--data.path", str(tmp_path / "none" / "*.parquet"), *SMALL), "parquet"
    )
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    _one_line_error(_run("train", "--data.path", str(garbage), *SMALL), "garbage.parquet")


def test_make_rollouts_then_train_on_them(tmp_path):
    out = tmp_path / "r.parquet"
    proc = _run("make-rollouts", "--out", str(out), "--rows", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(
        "train", "--steps", "2", "--workdir", str(tmp_path / "wd"), "--data.path", str(out), *SMALL
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _one_line_error(_run("make-rollouts", "--rows", "0"), "rows")


@pytest.mark.parametrize(
    "n, text",
    [(7, "7"), (13_400, "13.4 k"), (999_499, "999 k"), (999_999, "1 M"), (494_032_768, "494 M")]
    + [(7_504_928_769, "7.5 B"), (70_553_706_496, "70.6 B")],
)
def test_counts_print_to_three_digits(n, text):
    assert cli._count(n) == text
