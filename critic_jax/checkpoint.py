"""Orbax checkpoints: the train state, the data iterator's position and the config, together.

The only module that imports Orbax. A checkpoint is a directory `WORKDIR/checkpoints/<step>/`
with three items: `state` (the `TrainState` arrays, as a pure pytree), `data` (the iterator's
JSON state) and `config` (the run's config as JSON). Saves are asynchronous; a save that did not
finish (a killed process) leaves no step directory that Orbax would list, and a step whose files
are damaged is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Attributes:
    every: save every this many iterations (0: only at the end and on preemption).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread while training goes on.
    restore: resume from the latest checkpoint in the workdir if there is one.
    restore_step: resume from this step instead of the latest.
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
    """No usable checkpoint could be restored."""


class Checkpointer:
    """Saves and restores (state, data-iterator state, config) under `directory`."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.config = config
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

    def save(self, step: int, state: Any, *, data_state: dict, config: dict, force=False) -> bool:
        """Starts saving; returns whether a save was started (Orbax skips a duplicate step)."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed to disk."""
        self._manager.wait_until_finished()

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
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any damage to a step means: try an older one
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                warnings.warn(
                    f"Checkpoint step {s} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e)[:200]}); trying an older one.",
                    stacklevel=2,
                )
                continue
            return s, restored["state"], dict(restored["data"])
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored:\n" + "\n".join(errors)
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays, as `restore` wants."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer", "abstract_like"]
