"""Atomic folders: what a writer killed with SIGKILL leaves is cleaned up by the next writer."""
import os
import subprocess
import sys

import pytest

from cromss_jax import utils


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _sibling(folder, name: str, pid: int, kind: str, host: str | None = None) -> str:
  host = host or utils._host()  # pylint: disable=protected-access
  path = os.path.join(folder, f'.{name}.{host}.{pid}.0123abcd.{kind}')
  os.makedirs(path)
  with open(os.path.join(path, 'weights'), 'w') as f:
    f.write(kind)
  return path


def test_unfinished_folders_of_dead_writers_on_this_host_are_removed(tmp_path):
  dead, alive = _dead_pid(), os.getpid()
  unfinished = _sibling(tmp_path, 'E', dead, 'tmp')
  writing = _sibling(tmp_path, 'E', alive, 'tmp')
  elsewhere = _sibling(tmp_path, 'E', dead, 'tmp', host='another-host')
  other_name = _sibling(tmp_path, 'F', dead, 'tmp')
  with utils.atomic_directory(tmp_path / 'E', overwrite=False) as tmp:
    with open(os.path.join(tmp, 'weights'), 'w') as f:
      f.write('new')
  assert not os.path.exists(unfinished)
  for kept in (writing, elsewhere, other_name):   # running, unknowable, another output
    assert os.path.isdir(kept), kept
  assert (tmp_path / 'E' / 'weights').read_text() == 'new'


def test_a_writer_killed_between_the_renames_gets_the_old_folder_back(tmp_path):
  dead = _dead_pid()
  aside = _sibling(tmp_path, 'E', dead, 'old')       # the previous export, moved aside
  _sibling(tmp_path, 'E', dead, 'tmp')               # the new one, complete or not
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    with utils.atomic_directory(tmp_path / 'E', overwrite=False):
      pass
  assert not os.path.exists(aside)
  assert (tmp_path / 'E' / 'weights').read_text() == 'old'
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []


def test_an_old_folder_is_removed_when_the_replacement_is_in_place(tmp_path):
  (tmp_path / 'E').mkdir()
  (tmp_path / 'E' / 'weights').write_text('new')
  aside = _sibling(tmp_path, 'E', _dead_pid(), 'old')   # killed before removing it
  with utils.atomic_directory(tmp_path / 'E', overwrite=True) as tmp:
    with open(os.path.join(tmp, 'weights'), 'w') as f:
      f.write('newer')
  assert not os.path.exists(aside)
  assert (tmp_path / 'E' / 'weights').read_text() == 'newer'
  assert [p for p in os.listdir(tmp_path) if p.startswith('.')] == []
