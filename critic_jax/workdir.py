"""What a run owns in its workdir, and how it ends: the lock, the metrics log, the resume rules,
strict JSON, and the signals that stop it.

A workdir belongs to one live run (`WorkdirLock`); `metrics.jsonl` and TensorBoard events are
written by `MetricsWriter`; a resume may change only `RESUMABLE_KEYS` (`check_resume_config`);
SIGINT / SIGTERM become a flag the loop checks (`Signals`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from critic_jax.config import TrainConfig, to_dict

# Settings a resumed run may change; any other difference from the checkpoint's config is refused
# (the state or the data it was trained on would no longer match what the run says it is).
RESUMABLE_KEYS = ("steps", "workdir", "log", "checkpoint", "stop")


class TrainingError(RuntimeError):
    """A run that cannot go on or would learn nothing (one line, for the command line)."""


class Interrupted(Exception):  # noqa: N818 - the name says what happened
    """SIGINT / SIGTERM arrived before there was any trained state to save."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} before the first update")
        self.signum = signum


def json_safe(x: Any) -> Any:
    """NaN and infinities become None, so every file written is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return x


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard event files (process 0 only)."""

    def __init__(
        self,
        workdir: Path,
        *,
        tensorboard: bool,
        resume_iteration: int = 0,
        on_event: Callable[[str], None] = lambda s: None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the lines up to the resumed iteration, drop damaged ones
            keep, damaged = [], 0
            for line in self.path.read_text(errors="replace").splitlines():
                row = _parse_line(line)
                if row is None:
                    damaged += line.strip() != ""
                elif row.get("iteration", 0) <= resume_iteration:
                    keep.append(json.dumps(row, allow_nan=False))
            if damaged:
                on_event(f"warning: dropped {damaged} damaged line(s) of {self.path}")
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = json_safe({"iteration": iteration, **metrics})
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, iteration)

    def last(self) -> dict[str, Any]:
        """The last line written (after a resume that had nothing left to run)."""
        if not (self.enabled and self.path.exists()):
            return {}
        rows = [r for r in map(_parse_line, self.path.read_text().splitlines()) if r]
        return rows[-1] if rows else {}

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parse_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("iteration", 0), int):
        return None
    return row


class Signals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between phases and updates.

    Installed before any JAX work, so a signal during start-up or compilation never interrupts
    XLA; a second signal exits at once (the process has been asked twice).
    """

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:
            # A line of its own: a progress bar may be half-way through a line.
            os.write(2, b"\ncritic-jax: interrupted twice; exiting without a save\n")
            os._exit(128 + signum)
        self.signum = signum

    def check(self) -> None:
        """Raises `Interrupted` if a signal came while there was nothing to save yet."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            # After a signal the run has saved and is ending: a repeated Ctrl-C must not kill it
            # on its way out.
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else old)


class WorkdirLock:
    """An exclusive lock on a workdir (`WORKDIR/.lock`, `fcntl.flock`): one live run per workdir.

    The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a
    stale lock file never blocks a new run; the file only records the holder's pid for the
    message.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / ".lock"
        self._file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise TrainingError(
                f"workdir {self.path.parent} is in use by a running training process "
                f"(pid {holder}); wait for it or choose another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict | None, config: TrainConfig, step: int) -> None:
    """Refuses a resume whose config differs from the checkpoint's outside `RESUMABLE_KEYS`.

    Raises:
      TrainingError: naming every changed key, with the saved and the new value.
    """
    if saved is None:
        return
    old, new = _flatten(saved), _flatten(to_dict(config))
    changed = [
        k
        for k in sorted(set(old) | set(new))
        if k.split(".")[0] not in RESUMABLE_KEYS and old.get(k) != new.get(k)
    ]
    if changed:
        listing = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise TrainingError(
            f"cannot resume from checkpoint step {step}: these settings differ from the run "
            f"that saved it ({listing}); only {', '.join(RESUMABLE_KEYS)} may change on resume. "
            "Use a new --workdir, or --checkpoint.restore false to start over in this one"
        )
