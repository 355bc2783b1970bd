"""The conversion runner under faults and bad input (data_prep.common), run as users type it.

Covers: non-UTF-8 paths reported escaped; a worker killed with SIGKILL (retried, or given up
with a message, never a hang); workers that cannot start; `error: ...` lines instead of
tracebacks; --overwrite and make_demo deleting only their own recorded files; a rerun after
fixing inputs rebuilding exactly the shards whose files changed.
"""
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep import common

# One xdist worker for the module: the module-scoped demo (a make_demo subprocess) is then
# generated once, not once per worker.
pytestmark = pytest.mark.xdist_group('test_convert_runner')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # Far above a normal run (~15 s): reaching it means a hang.


def _run(*args, timeout=TIMEOUT_S, **kwargs):
  """`python -m <args>` from the repository root, as a user types it."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *map(os.fsdecode, args)], cwd=REPO, env=env,
                        check=False, capture_output=True, text=True, errors='replace',
                        timeout=timeout, **kwargs)


def _error_line(proc):
  """The single `error: ...` line of a failed command (and no traceback)."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  root = tmp_path_factory.mktemp('runner') / 'demo'
  proc = _run('data_prep.make_demo', '--out', str(root), '--locations', '3',
              '--dfc-validation', '12', '--dfc-test', '4', '--scene-size', '16x16')
  assert proc.returncode == 0, proc.stderr
  yield root
  shutil.rmtree(root.parent, ignore_errors=True)   # ~50 MB of GeoTIFFs


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _ssl4eo_args(root, out, *extra):
  return ['data_prep.ssl4eo', '--s1', str(root / 's1'), '--s2', str(root / 's2c'),
          '--labels', str(root / 'labels' / 'noisy_manifest.csv'), '--out', str(out),
          '--val-fraction', '0', *extra]


def _num_examples(out):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(str(out))
  return builder.info.name, {k: v.num_examples for k, v in builder.info.splits.items()}


def _total(out):
  name, splits = _num_examples(out)
  return name, sum(splits.values())


def _rejects(out):
  with open(os.path.join(out, common.REJECTS_FILE), encoding='utf-8') as f:  # Strict UTF-8.
    return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------
# issue 13 item 1: a non-UTF-8 name is reported, escaped, and the rest converts.


