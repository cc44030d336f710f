"""Training checkpoints with orbax's `CheckpointManager`: everything a bit-exact resume needs.

One checkpoint (a step directory under `<run dir>/checkpoints/`) holds three items:
  - `state`: the train state pytree — parameters, optimizer state (AdamW moments and the
    schedule's step count), step — saved with `StandardSave` and restored into the abstract
    shapes of a freshly initialised state, so optax's named tuples come back as themselves;
  - `data`: the batch sampler's position (epoch, cursor, the PCG64 generator's state), JSON;
  - `meta`: what identifies the run (the settings that shape its trajectory), the history rows
    logged so far and the wall time spent, JSON.
Saving is synchronous: the train step donates its state buffers, which an asynchronous save
could still be reading.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 1):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like_state):
        """(state, data_state, meta) of checkpoint `step`; `like_state` gives the tree structure,
        shapes and dtypes the state is restored into."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return restored.state, restored.data, restored.meta

    def read_meta(self, step: int) -> dict:
        """Only the `meta` item of checkpoint `step` (no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def close(self) -> None:
        self._manager.close()
