"""Orbax checkpoints of the train state: atomic saves, resume from the latest complete one.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed during a write leaves the previous checkpoint as the latest complete one. The data
position needs no separate record: the input pipeline restarts exactly at the saved step.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


def create_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  # cleanup_tmp_directories: a write killed half-way leaves a temporary directory; it is
  # removed when the run restarts (it was never a complete checkpoint).
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  logging.info('Saved checkpoint at step %d to %s', step, manager.directory)


def restore_latest(manager: ocp.CheckpointManager,
                   abstract_state: Any) -> tuple[Any, dict] | None:
  """(state, meta) of the latest complete checkpoint, placed per the abstract state's shardings."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
  return restored['state'], dict(restored['meta'])
