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
import socket
import uuid
from typing import Any, Iterator

from absl import logging
from etils import epath


def _host() -> str:
  return re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname()) or 'host'


def _temporary_sibling(path: str, kind: str = 'tmp') -> str:
  """A hidden name beside `path`, unique per host, process and call; `kind` 'tmp' for what is
  being written, 'old' for a previous version moved aside. Not mkstemp: its 0600 mode would
  stick to the result."""
  folder, name = os.path.split(path)
  return os.path.join(folder,
                      f'.{name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}')


def _process_is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process
    return True
  return True


def _recover_abandoned_siblings(path: str) -> None:
  """Cleans up after writers of `path` on this host that were killed (SIGKILL allows no clean-up).

  Their unfinished folders are removed (an export of a large model is hundreds of MB that `ls`
  does not show). A previous version that a writer had moved aside ('old') is moved back if
  `path` is missing (the writer died between the two renames), else removed. Siblings of other
  hosts (a shared file system) are left alone: whether their writer runs cannot be told here.
  """
  folder, name = os.path.split(path)
  pattern = re.compile(re.escape(f'.{name}.{_host()}.') + r'(\d+)\.[0-9a-f]{8}\.(tmp|old)')
  try:
    entries = sorted(os.listdir(folder), key=lambda e: not e.endswith('.old'))   # 'old' first
  except FileNotFoundError:
    return
  for entry in entries:
    match = pattern.fullmatch(entry)
    if not match or _process_is_running(int(match.group(1))):
      continue
    sibling = os.path.join(folder, entry)
    if match.group(2) == 'old' and not os.path.lexists(path):
      os.replace(sibling, path)
      logging.warning('Restored %s from %s: process %s was killed while replacing it.', path,
                      entry, match.group(1))
    else:
      logging.info('Removing %s, left by process %s (no longer running).', sibling,
                   match.group(1))
      shutil.rmtree(sibling, ignore_errors=True)


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
  the complete old folder, absent for an instant, or the complete new one. What killed writers
  of `path` left is cleaned up first (`_recover_abandoned_siblings`).
  """
  path = os.path.abspath(os.fspath(path))
  _recover_abandoned_siblings(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _temporary_sibling(path)
  os.makedirs(tmp)
  try:
    yield tmp
    old = None
    if os.path.exists(path):
      old = _temporary_sibling(path, 'old')
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
