"""Orbax checkpoints of the train state: atomic saves, resume from the latest complete one.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed during a write leaves the previous checkpoint as the latest complete one. The data
position needs no separate record: the input pipeline restarts exactly at the saved step.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from cromss_jax import cli


class MissingCheckpoint(cli.UserError, FileNotFoundError):
  """A workdir without a (complete) checkpoint where one is needed."""


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
  """(state, meta) of the newest readable checkpoint, placed per the abstract state's shardings.

  A checkpoint that cannot be read (corrupted or truncated files) is skipped with a warning and
  the previous one is tried, so a damaged latest checkpoint costs one interval, not the run.
  None when there is no checkpoint at all.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as err:  # pylint: disable=broad-except  (any unreadable file)
      text = ' '.join(str(err).split())[:300]
      logging.warning('Checkpoint at step %d in %s cannot be read (%s: %s); trying the '
                      'previous one.', step, manager.directory, type(err).__name__, text)
      failures.append(f'step {step}: {type(err).__name__}: {text}')
      continue
    logging.info('Restored checkpoint at step %d from %s', step, manager.directory)
    if failures:
      _set_aside_newer(manager, step)
    return restored['state'], dict(restored['meta'])
  raise cli.UserError(f'no checkpoint in {manager.directory} can be restored ('
                      f'{"; ".join(failures)}); if the model or config changed, use another '
                      '--workdir')


def _set_aside_newer(manager: ocp.CheckpointManager, good_step: int) -> None:
  """Moves unreadable checkpoints newer than `good_step` out of the way (kept for inspection),
  so that the resumed run can save those steps again."""
  directory = os.fspath(manager.directory)
  aside = os.path.join(os.path.dirname(directory), 'unreadable_checkpoints')
  if '://' not in directory and jax.process_index() == 0:
    for step in manager.all_steps():
      if step > good_step:
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f'{step}.{os.getpid()}')
        os.replace(os.path.join(directory, str(step)), target)
        logging.warning('Moved the unreadable checkpoint of step %d to %s.', step, target)
  manager.reload()


def abstract_on_one_device(metadata_tree: Any) -> Any:
  """Shapes and dtypes of a saved tree, placed on this process's first device."""
  device = jax.local_devices()[0]
  single = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=single),
                      metadata_tree)


def load_latest_checkpoint(workdir: str) -> tuple[dict, dict, int]:
  """(state as nested dicts, meta, step) of the latest complete checkpoint, on one device."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise MissingCheckpoint(f'no checkpoints in {directory}: train first with '
                            f'`python -m cromss_jax.main --workdir={workdir} ...`')
  # Explicit handlers, so the saved tree's metadata (not its device layout) shapes the restore:
  # a checkpoint written by N devices or hosts restores onto this one device.
  handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
    step = manager.latest_step()
    if step is None:
      raise MissingCheckpoint(f'no complete checkpoint in {directory}')
    metadata = manager.item_metadata(step)['state']
    tree = metadata.tree if hasattr(metadata, 'tree') else metadata
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_on_one_device(tree)),
        meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta']), step


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with."""
  return ml_collections.ConfigDict(json.loads(meta['config']))


def load_transfer_checkpoint(workdir: str) -> tuple[ml_collections.ConfigDict, dict, dict, int]:
  """(config, variables, meta, step) of a transfer workdir's latest checkpoint."""
  state, meta, step = load_latest_checkpoint(workdir)
  if meta.get('task') != 'transfer':
    raise cli.UserError(f'{workdir} holds a {meta.get("task")!r} run, not a transfer run; '
                     'evaluate works on workdirs of `main --config=configs/transfer.py`.')
  config = config_from_meta(meta)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return config, variables, meta, int(step)
