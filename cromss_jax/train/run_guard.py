"""What keeps one workdir to one run: a lock file, and the config the run was started with.

A workdir resumed with another model, objective, data or schedule would silently mix two runs
(and the checkpoint garbage collection would delete the first run's checkpoints), so the config
is recorded at the start (`config.json`) and compared on every restart. Keys that only change
how a run is observed or placed (logging, panels, mesh, data location) may differ.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from typing import Any

import jax
import ml_collections
from etils import epath

from cromss_jax import cli
from cromss_jax import utils

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Settings a resumed run may change: where the data lives, how progress is reported and kept,
# how long to train, and how the devices are arranged.
MAY_CHANGE_ON_RESUME = (
    'data.dataset_dir', 'data.cache', 'data.num_parallel_calls', 'data.prefetch',
    'data.num_workers',
    'training.num_epochs', 'training.log_every_steps', 'training.panel_every_epochs',
    'training.keep_checkpoints', 'training.checkpoint_every_epochs',
    'training.max_consecutive_nonfinite', 'training.eval_batch_size', 'mesh.')


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_differences(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for each key that differs and is not allowed to change on resume."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  out = []
  for key in sorted(set(old_flat) | set(new_flat)):
    if any(key == k or (k.endswith('.') and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME):
      continue
    a, b = old_flat.get(key, '<absent>'), new_flat.get(key, '<absent>')
    if a != b:
      out.append(f'{key}: {a!r} -> {b!r}')
  return out


def check_and_record_config(workdir: str, config: ml_collections.ConfigDict, *,
                            allow_change: bool) -> None:
  """Refuses a workdir started with another config; records this one (process 0)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  recorded_file = epath.Path(path)   # local paths without TensorFlow, gs:// with it
  if recorded_file.exists():
    recorded = json.loads(recorded_file.read_text())
    differences = config_differences(recorded, current)
    if differences and not allow_change:
      raise cli.UserError(
          f'{workdir} holds a run made with another config ({path}); differing: '
          f'{"; ".join(differences)}. Use another --workdir, or pass --allow_config_change to '
          'resume this run with the new values.')
  if jax.process_index() == 0:
    utils.write_json(path, current)


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` for the life of the run (process 0, local disks).

  `flock` is released by the kernel when the process dies, so a run killed with SIGKILL never
  leaves a stale lock. Remote file systems (gs://) cannot be locked and are left unlocked.
  """

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self) -> 'WorkdirLock':
    if '://' in self._path or jax.process_index() != 0:
      return self
    handle = open(self._path, 'a+', encoding='utf-8')
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      owner = handle.read().strip() or 'another process'
      handle.close()
      raise cli.UserError(f'{os.path.dirname(self._path)} is in use by {owner} (lock '
                          f'{self._path}); wait for it to finish or use another --workdir') from None
    handle.seek(0)
    handle.truncate()
    handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
