"""Small helpers every module uses: atomic writes of files and folders.

A file or folder that a user may rely on is never seen half-written: it is written under a
temporary name in the destination folder and renamed into place (`os.replace` is atomic on one
file system), so a run killed at any moment leaves either the old or the new content.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Iterator

from absl import logging
from etils import epath


def _temporary_sibling(path: str) -> str:
  # Not mkstemp: its 0600 mode would stick to the result; this name is unique per process/call.
  folder, name = os.path.split(path)
  return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')


def _process_is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process
    return True
  return True


def _remove_abandoned_siblings(path: str) -> None:
  """Removes the temporary siblings of `path` (`_temporary_sibling`) whose writer no longer
  runs on this machine: a writer killed with SIGKILL cannot clean up, and an abandoned export
  of a large model takes hundreds of MB in a folder that `ls` does not show."""
  folder, name = os.path.split(path)
  pattern = re.compile(re.escape(f'.{name}.') + r'(\d+)\.[0-9a-f]{8}\.tmp')
  with contextlib.suppress(FileNotFoundError):
    for entry in os.listdir(folder):
      match = pattern.fullmatch(entry)
      if match and not _process_is_running(int(match.group(1))):
        logging.info('Removing %s, left unfinished by process %s (no longer running).',
                     os.path.join(folder, entry), match.group(1))
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path next to `path`; on success it replaces `path`, else it is removed."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _temporary_sibling(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """Atomically writes a UTF-8 text file; a remote path (gs://...) in one write (no rename)."""
  if '://' in os.fspath(path):
    epath.Path(path).write_text(text)
    return
  with atomic_output(path) as tmp:
    with open(tmp, 'w', encoding='utf-8', newline='') as f:
      f.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
  """Atomically writes `obj` as JSON (keys sorted, so reruns give identical files)."""
  write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + '\n')


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
  """Yields a temporary folder next to `path`; on success it takes the place of `path`.

  An existing `path` is only replaced when `overwrite` is set (FileExistsError otherwise); the old
  folder is renamed aside first and removed after the swap, so at every moment `path` is either
  the complete old folder, absent for an instant, or the complete new one. Temporary folders of
  `path` left by killed writers are removed first.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _remove_abandoned_siblings(path)
  tmp = _temporary_sibling(path)
  os.makedirs(tmp)
  try:
    yield tmp
    old = None
    if os.path.exists(path):
      old = _temporary_sibling(path)
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
