"""Orbax checkpoints: the train state, the data iterator's position and the config, together.

The only module that imports Orbax. A checkpoint is a directory `WORKDIR/checkpoints/<step>/`
with three items: `state` (the `TrainState` arrays, as a pure pytree), `data` (the iterator's
JSON state) and `config` (the run's config as JSON). Saves are asynchronous; a save that did not
finish (a killed process) leaves no step directory that Orbax would list, and a step whose files
are damaged is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Orbax logs whole tracebacks for failures this module reports in one line of its own.
for _name in ("orbax", "absl"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints of the state, the data position and the config.

    Attributes:
      every: save every this many iterations (0: only at the end and on preemption).
      max_to_keep: how many recent checkpoints to keep.
      async_save: write in a background thread while training goes on.
      restore: resume from the latest checkpoint in the workdir if there is one.
      restore_step: resume from this step instead of the latest; later checkpoints of the
        earlier run are moved to `checkpoints-superseded/`.
    """

    every: int = 100
    max_to_keep: int = 3
    async_save: bool = True
    restore: bool = True
    restore_step: int | None = None

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0. Received: {self.every}")
        if self.max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1. Received: {self.max_to_keep}")
        if self.restore_step is not None and self.restore_step < 0:
            raise ValueError(f"checkpoint.restore_step must be >= 0. Received: {self.restore_step}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no usable checkpoint could be restored."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


class Checkpointer:
    """Saves and restores (state, data-iterator state, config) under `directory`."""

    def __init__(
        self,
        directory: str | Path,
        config: CheckpointConfig,
        *,
        on_warning: Callable[[str], None] | None = None,
    ):
        self.directory = Path(directory).absolute()
        self.config = config
        self._warn = on_warning or (lambda message: None)
        self._remove_partial_saves()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.max_to_keep,
                enable_async_checkpointing=config.async_save,
                create=True,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _remove_partial_saves(self) -> None:
        """Deletes the temporary directories of saves that never finished (a killed process,
        a full disk): Orbax never lists them, so they are only litter."""
        if self.directory.is_dir():
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def save(self, step: int, state: Any, *, data_state: dict, config: dict, force=False) -> bool:
        """Starts saving; returns whether a save was started (Orbax skips a duplicate step).

        Raises:
          CheckpointError: (one line) when the save cannot be started or written.
        """
        if step in self._manager.all_steps():
            return False
        try:
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write is reported in one line
            self._remove_partial_saves()
            raise CheckpointError(
                f"Cannot save checkpoint step {step} in {self.directory}: {_one_line(e)}"
            ) from None

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed to disk.

        Raises:
          CheckpointError: (one line) when an asynchronous save failed (e.g. a full disk).
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._remove_partial_saves()
            raise CheckpointError(
                f"Cannot save a checkpoint in {self.directory}: {_one_line(e)}"
            ) from None

    def saved_config(self, step: int) -> dict | None:
        """The config stored with `step`, or None if it cannot be read."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception:  # noqa: BLE001 - a damaged step has no readable config
            return None
        return dict(restored["config"])

    def supersede_after(self, step: int) -> list[int]:
        """Moves the checkpoints newer than `step` to `<directory>-superseded/` (a resume from
        an older step starts a new branch: the old later steps must neither be lost nor
        restored by the next resume). Returns the moved steps."""
        later = [s for s in self.all_steps() if s > step]
        if not later:
            return []
        self.wait()
        aside = self.directory.parent / f"{self.directory.name}-superseded"
        aside.mkdir(parents=True, exist_ok=True)
        for s in later:
            target = aside / str(s)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(s)), str(target))
        self._manager.reload()
        return later

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores onto the shardings of `abstract_state` (a tree of `jax.ShapeDtypeStruct`s
        with shardings for the *current* mesh), so a run may resume on a different mesh.

        With `step=None`, tries the newest step first and falls back, with a warning, to older
        ones whose files can be read.

        Returns:
          (step, state, data_state).

        Raises:
          CheckpointError: if no step (or the named step) can be restored.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"No checkpoint in {self.directory}")
        errors = []
        for s in steps:
            try:
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        # Read too, so a step whose config is damaged counts as damaged: the
                        # resume check (which reads it) must never be skipped for it.
                        config=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any damage to a step means: try an older one
                errors.append(f"step {s}: {_one_line(e)[:120]}")
                self._warn(
                    f"warning: checkpoint step {s} in {self.directory} cannot be restored "
                    f"({_one_line(e)[:120]}); trying an older one"
                )
                continue
            return s, restored["state"], dict(restored["data"])
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored: " + "; ".join(errors)
        )

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
            # A failed asynchronous save may finish failing only now: leave no litter behind.
            self._remove_partial_saves()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, as `restore` wants."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


# --- the state as Orbax stores it: nested dicts of plain arrays ---------------------------------


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def to_checkpoint_tree(state: Any) -> dict:
    """A pytree (the `TrainState`) as nested dicts of arrays keyed by its pytree paths."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = out
        names = [_key_name(p) for p in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_checkpoint_tree(tree: dict, like: Any) -> Any:
    """Inverse of `to_checkpoint_tree`, with the pytree structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = tree
        for p in path:
            node = node[_key_name(p)]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


def save_state(
    checkpointer: Checkpointer,
    step: int,
    state: Any,
    *,
    data_state: dict,
    config: dict,
    force=False,
) -> bool:
    """Starts saving `state` (any pytree of arrays) with the iterator position and config."""
    return checkpointer.save(
        step, to_checkpoint_tree(state), data_state=data_state, config=config, force=force
    )


def restore_state(checkpointer: Checkpointer, like: Any, step: int | None = None):
    """Restores a state saved by `save_state` onto the shardings of `like` (a state of the same
    structure placed for the *current* mesh, or its abstract `jax.ShapeDtypeStruct`s).

    Returns:
      (step, state, data_state).

    Raises:
      CheckpointError: if no step (or the named step) can be restored.
    """
    abstract = abstract_like(to_checkpoint_tree(like))
    step, tree, data_state = checkpointer.restore(abstract, step)
    return step, from_checkpoint_tree(tree, like), data_state


__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "abstract_like",
    "from_checkpoint_tree",
    "restore_state",
    "save_state",
    "to_checkpoint_tree",
]
