"""`critic-jax`: the command line. The only module that imports tyro or prints for people.

    critic-jax train [--steps N] [--workdir DIR] [--seed S] [--mesh.fsdp 8] [--config FILE] ...
    critic-jax make-rollouts OUT.parquet [--rows N] [--seed S]
    critic-jax --help

Bad input (an invalid flag value, a config file that cannot be read, a malformed rollout file)
ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Sequence

USAGE = """usage: critic-jax {train,make-rollouts,plan,score} [options]

Train the critic (value model) of PPO-style RLHF in JAX.

subcommands:
  train          train a critic (default: a tiny model on the embedded synthetic MRP)
  make-rollouts  write synthetic rollouts to a Parquet file in the rollout schema
  plan           compile a run's update ahead of time: memory per device, FLOPs, does it fit
  score          values, returns and advantages of Parquet rollouts from a trained critic

`critic-jax SUBCOMMAND --help` lists a subcommand's options.
"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MakeRollouts:
    """Write synthetic MRP rollouts (with their true values) to Parquet, in the rollout schema
    that `critic-jax train --data.path` and `critic-jax score` read. One row per sequence:
    tokens list<int> (prompt then response); attention_mask list<int|bool> (1 on real tokens);
    mask list<bool|int|float> (1 where token t is an action whose loss counts); rewards
    list<float> (reward for emitting token t) or sequence_reward float (one per row, placed on
    its last action); optional old_values, logprobs, ref_logprobs (for data.kl-coef),
    true_values, true_advantages list<float>. The lists of one row have one length; rows may
    differ.

    Attributes:
      out: the Parquet file to write.
      rows: number of rollouts.
      seed: sampling seed.
      gamma: discount used for the `true_values` column.
      sequence_level: write `sequence_reward` instead of token-level `rewards`.
    """

    out: str = "rollouts/mrp.parquet"
    rows: int = 1024
    seed: int = 0
    gamma: float = 1.0
    sequence_level: bool = False

    def __post_init__(self):
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1. Received: {self.rows}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1]. Received: {self.gamma}")


def _fail(message: str) -> int:
    first = " ".join(str(message).split())
    print(f"critic-jax: error: {first}", file=sys.stderr)
    return 2


def _parse(cls, **kwargs):
    """`tyro.cli`, with its boxed error reports squeezed into one `ValueError` line."""
    import contextlib
    import io

    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, **kwargs)
    except SystemExit as e:
        if not e.code:
            raise
        lines = []
        for line in captured.getvalue().splitlines():
            line = line.strip(" │╭╮╰╯─\t")
            if line and not line.startswith("For full helptext"):
                lines.append(line)
        raise ValueError(" ".join(lines) or "invalid arguments") from None


def _pop_config_file(args: list[str]) -> tuple[str | None, list[str]]:
    out, path, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ValueError("--config needs a file path. Received: --config")
            path = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return path, out


def _pop_options(args: list[str], options: dict[str, type]) -> tuple[dict[str, str], list[str]]:
    """Takes `--name VALUE` / `--name=VALUE` for the names in `options` (flags for bool)."""
    found, rest, i = {}, [], 0
    while i < len(args):
        a = args[i]
        name, _, value = a.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key in options:
            if options[key] is bool and not value:
                found[key] = "true"
            elif value:
                found[key] = value
            else:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ValueError(f"{name} needs a value. Received: {' '.join(args[i : i + 2])}")
                found[key] = args[i + 1]
                i += 1
        else:
            rest.append(a)
        i += 1
    return found, rest


_CONFIG_HELP = (
    "  --config FILE           a JSON file of config values (a partial nested dict, e.g.\n"
    '                          {"ppo": {"lam": 1.0}}), read before the flags below\n'
)


def _train_config(args: list[str], *, prog: str, description: str):
    """The `TrainConfig` of `--config FILE` (if any) and the flags, through tyro."""
    from critic_jax import config as config_lib

    path, args = _pop_config_file(args)
    if "-h" in args or "--help" in args:
        print(f"{prog}: {description}\n\noptions read before the others:\n{_CONFIG_HELP}")
    default = config_lib.load(path) if path else config_lib.TrainConfig()
    preset, args = _pop_options(args, {"model.preset": str})
    if preset:  # the preset's shape first, so every other --model.* flag overrides one field
        model = config_lib.with_preset(default.model, preset["model.preset"])
        default = dataclasses.replace(default, model=model)
    return _parse(
        config_lib.TrainConfig, default=default, args=args, prog=prog, description=description
    )