@pytest.mark.slow
def test_non_utf8_folder_name_is_reported_escaped(demo, tmp_path):
  root = _copy(demo / 'ssl4eo', tmp_path / 'ssl4eo')
  loc_dir = os.fsencode(root / 's2c' / '0000001')
  acq = min(os.listdir(loc_dir))
  os.rename(os.path.join(loc_dir, acq), os.path.join(loc_dir, acq + b'\xff'))

  out = tmp_path / 'out'
  proc = _run(*_ssl4eo_args(root, out, '--workers', '1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _total(out) == ('ssl4eo_s12_nol', 2 * 4)  # records: one per (location, season)
  (row,) = _rejects(out)
  assert row['location'] == '1'
  assert '\\xff' in row['file'] + row['reason'], row
  with open(out / common.SUMMARY_FILE, encoding='utf-8') as f:
    total = json.load(f)['total']
  assert total['skipped'] == 1 and total['converted'] == 2 and total['records'] == 2 * 4

  # --strict stops at it with one escaped `error:` line.
  proc = _run(*_ssl4eo_args(root, tmp_path / 'strict', '--workers', '1', '--strict'))
  line = _error_line(proc)
  assert '\\xff' in line and '--strict' in line, line


# -------------------------------------------------------------------------------------------
# issue 13 item 2: dead workers never hang the converter.


def _ppid(pid):
  with open(f'/proc/{pid}/stat') as f:
    return int(f.read().rsplit(')', 1)[1].split()[1])


def _worker_building_a_shard(out, driver_pid, deadline):
  """Pid of a pool worker (child of the driver) while it writes a shard (its .tmp-<pid>)."""
  state = out / common.STATE_DIR
  while time.monotonic() < deadline:
    for name in os.listdir(state) if state.is_dir() else ():
      if '.tfrecord-' in name and '.tmp-' in name:
        pid = int(name.rsplit('.tmp-', 1)[1])
        try:
          if _ppid(pid) == driver_pid:
            return pid
        except (OSError, ValueError):
          pass
    time.sleep(0.005)
  return None


@pytest.mark.slow
def test_killed_worker_shard_is_retried_and_the_run_finishes(demo, tmp_path):
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  driver = subprocess.Popen(
      [sys.executable, '-m', 'data_prep.dfc2020', '--root', str(demo / 'dfc2020'), '--out',
       str(out), '--workers', '2', '--examples-per-shard', '6'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    victim = _worker_building_a_shard(out, driver.pid, time.monotonic() + TIMEOUT_S)
    assert victim is not None, 'no worker was seen building a shard'
    os.kill(victim, signal.SIGKILL)
    _, stderr = driver.communicate(timeout=TIMEOUT_S)  # The old Pool waited here forever.
  finally:
    if driver.poll() is None:
      driver.kill()
      driver.wait()
  assert driver.returncode == 0, stderr[-3000:]
  assert f'worker pid {victim} was killed by SIGKILL' in stderr and 'retrying' in stderr
  assert _num_examples(out) == ('dfc2020', {'validation': 12, 'test': 4})
  with open(out / common.SUMMARY_FILE) as f:
    assert json.load(f)['total']['converted'] == 16


@pytest.mark.slow
def test_ctrl_c_stops_workers_and_the_rerun_resumes(demo, tmp_path):
  out = tmp_path / 'out'
  cmd = ['data_prep.dfc2020', '--root', str(demo / 'dfc2020'), '--out', str(out), '--workers',
         '2', '--examples-per-shard', '1']
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  # As from a terminal: Ctrl-C not ignored, whatever this test process inherited (an ignored
  # SIGINT passes through exec, and Python then never raises KeyboardInterrupt).
  driver = subprocess.Popen([sys.executable, '-m', *cmd], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    worker = _worker_building_a_shard(out, driver.pid, time.monotonic() + TIMEOUT_S)
    assert worker is not None, 'no worker was seen building a shard'
    os.kill(driver.pid, signal.SIGINT)
    _, stderr = driver.communicate(timeout=TIMEOUT_S)
  finally:
    if driver.poll() is None:
      driver.kill()
      driver.wait()
  assert driver.returncode == common.EXIT_INTERRUPTED, (
      f'SIGINT here: {signal.getsignal(signal.SIGINT)}\n{stderr[-3000:]}')
  assert 'Traceback' not in stderr and 'rerun the same command to resume' in stderr
  assert not os.path.exists(f'/proc/{worker}')  # The driver stopped (and reaped) it.
  proc = _run(*cmd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _num_examples(out) == ('dfc2020', {'validation': 12, 'test': 4})


@dataclasses.dataclass(frozen=True)
class _ToyConverter(common.Converter):
  """Items are ints; `die_on` kills its own worker, `broken_start` breaks the worker set-up."""
  parent_pid: int
  die_on: int = -1
  broken_start: str = ''

  name = 'toy'

  def features(self):
    if os.getpid() != self.parent_pid:
      if self.broken_start == 'raise':
        raise ImportError('no module named gdal_plugin')
      if self.broken_start == 'exit':
        os._exit(3)  # pylint: disable=protected-access
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.features.FeaturesDict({'x': tfds.features.Tensor(shape=(), dtype=np.int64)})

  def convert(self, item):
    if item == self.die_on:
      os.kill(os.getpid(), signal.SIGKILL)
    return {'x': np.int64(item)}, {}

  def item_name(self, item):
    return str(item)

  def fingerprint(self):
    return {}


@pytest.mark.slow
def test_shard_that_always_kills_its_worker_is_given_up_with_a_message(tmp_path):
  out = tmp_path / 'out'
  items = {'train': list(range(6))}
  with pytest.raises(common.ConversionError) as err:
    common.run_conversion(_ToyConverter(os.getpid(), die_on=3), items, str(out),
                          examples_per_shard=2, workers=2, max_retries=1)
  message = str(err.value)
  assert 'shard train-00001 (2 item: 2 .. 3)' in message and 'SIGKILL' in message, message
  assert 'on each of 2 attempts' in message and 'rerun' in message, message
  state = os.listdir(out / common.STATE_DIR)
  assert 'train-00000.json' in state and 'train-00002.json' in state
  assert 'train-00001.json' not in state and not (out / 'dataset_info.json').exists()
  assert not [f for f in state if '.tmp-' in f]

  # The rerun (the cause gone) builds only the missing shard.
  summary = common.run_conversion(_ToyConverter(os.getpid()), items, str(out),
                                  examples_per_shard=2, workers=2, max_retries=1)
  assert summary['this_run']['shards_built'] == 1 and summary['total']['converted'] == 6


@pytest.mark.parametrize('broken', ['raise', 'exit'])
def test_workers_that_cannot_start_stop_the_run(tmp_path, broken):
  start = time.monotonic()
  with pytest.raises(common.ConversionError) as err:
    common.run_conversion(_ToyConverter(os.getpid(), broken_start=broken),
                          {'train': list(range(4))}, str(tmp_path / 'out'),
                          examples_per_shard=1, workers=2)
  message = str(err.value)
  assert 'fail to start' in message and '--workers 1' in message, message
  if broken == 'raise':
    assert 'ImportError: no module named gdal_plugin' in message, message
  else:
    assert 'exited with status 3' in message, message
  assert time.monotonic() - start < TIMEOUT_S


# -------------------------------------------------------------------------------------------
# One item, several records (ssl4eo: one per season), in array_record shards.


@dataclasses.dataclass(frozen=True)
class _ToyPartsConverter(_ToyConverter):
  """Each item is written as 3 array_record records; item `broken` has an unwritable 2nd one."""
  broken: int = -1

  file_format = 'array_record'

  def features(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.features.FeaturesDict({'x': tfds.features.Tensor(shape=(), dtype=np.int64),
                                       'part': tfds.features.Tensor(shape=(), dtype=np.int64)})

  def records(self, example):
    parts = [{'x': example['x'], 'part': np.int64(p)} for p in range(3)]
    if example['x'] == self.broken:
      parts[1]['part'] = np.zeros(2, np.int64)  # Wrong shape: fails to serialise.
    return parts


def _plan(out):
  with open(out / common.STATE_DIR / 'plan.json') as f:
    return json.load(f)


def test_an_item_is_written_as_its_records(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'out'
  items = {'train': list(range(5)), 'validation': [7]}
  summary = common.run_conversion(_ToyPartsConverter(os.getpid(), broken=3), items, str(out),
                                  examples_per_shard=2, workers=1)
  assert summary['total']['converted'] == 5 and summary['total']['records'] == 15
  train = summary['splits']['train']
  assert train['converted'] == 4 and train['records'] == 12
  assert summary['total']['skipped'] == 1 and _rejects(out)[0]['location'] == '3'
  assert _plan(out)['file_format'] == 'array_record'
  assert sorted(f for f in os.listdir(out) if 'array_record' in f) == [
      'toy-train.array_record-00000-of-00003', 'toy-train.array_record-00001-of-00003',
      'toy-train.array_record-00002-of-00003', 'toy-validation.array_record-00000-of-00001']
  with open(out / common.STATE_DIR / 'train-00001.json') as f:
    marker = json.load(f)
  assert (marker['planned'], marker['converted'], marker['num_examples']) == (2, 1, 3)

  builder = tfds.builder_from_directory(str(out))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert builder.info.splits['train'].shard_lengths == [6, 3, 3]  # records, not items
  source = builder.as_data_source('train')
  got = [(int(source[i]['x']), int(source[i]['part'])) for i in range(len(source))]
  # Consecutive per item, in item order; none of the failed item's records.
  assert got == [(x, p) for x in (0, 1, 2, 4) for p in range(3)]


def test_a_different_file_format_is_refused_without_overwrite(tmp_path):
  out = tmp_path / 'out'
  items = {'train': list(range(4))}
  common.run_conversion(_ToyConverter(os.getpid()), items, str(out), examples_per_shard=2,
                        workers=1)
  assert _plan(out)['file_format'] == 'tfrecord'

  # A state written before plans named the file format (TFRecord) resumes as it is.
  plan = _plan(out)
  del plan['file_format']
  (out / common.STATE_DIR / 'plan.json').write_text(json.dumps(plan))
  for index in (0, 1):
    path = out / common.STATE_DIR / f'train-{index:05d}.json'
    marker = json.loads(path.read_text())
    del marker['converted']  # Older markers: num_examples only (one record per item).
    path.write_text(json.dumps(marker))
  summary = common.run_conversion(_ToyConverter(os.getpid()), items, str(out),
                                  examples_per_shard=2, workers=1)
  assert summary['this_run']['shards_reused'] == 2 and summary['this_run']['shards_built'] == 0
  assert summary['total']['converted'] == 4 and summary['total']['records'] == 4
  before = sorted(os.listdir(out))
  assert [f for f in before if '.tfrecord-' in f] == [
      'toy-train.tfrecord-00000-of-00002', 'toy-train.tfrecord-00001-of-00002']

  with pytest.raises(common.ConversionError) as err:
    common.run_conversion(_ToyPartsConverter(os.getpid()), items, str(out),
                          examples_per_shard=2, workers=1)
  message = str(err.value)
  assert 'holds tfrecord shards' in message and 'now written as array_record' in message, message
  assert '--overwrite' in message, message
  assert sorted(os.listdir(out)) == before

  summary = common.run_conversion(_ToyPartsConverter(os.getpid()), items, str(out),
                                  examples_per_shard=2, workers=1, overwrite=True)
  assert summary['total']['records'] == 12
  assert not [f for f in os.listdir(out) if '.tfrecord-' in f]
  assert len([f for f in os.listdir(out) if '.array_record-' in f]) == 2


# -------------------------------------------------------------------------------------------
# issue 13 item 8: user errors of the converters are one `error:` line, exit status 1.


@pytest.mark.slow
def test_user_errors_are_one_error_line(demo, tmp_path):
  manifest = tmp_path / 'latin1.csv'
  manifest.write_bytes(b'location,season,path\n0000000,0,caf\xe9/0.tif\n')
  line = _error_line(_run('data_prep.ssl4eo', '--s1', str(demo / 'ssl4eo' / 's1'), '--s2',
                          str(demo / 'ssl4eo' / 's2c'), '--labels', str(manifest),
                          '--out', str(tmp_path / 'o1')))
  assert str(manifest) in line and 'UTF-8' in line, line

  short_row = tmp_path / 'short_row.csv'
  short_row.write_text('location,season,path\n0000000,0,a/0.tif\n0000000,1\n')
  line = _error_line(_run('data_prep.ssl4eo', '--s1', str(demo / 'ssl4eo' / 's1'), '--s2',
                          str(demo / 'ssl4eo' / 's2c'), '--labels', str(short_row),
                          '--out', str(tmp_path / 'o3')))
  assert f'{short_row}:3: 2 columns but the header has 3' in line, line

  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  dfc = ['data_prep.dfc2020', '--root', str(demo / 'dfc2020'), '--workers', '1', '--limit', '1']
  line = _error_line(_run(*dfc, '--out', str(a_file / 'sub')))
  assert line.startswith(f'error: cannot create --out {a_file / "sub"}: '), line
  line = _error_line(_run(*dfc, '--out', str(a_file)))
  assert 'a file of that name exists' in line, line

  for bad in (['--workers', '0'], ['--grid-tolerance-px', 'nan'], ['--limit', '-1'],
              ['--examples-per-shard', '0']):
    proc = _run(*dfc, '--out', str(tmp_path / 'o2'), *bad)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, (bad, proc.stderr[-2000:])


# -------------------------------------------------------------------------------------------
# issue 13 item 11: only files the tool wrote and recorded are ever deleted.


@pytest.mark.slow
def test_overwrite_never_touches_another_dataset(demo, tmp_path):
  out = tmp_path / 'out'
  dfc = ['data_prep.dfc2020', '--root', str(demo / 'dfc2020'), '--workers', '1']
  assert _run(*dfc, '--out', str(out)).returncode == 0
  shutil.rmtree(out / common.STATE_DIR)  # Now a TFDS dataset not made by this conversion.
  before = sorted(os.listdir(out))

  proc = _run(*_ssl4eo_args(demo / 'ssl4eo', out, '--workers', '1', '--overwrite'))
  line = _error_line(proc)
  assert 'dataset_info.json' in line and 'choose another --out' in line, line
  assert sorted(os.listdir(out)) == before
  assert _num_examples(out) == ('dfc2020', {'validation': 12, 'test': 4})

  # A conversion recorded here is replaced without orphans; the user's own file stays.
  out2 = tmp_path / 'out2'
  assert _run(*dfc, '--out', str(out2)).returncode == 0
  (out2 / 'notes.txt').write_text('mine')
  (out2 / common.STATE_DIR / 'mine.txt').write_text('mine too')
  proc = _run(*_ssl4eo_args(demo / 'ssl4eo', out2, '--workers', '1', '--overwrite'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _total(out2) == ('ssl4eo_s12_nol', 3 * 4)  # records: one per (location, season)
  assert not [f for f in os.listdir(out2) if f.startswith('dfc2020')]
  assert (out2 / 'notes.txt').read_text() == 'mine'
  assert (out2 / common.STATE_DIR / 'mine.txt').read_text() == 'mine too'


@pytest.mark.slow
def test_make_demo_rerun_keeps_files_it_did_not_write(tmp_path):
  out = tmp_path / 'demo'
  args = ['data_prep.make_demo', '--out', str(out), '--locations', '2', '--dfc-validation', '1',
          '--dfc-test', '0', '--scene-size', '16x16']
  assert _run(*args).returncode == 0
  mine = [out / 'ssl4eo' / 'notes.txt', out / 'ssl4eo' / 's1' / '0000001' / 'extra.tif',
          out / 'dfc2020' / 'validation' / 'mine.csv', out / 'scene' / 'keep.json',
          out / 'README']
  for path in mine:
    path.write_text(f'user data {path.name}')
  args[args.index('--locations') + 1] = '1'
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for path in mine:
    assert path.read_text() == f'user data {path.name}', path
  # Its own stale output is gone (location 1 only keeps the user's file).
  leftovers = [os.path.relpath(os.path.join(d, f), out / 'ssl4eo' / 's1' / '0000001')
               for d, _, files in os.walk(out / 'ssl4eo' / 's1' / '0000001') for f in files]
  assert leftovers == ['extra.tif']
  assert (out / 'summary.json').exists()


# -------------------------------------------------------------------------------------------
# issue 12 item 6: a rerun after fixing the inputs rebuilds the shards whose files changed.


def _shard_mtimes(out):
  return {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if '.tfrecord-' in f}


@pytest.mark.slow
def test_rerun_rebuilds_the_shards_whose_inputs_changed(demo, tmp_path):
  import rasterio  # pylint: disable=g-import-not-at-top
  root = _copy(demo / 'dfc2020', tmp_path / 'dfc2020')
  s1 = root / 'validation' / 's1_validation' / 'ROIs0000_validation_s1_0_p5.tif'
  shutil.move(s1, tmp_path / 'aside.tif')
  out = tmp_path / 'out'
  cmd = ['data_prep.dfc2020', '--root', str(root), '--out', str(out), '--workers', '1',
         '--examples-per-shard', '4']
  assert _run(*cmd).returncode == 0
  (row,) = _rejects(out)
  assert row['location'] == 'ROIs0000_validation_0_p5' and row['reason'].startswith('missing')
  mtimes = _shard_mtimes(out)

  shutil.move(tmp_path / 'aside.tif', s1)  # The user fixes the input and reruns.
  proc = _run(*cmd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _rejects(out) == []
  with open(out / common.SUMMARY_FILE) as f:
    summary = json.load(f)
  assert summary['total']['converted'] == 16 and summary['total']['skipped'] == 0
  assert summary['this_run']['shards_built'] == 1
  assert summary['this_run']['shards_rebuilt_for_changed_inputs'] == 1
  rebuilt = 'dfc2020-validation.tfrecord-00001-of-00003'
  now = _shard_mtimes(out)
  assert {f for f in now if now[f] != mtimes[f]} == {rebuilt}
  assert 'changed since' in proc.stderr

  # A converted patch's label replaced: that shard is rebuilt and holds the new labels.
  label = root / 'test' / 'dfc_test' / 'ROIs0000_test_dfc_0_p2.tif'
  with rasterio.open(label, 'r+') as ds:
    ds.write(np.full((1, ds.height, ds.width), 10, ds.dtypes[0]))  # All water (DW class 0).
  assert _run(*cmd).returncode == 0
  with open(out / common.SUMMARY_FILE) as f:
    assert json.load(f)['this_run']['shards_built'] == 1
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  records = {r['patch_id'].decode(): r['label'] for r in tfds.as_numpy(
      tfds.builder_from_directory(str(out)).as_dataset(split='test'))}
  assert np.all(records['ROIs0000_test_0_p2'] == 0)
  assert not np.all(records['ROIs0000_test_0_p1'] == 0)
