"""Shared test settings: CPU only, quiet TF, and one XLA compilation cache for the session.

The persistent compilation cache lets the several processes of the resume and multi-process
tests (and repeated configs across modules) compile each program once; entries are keyed by
the program, so a cache hit never changes a result.
"""
import os
import sys
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'cromss_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


@pytest.fixture(autouse=True)
def _kill_leftovers():
  """Foreground subprocesses (helpers.Proc) still running when their test ends are killed."""
  import helpers  # pylint: disable=g-import-not-at-top
  yield
  while helpers.Proc.foreground:
    helpers.Proc.foreground.pop().kill()


# Fixtures that train (or export) the shared ResNet-18 pretraining run of tests/pretrain_run.py:
# about 150 s of set-up on 2 cores, so every test that needs one is `slow` (run by `make test`,
# left out of `make test-fast`).
_SHARED_RUN_FIXTURES = frozenset({'shared', 'exported'})


# The longest units of work (an xdist group stays on one worker), longest first. `make test`
# hands units to the two workers in collection order (--no-loadscope-reorder), so these start
# at once and the short tests fill in around them; last in line, the study alone kept one
# worker busy for minutes after the other had finished.
_START_FIRST = ('@pretrain_run', 'test_study.py::test_tiny_study', '@resnet18_step',
                '@test_models', '@test_dwosm', '@test_convert_runner')


def _start_rank(item) -> int:
  nodeid = item.nodeid + _xdist_group_suffix(item)
  return next((rank for rank, part in enumerate(_START_FIRST) if part in nodeid),
              len(_START_FIRST))


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _SHARED_RUN_FIXTURES.intersection(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.slow)
  _restore_xdist_groups(config, items)
  items.sort(key=_start_rank)   # stable: the order within a unit is kept


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
  """Frees the shared pretraining run (~1.4 GB on disk) after the last test of its group.

  The group's tests run one after another on one worker (one xdist unit; the collection is
  sorted by `_start_rank`), and `nextitem` is the next test this worker runs, so a next test
  outside the group means no test here needs the run again. Kept for inspection when a test of
  this worker failed.
  """
  if item.session.testsfailed:
    return
  shared = sys.modules.get('pretrain_run')
  group = '@' + shared.GROUP if shared else None
  if group and _xdist_group_suffix(item) == group and (
      nextitem is None or _xdist_group_suffix(nextitem) != group):
    shared.release()


def _xdist_group_suffix(item) -> str:
  names = {str(m.args[0] if m.args else m.kwargs.get('name', 'default'))
           for m in item.iter_markers('xdist_group')}
  return '@' + '_'.join(sorted(names)) if names else ''


def _restore_xdist_groups(config, items) -> None:
  """Keeps each `xdist_group` on one worker under `--dist loadgroup`.

  pytest-xdist 3.8.0 tells its scheduler a test's group by appending '@group' to the test's
  private `item._nodeid`, which pytest 9.2 no longer reads (node ids became structured,
  `item._id`): the suffix is lost, the groups are spread over the workers like `--dist load`,
  and each worker made the shared pretraining run of tests/pretrain_run.py again (~200 s;
  pytest-dev/pytest-xdist#1386). This sets the suffix where xdist's own hook could not; it does
  nothing where the suffix is already there (a fixed xdist, or an older pytest).
  """
  if not getattr(config.option, 'loadgroup', False):   # set on the xdist workers only
    return
  for item in items:
    suffix = _xdist_group_suffix(item)
    if not suffix or item.nodeid.endswith(suffix) or not hasattr(item, '_id'):
      continue
    from _pytest.nodeid import NodeId  # pylint: disable=g-import-not-at-top
    item._id = NodeId.parse(item.nodeid + suffix)  # pylint: disable=protected-access