def _train(args: list[str]) -> int:
    cfg = _train_config(
        args,
        prog="critic-jax train",
        description="Train the critic. Every option can also come from --config FILE (JSON).",
    )
    from tqdm import tqdm

    from critic_jax import train as train_lib

    bars: list = []  # created at the first finished update, so set-up errors stay one line

    def progress():
        if not bars:
            bars.append(
                tqdm(
                    total=cfg.steps,
                    desc="critic",
                    unit="it",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    mininterval=0.5 if sys.stderr.isatty() else 10.0,
                )
            )
        return bars[0]

    def on_step(iteration: int, metrics: dict | None) -> None:
        bar = progress()
        if metrics:
            bar.set_postfix(
                loss=f"{metrics['loss']:.4g}",
                ev=f"{metrics['explained_variance']:.3f}",
                tok_s=f"{metrics['tokens_per_second']:.3g}",
                refresh=False,
            )
        bar.update(iteration - bar.n)

    def on_event(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    try:
        summary = train_lib.train(cfg, on_step=on_step, on_event=on_event)
    finally:
        if bars:
            bars[0].close()
    if summary.get("preempted"):
        print(
            f"critic-jax: preempted at iteration {summary['steps']}; "
            "checkpoint saved, run the same command again to resume"
        )
        return 0
    print(f"summary ({cfg.workdir}/summary.json):")
    for key in (
        "steps",
        "final_loss",
        "stopped_early",
        "relative_value_error",
        "explained_variance_vs_true",
        "advantage_error_vs_true",
        "advantage_sign_agreement",
        "advantage_rank_correlation",
        "tokens_per_second",
        "real_tokens_per_second",
        "compile_seconds",
    ):
        if summary.get(key) is not None:
            value = summary[key]
            print(
                f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}"
            )
    return 0


def _make_rollouts(args: list[str]) -> int:
    from critic_jax import mrp, rollouts

    cmd = _parse(MakeRollouts, args=args, prog="critic-jax make-rollouts")
    batch = mrp.sample_mrp(mrp.MRPConfig(), seed=cmd.seed, batch_size=cmd.rows, gamma=cmd.gamma)
    if cmd.sequence_level:
        batch = {k: v for k, v in batch.items() if k != "rewards"}
    else:
        batch = {k: v for k, v in batch.items() if k != "sequence_reward"}
    rollouts.write_rollouts(cmd.out, batch)
    print(json.dumps({"wrote": cmd.out, "rows": cmd.rows}))
    return 0


_PLAN_OPTIONS = {"seq_len": int, "devices": int, "target": str, "device_memory": str, "json": bool}
_PLAN_HELP = """plan options (besides every `critic-jax train` option below):
  --seq-len T             rollout width to plan for (default: the data's)
  --devices N             fake CPU devices for --target cpu (default: the mesh's size or 1)
  --target TARGET         cpu (default), or a TPU topology compiled with libtpu's compile-only
                          devices: tpu-v5e:2x4, tpu-v5p:2x2x2, tpu-v4:2x2x1, ...
  --device-memory SIZE    memory of one device for `fits`, e.g. 80GiB (TPU default: the chip's)
  --json                  print one JSON object instead of the table
"""


