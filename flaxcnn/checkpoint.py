"""Orbax checkpoints of a `TrainState` plus a small JSON record of where the run stands.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed at any moment leaves the previous checkpoints intact and `latest` never sees a partial one.
"""

import os

import jax
import orbax.checkpoint as ocp

from flaxcnn.training import TrainState


def _tree(state: TrainState):
    # Typed PRNG keys are stored as their raw key data.
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


class Checkpointer:
    """Saves and restores (state, meta) pairs under `directory`, keyed by the global step."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, state: TrainState, meta: dict):
        step = state.step
        if isinstance(step, jax.Array):  # replicated: with several processes, read a local copy
            step = step.addressable_data(0)
        step = int(step)
        if step in self.manager.all_steps():
            # The same step saved twice (e.g. a signal right at an epoch end): keep the first.
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_tree(state)), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self):
        self.manager.wait_until_finished()

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, template: TrainState, step: int | None = None):
        """Restores onto `template`'s structure, shardings and dtypes; returns (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _tree(template))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        tree = restored["state"]
        state = template.replace(
            step=tree["step"],
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            opt_state=tree["opt_state"],
            rng=jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(template.rng)),
        )
        return state, restored["meta"]

    def close(self):
        self.manager.close()