def _count(n: int) -> str:
    """A count to three digits: 13400 -> '13.4 k', 494032768 -> '494 M', 7504928769 -> '7.5 B'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= 0.9995 * scale:  # 999_999 is '1 M', not '1e+03 k'
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _plan(args: list[str]) -> int:
    opts, rest = _pop_options(args, _PLAN_OPTIONS)
    if "-h" in rest or "--help" in rest:
        print(_PLAN_HELP)
    target = opts.get("target", "cpu")
    try:
        devices = int(opts["devices"]) if "devices" in opts else None
        seq_len = int(opts["seq_len"]) if "seq_len" in opts else None
    except ValueError as e:
        raise ValueError(f"--devices and --seq-len take integers. Received: {opts}") from e
    if devices is not None and devices < 1:
        raise ValueError(f"--devices must be >= 1. Received: {devices}")
    flag = opts.get("json", "false").lower()
    if flag not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(f"--json takes no value, or true / false. Received: --json={flag}")
    as_json = flag in ("true", "1", "yes")
    # Compile-only TPU devices come from libtpu's own client: no backend but the CPU is needed.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if target == "cpu":
        import jax

        # Fake CPU devices must be set before JAX starts its backends.
        jax.config.update("jax_num_cpu_devices", devices or 1)
    elif devices is not None:
        raise ValueError(f"--devices applies to --target cpu; {target} has its own devices.")
    cfg = _train_config(rest, prog="critic-jax plan", description="Plan a run before renting it.")
    from critic_jax import plan as plan_lib

    memory = plan_lib.parse_bytes(opts["device_memory"]) if "device_memory" in opts else None
    if seq_len is None:
        seq_len = cfg.data.max_len or cfg.data.mrp.seq_len
    report = plan_lib.plan(cfg, seq_len=seq_len, target=target, device_memory=memory)
    if as_json:
        print(json.dumps(report))
        return 0
    gib = 2**30
    print(
        f"plan: {report['target']} ({report['device_kind']}), {report['devices']} devices, "
        f"mesh {report['mesh']}, {_count(report['parameters'])} parameters, "
        f"T = {report['seq_len']}, {report['tokens_per_iteration']} tokens per iteration, "
        f"compiled by {report['compiler']}"
    )
    if "compiler_warning" in report:
        print(f"  warning: {report['compiler_warning']}")
    for key in (
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "peak_bytes_per_device",
    ):
        if key in report:
            print(f"  {key:24s} {report[key] / gib:10.3f} GiB")
    if "note" in report:
        print(f"  {report['note']}")
    print(f"  {'compile_seconds':24s} {report['compile_seconds']:10.1f}")
    print(f"  {'flops_per_token':24s} {report['flops_per_token']:10.4g}")
    limit = report["device_memory"]
    verdict = (
        "unknown (give --device-memory)"
        if limit is None
        else (
            f"{'yes' if report['fits'] else 'NO'} "
            f"(peak {report['peak_bytes_per_device'] / gib:.2f} of {limit / gib:.2f} GiB)"
        )
    )
    print(f"  fits: {verdict}")
    return 0


_SCORE_OPTIONS = {"workdir": str, "out": str, "whiten": bool}
_SCORE_HELP = """score options (besides the `critic-jax train` options below that apply:
--data.path, --init-from, --ppo.gamma, --ppo.lam, --ppo.policy-lam, --ppo.adaptive-lam-alpha,
--data.kl-*, --data.batch-size, --mesh.*):
  --workdir RUN           score with this training run's latest checkpoint (its model), or
  --init-from HF_DIR      with an exported Hugging Face critic
  --data.path GLOB        the Parquet rollouts to score
  --out FILE              the Parquet file to write: the input's columns plus `values`,
                          `returns` (critic λ = --ppo.lam) and `advantages` (policy λ)
  --whiten                whiten the advantages over all valid tokens
"""


def _score(args: list[str]) -> int:
    opts, rest = _pop_options(args, _SCORE_OPTIONS)
    if "-h" in rest or "--help" in rest:
        print(_SCORE_HELP)
    base = _train_config(rest, prog="critic-jax score", description="Score rollouts.")
    if base.data.path is None:
        raise ValueError("score needs --data.path GLOB (Parquet rollouts). Received: none")
    if "out" not in opts:
        raise ValueError("score needs --out FILE. Received: none")
    from tqdm import tqdm

    from critic_jax import score as score_lib

    cfg, critic = score_lib.score_config(
        base, workdir=opts.get("workdir"), init_from=base.init_from
    )
    print(f"critic-jax: scoring {base.data.path} with the {critic}", file=sys.stderr)
    bar = tqdm(desc="score", unit="row", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = score_lib.score(
            cfg,
            paths=base.data.path,
            out=opts["out"],
            workdir=opts.get("workdir"),
            whiten=opts.get("whiten", "false").lower() in ("true", "1", "yes"),
            on_progress=progress,
        )
    finally:
        bar.close()
    print(json.dumps(summary))
    return 0


def _exit_on_signal(signum, frame):
    name = signal.Signals(signum).name
    message = f"\ncritic-jax: interrupted by {name} outside training; nothing was saved\n"
    os.write(2, message.encode())
    os._exit(128 + signum)


def install_startup_signal_handlers() -> None:
    """SIGINT / SIGTERM before training starts end the process at once with one line: nothing
    has been written yet, and a signal must never land inside JAX's import or compilation
    (which could crash the process). The training loop installs its own handlers."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, _exit_on_signal)
        except ValueError:  # not the main thread
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `critic-jax ARGS`; returns the exit code (0, 2 on bad input, 128 + signal)."""
    install_startup_signal_handlers()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("critic-jax: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    commands = {
        "train": _train,
        "make-rollouts": _make_rollouts,
        "plan": _plan,
        "score": _score,
    }
    if command not in commands:
        return _fail(f"unknown subcommand {command!r}; valid: {', '.join(commands)}")
    from critic_jax.checkpoint import CheckpointError
    from critic_jax.train import Interrupted, TrainingError

    try:
        return commands[command](rest)
    except (ValueError, TrainingError, CheckpointError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{type(e).__name__}: {e}")
    except Interrupted as e:
        print(f"critic-jax: {e}; nothing was saved", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
