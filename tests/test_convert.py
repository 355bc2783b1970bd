"""Converters (data_prep.ssl4eo, data_prep.dfc2020) on tiny GeoTIFF fixtures written here.

Expected values are recomputed in the test from rasterio reads and the docs/METHOD.md §2.2 formula, not
with the converters' own helpers.
"""
import csv
import os

import numpy as np
import pytest
from affine import Affine
import rasterio
from rasterio.enums import Resampling
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from data_prep import common
from helpers import S1_STATS, S2_MEAN, S2_STD, read_pretrain_locations
from data_prep import dfc2020
from data_prep import ssl4eo

S2_BANDS = ('B1', 'B2', 'B3', 'B4', 'B5', 'B6', 'B7', 'B8', 'B8A', 'B9', 'B10', 'B11', 'B12')
S2_RES = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20)
CRS = 'EPSG:32632'


def _expected_uint8(x, mean, std):
  """docs/METHOD.md §2.2 written out independently: NaN/inf -> 0."""
  x = np.asarray(x, np.float64)
  lo, span = mean - 2 * std, 4 * std
  v = np.round(np.clip((np.nan_to_num(x, nan=lo, posinf=lo, neginf=lo) - lo) / span, 0, 1) * 255)
  v[~np.isfinite(x)] = 0
  return v.astype(np.uint8)


def _write_tif(path, data, *, origin, res, crs=CRS, nodata=None):
  data = np.asarray(data)
  if data.ndim == 2:
    data = data[None]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, 'w', driver='GTiff', width=data.shape[2], height=data.shape[1],
                     count=data.shape[0], dtype=data.dtype, crs=crs,
                     transform=Affine(res, 0, origin[0], 0, -res, origin[1]), nodata=nodata) as dst:
    dst.write(data)


def _make_ssl4eo(root, locations, rng, clean=True):
  """Raw SSL4EO-S12 layout + label manifests; location ids -> their grid origins."""
  rows, clean_rows = [], []
  for loc in locations:
    origin = (400000.0 + 5000 * loc, 5000000.0)
    for season in range(4):
      s1_dir = os.path.join(root, 's1', f'{loc:07d}', f'S1A_2020{season + 1:02d}01')
      s2_dir = os.path.join(root, 's2c', f'{loc:07d}', f'2020{season + 1:02d}15T1030')
      for (mean, std), band in zip(S1_STATS, ('VV', 'VH')):
        x = rng.normal(mean, std, (264, 264)).astype(np.float32)
        if loc == locations[0] and season == 0 and band == 'VV':
          x[0, :5] = np.nan   # swath border
          x[1, :3] = -np.inf
        _write_tif(os.path.join(s1_dir, band + '.tif'), x, origin=origin, res=10)
      for i, (band, res) in enumerate(zip(S2_BANDS, S2_RES)):
        n = 2640 // res
        x = np.clip(rng.normal(S2_MEAN[i], 1.5 * S2_STD[i], (n, n)), 0, 20000).astype(np.uint16)
        _write_tif(os.path.join(s2_dir, band + '.tif'), x, origin=origin, res=res)
      for kind, out in (('noisy', rows), ('clean', clean_rows)):
        rel = os.path.join(kind, f'{loc:07d}', f'{season}.tif')
        _write_tif(os.path.join(root, 'labels', rel), rng.integers(0, 9, (264, 264), np.uint8),
                   origin=origin, res=10)
        out.append((loc, season, rel))
  for kind, out in (('noisy', rows), ('clean', clean_rows)):
    if kind == 'clean' and not clean:
      continue
    with open(os.path.join(root, 'labels', f'{kind}_manifest.csv'), 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['location', 'season', 'path'])
      w.writerows(out)


def _ssl4eo_args(root, out, *extra):
  return ['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
          '--labels', os.path.join(root, 'labels', 'noisy_manifest.csv'), '--out', str(out),
          '--workers', '1', *extra]


def _load(out, split):
  """(builder, the split's locations regrouped from their per-season records)."""
  return tfds.builder_from_directory(str(out)), read_pretrain_locations(out, split)


def _expected_location(root, loc, resampling):
  """What the record of `loc` must hold, from plain rasterio reads."""
  s1, s2, labels, clean = [], [], [], []
  for season in range(4):
    s1_dir = os.path.join(root, 's1', f'{loc:07d}', sorted(
        os.listdir(os.path.join(root, 's1', f'{loc:07d}')))[season])
    s2_dir = os.path.join(root, 's2c', f'{loc:07d}', sorted(
        os.listdir(os.path.join(root, 's2c', f'{loc:07d}')))[season])
    vv_vh = []
    for (mean, std), band in zip(S1_STATS, ('VV', 'VH')):
      with rasterio.open(os.path.join(s1_dir, band + '.tif')) as src:
        vv_vh.append(_expected_uint8(src.read(1), mean, std))
    s1.append(np.stack(vv_vh, -1))
    bands = []
    for i, band in enumerate(S2_BANDS):
      with rasterio.open(os.path.join(s2_dir, band + '.tif')) as src:
        if resampling == 'nearest':  # Independent of GDAL: pixel replication.
          k = 264 // src.width
          x = np.kron(src.read(1), np.ones((k, k), np.uint16))
        else:
          x = src.read(1, out_shape=(264, 264), resampling=Resampling[resampling])
      bands.append(_expected_uint8(x, S2_MEAN[i], S2_STD[i]))
    s2.append(np.stack(bands, -1))
    for kind, out in (('noisy', labels), ('clean', clean)):
      with rasterio.open(os.path.join(root, 'labels', kind, f'{loc:07d}', f'{season}.tif')) as src:
        out.append(src.read(1))
  return np.stack(s1), np.stack(s2), np.stack(labels), np.stack(clean)


@pytest.mark.slow
@pytest.mark.parametrize('resampling', ['bilinear', 'nearest'])
def test_ssl4eo_round_trip(tmp_path, resampling):
  root, out = tmp_path / 'raw', tmp_path / 'out'
  locations = (3, 5, 8)
  _make_ssl4eo(str(root), locations, np.random.default_rng(0))
  summary = ssl4eo.main(_ssl4eo_args(
      root, out, '--clean-labels', os.path.join(root, 'labels', 'clean_manifest.csv'),
      '--val-fraction', '0.2', '--examples-per-shard', '1', '--resampling', resampling,
      '--workers', '2' if resampling == 'bilinear' else '1'))  # Process pool, then inline.

  assert summary['total']['converted'] == 3 and summary['total']['skipped'] == 0
  assert summary['total']['records'] == 3 * 4  # One per (location, season).
  assert summary['splits']['validation']['converted'] == 1  # round(0.2 * 3), at least 1
  assert summary['total']['non_finite_values'] == 8   # 5 NaN + 3 -inf in location 3
  builder, train = _load(out, 'train')
  _, val = _load(out, 'validation')
  assert builder.info.splits['train'].num_examples == 2 * 4
  assert builder.info.splits['validation'].num_examples == 1 * 4
  assert len(train) == 2 and len(val) == 1
  assert sorted(int(e['location_id']) for e in train + val) == list(locations)
  assert 'ssl4eo_s12_nol-train.array_record-00001-of-00002' in os.listdir(out)
  for record in train + val:
    loc = int(record['location_id'])
    s1, s2, labels, clean = _expected_location(str(root), loc, resampling)
    assert record['s1'].dtype == np.uint8 and record['s1'].shape == (4, 264, 264, 2)
    assert record['s2'].shape == (4, 264, 264, 13)
    np.testing.assert_array_equal(record['s1'], s1)
    np.testing.assert_array_equal(record['s2'], s2)
    np.testing.assert_array_equal(record['labels'], labels)
    np.testing.assert_array_equal(record['clean_labels'], clean)
    assert [a.decode() for a in record['acquisition_ids']] == [
        f'2020{t + 1:02d}15T1030' for t in range(4)]
    assert record['crs'].decode() == CRS
    np.testing.assert_array_equal(record['transform'],
                                  [10, 0, 400000.0 + 5000 * loc, 0, -10, 5000000.0])
  with open(out / 'rejects.csv') as f:
    assert f.read().strip() == 'location,file,reason'


@pytest.mark.slow
def test_ssl4eo_records_are_uncompressed_array_record_one_per_season(tmp_path):
  """The layout the pretraining loader relies on: array_record shards of one record per
  (location, season), record i of a split = season i % 4 of the split's (i // 4)-th location,
  stored uncompressed one per chunk (the size on disk is the pixels plus a little)."""
  root, out = tmp_path / 'raw', tmp_path / 'out'
  locations = (2, 4, 6, 9)
  _make_ssl4eo(str(root), locations, np.random.default_rng(7))
  summary = ssl4eo.main(_ssl4eo_args(
      root, out, '--clean-labels', os.path.join(root, 'labels', 'clean_manifest.csv'),
      '--val-fraction', '0.25', '--examples-per-shard', '2', '--resampling', 'nearest'))
  assert summary['total']['converted'] == 4 and summary['total']['records'] == 16
  builder = tfds.builder_from_directory(str(out))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  features = builder.info.features
  s, t, b = 264, 4, len(S2_BANDS)
  assert {k: (tuple(f.shape), f.np_dtype) for k, f in features.items()} == {
      's1': ((s, s, 2), np.uint8), 's2': ((s, s, b), np.uint8),
      'season_labels': ((t, s, s), np.uint8), 'clean_labels': ((s, s), np.uint8),
      'location_id': ((), np.int64), 'season': ((), np.int64),
      'acquisition_id': ((), np.object_), 's1_acquisition_id': ((), np.object_),
      's2_band_names': ((b,), np.object_), 'crs': ((), np.object_),
      'transform': ((6,), np.float64)}
  assert not [f for f in os.listdir(out) if '.tfrecord-' in f]

  expected_order = {'train': [2, 4, 6], 'validation': [9]}  # by the seed-42 permutation
  assert ssl4eo.split_locations(locations, 0.25, 42) == expected_order
  assert summary['splits']['train']['converted'] == 3
  assert builder.info.splits['train'].shard_lengths == [2 * t, 1 * t]  # records, not locations
  assert builder.info.splits['validation'].shard_lengths == [1 * t]
  for split, order in expected_order.items():
    source = builder.as_data_source(split)
    assert len(source) == t * len(order)
    for i in range(len(source)):
      record = source[i]
      assert int(record['season']) == i % t and int(record['location_id']) == order[i // t], i
      assert record['acquisition_id'].decode() == f'2020{i % t + 1:02d}15T1030'
      assert record['s1_acquisition_id'].decode() == f'S1A_2020{i % t + 1:02d}01'
      with rasterio.open(os.path.join(root, 'labels', 'clean', f'{order[i // t]:07d}',
                                      f'{i % t}.tif')) as src:
        np.testing.assert_array_equal(record['clean_labels'], src.read(1))

  payload = s * s * (2 + b + t + 1)  # s1 + s2 + season_labels + clean_labels, one byte each
  assert payload == 1_393_920  # At 264 px: 1.39 MB per (location, season) record.
  for split in expected_order:
    info = builder.info.splits[split]
    for index, length in enumerate(info.shard_lengths):
      path = os.path.join(out, common.shard_filename('ssl4eo_s12_nol', split, index,
                                                     len(info.shard_lengths), 'array_record'))
      reader = ArrayRecordReader(path)
      assert reader.num_records() == length
      options = reader.writer_options_string()
      assert 'group_size:1,' in options and 'uncompressed' in options, options
      # Compressed, the random labels alone would save far more than the overhead allowed:
      # per record a few hundred bytes of names and framing, per file riegeli's 64 KiB blocks.
      size = os.path.getsize(path)
      assert length * payload < size <= length * (payload + 1024) + 2 * 65536, (size, length)


def test_ssl4eo_split_is_deterministic():
  ids = list(range(100, 400, 3))
  a = ssl4eo.split_locations(ids, 0.1, 42)
  assert a == ssl4eo.split_locations(list(reversed(ids)), 0.1, 42)
  assert len(a['validation']) == 10 and len(a['train']) == 90
  assert a != ssl4eo.split_locations(ids, 0.1, 7)
  assert len(ssl4eo.split_locations([1, 2], 0.01, 0)['validation']) == 1
  assert ssl4eo.split_locations([1], 0.5, 0) == {'train': [1], 'validation': []}


def _break(root, loc, kind):
  """Damages season 0 of location `loc`; returns the file rejects.csv must name."""
  folder = f'{loc:07d}'
  s2_acq = os.path.join(root, 's2c', folder, sorted(os.listdir(
      os.path.join(root, 's2c', folder)))[0])
  label = os.path.join(root, 'labels', 'noisy', folder, '0.tif')
  origin = (400000.0 + 5000 * loc, 5000000.0)
  if kind == 'truncated':
    path = os.path.join(s2_acq, 'B4.tif')
    with open(path, 'rb') as f:
      blob = f.read()
    with open(path, 'wb') as f:
      f.write(blob[:len(blob) // 2])
    return path
  if kind == 'missing_band':
    os.remove(os.path.join(s2_acq, 'B8A.tif'))
    return os.path.join(s2_acq, 'B8A.tif')
  if kind == 'missing_season':
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(s2_acq)
    return os.path.join(root, 's2c', folder)
  if kind == 'crs_mismatch':
    path = os.path.join(root, 's1', folder, sorted(os.listdir(
        os.path.join(root, 's1', folder)))[0], 'VH.tif')
    _write_tif(path, np.zeros((264, 264), np.float32), origin=origin, res=10, crs='EPSG:32633')
    return path
  if kind == 'size_mismatch':
    path = os.path.join(s2_acq, 'B11.tif')
    _write_tif(path, np.zeros((100, 100), np.uint16), origin=origin, res=20)
    return path
  if kind == 'bounds_mismatch':
    _write_tif(label, np.zeros((264, 264), np.uint8), origin=(origin[0] + 30, origin[1]), res=10)
    return label
  if kind == 'label_out_of_range':
    _write_tif(label, np.full((264, 264), 9, np.uint8), origin=origin, res=10)
    return label
  if kind == 'label_non_finite':
    x = np.ones((264, 264), np.float32)
    x[5, 5] = np.nan
    _write_tif(label, x, origin=origin, res=10)
    return label
  if kind == 'label_nodata':
    x = np.ones((264, 264), np.uint8)
    x[:2] = 7
    _write_tif(label, x, origin=origin, res=10, nodata=7)
    return label
  if kind == 'all_non_finite':
    path = os.path.join(root, 's1', folder, sorted(os.listdir(
        os.path.join(root, 's1', folder)))[0], 'VV.tif')
    _write_tif(path, np.full((264, 264), -np.inf, np.float32), origin=origin, res=10)
    return path
  if kind == 'non_finite':
    path = os.path.join(s2_acq, 'B2.tif')
    x = np.full((264, 264), 1000, np.float32)
    x[0, 0] = np.inf
    _write_tif(path, x, origin=origin, res=10)
    return path
  raise ValueError(kind)


BAD_KINDS = ('truncated', 'missing_band', 'missing_season', 'crs_mismatch', 'size_mismatch',
             'bounds_mismatch', 'label_out_of_range', 'label_non_finite', 'label_nodata',
             'non_finite', 'all_non_finite')
REASON_PREFIX = {'truncated': 'unreadable', 'missing_band': 'missing_file'}


@pytest.mark.slow
def test_ssl4eo_bad_inputs_are_rejected_and_strict_fails(tmp_path):
  root, out = str(tmp_path / 'raw'), tmp_path / 'out'
  locations = tuple(range(1, len(BAD_KINDS) + 3))
  _make_ssl4eo(root, locations, np.random.default_rng(1), clean=False)
  broken = {loc: (kind, _break(root, loc, kind)) for loc, kind in zip(locations, BAD_KINDS)}
  good = locations[-2:]
  os.makedirs(os.path.join(root, 's1', '0000099', 'x'))  # S1 only: S2 folder is missing.

  summary = ssl4eo.main(_ssl4eo_args(root, out, '--examples-per-shard', '4'))
  assert summary['total']['converted'] == 2
  assert summary['total']['skipped'] == len(BAD_KINDS) + 1
  with open(out / 'rejects.csv') as f:
    rows = {int(r['location']): r for r in csv.DictReader(f)}
  assert rows[99] == {'location': '99', 'file': os.path.join(root, 's2c', '0000099'),
                      'reason': 'missing_location: directory does not exist'}
  for loc, (kind, path) in broken.items():
    assert rows[loc]['file'] == path, kind
    assert rows[loc]['reason'].startswith(REASON_PREFIX.get(kind, kind) + ':'), rows[loc]
  assert summary['reject_kinds']['label_nodata'] == 1
  builder = tfds.builder_from_directory(str(out))
  assert sum(s.num_examples for s in builder.info.splits.values()) == 2 * 4
  got = [int(e['location_id']) for split in builder.info.splits
         for e in read_pretrain_locations(out, split)]
  assert sorted(got) == list(good)

  with pytest.raises(SystemExit) as err:
    ssl4eo.main(_ssl4eo_args(root, tmp_path / 'strict', '--strict', '--limit', '2'))
  assert str(err.value.code).startswith(f'error: {broken[1][1]}: unreadable')
  assert '--strict' in str(err.value.code)
  assert not os.path.exists(tmp_path / 'strict' / 'dataset_info.json')


@pytest.mark.slow
def test_ssl4eo_label_pattern_and_missing_label(tmp_path):
  root, out = str(tmp_path / 'raw'), tmp_path / 'out'
  _make_ssl4eo(root, (1, 2, 3), np.random.default_rng(2), clean=False)
  os.remove(os.path.join(root, 'labels', 'noisy', '0000002', '3.tif'))
  args = _ssl4eo_args(root, out)
  args[args.index('--labels'):args.index('--labels') + 2] = [
      '--labels-pattern', os.path.join(root, 'labels', 'noisy', '{location:07d}', '{season}.tif')]
  summary = ssl4eo.main(args)
  assert summary['total']['converted'] == 2
  with open(out / 'rejects.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['location'] == '2' and row['file'].endswith('0000002/3.tif')
  assert row['reason'].startswith('missing_file')
  _, records = _load(out, 'train+validation')
  assert 'clean_labels' not in records[0]


@pytest.mark.slow
def test_ssl4eo_resume_and_argument_check(tmp_path, monkeypatch):
  root, out = str(tmp_path / 'raw'), tmp_path / 'out'
  _make_ssl4eo(root, (1, 2, 3), np.random.default_rng(3), clean=False)
  args = _ssl4eo_args(root, out, '--examples-per-shard', '1', '--val-fraction', '0.2')

  # Interrupted run: the process dies while the second shard is being built.
  real_build, calls = common._build_shard, []  # pylint: disable=protected-access

  def failing_build(task):
    calls.append(task.key)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_build(task)

  monkeypatch.setattr(common, '_build_shard', failing_build)
  with pytest.raises(KeyboardInterrupt):
    ssl4eo.main(args)
  assert not os.path.exists(out / 'dataset_info.json')
  done = sorted(f for f in os.listdir(out) if '.array_record-' in f)
  assert len(done) == 1
  mtimes = {f: os.stat(out / f).st_mtime_ns for f in done}

  calls.clear()
  monkeypatch.setattr(common, '_build_shard', lambda task: calls.append(task.key) or
                      real_build(task))
  summary = ssl4eo.main(args)
  assert len(calls) == 2 and summary['this_run']['shards_reused'] == 1
  assert all(os.stat(out / f).st_mtime_ns == t for f, t in mtimes.items())
  complete = {f: (out / f).read_bytes() for f in os.listdir(out) if '.array_record-' in f}
  assert len(complete) == 3

  # Lost shard + marker: only that one is rebuilt, byte-identical.
  lost = sorted(complete)[1]
  split, index = lost.split('-')[1].split('.')[0], int(lost.split('-')[2])
  os.remove(out / lost)
  os.remove(out / common.STATE_DIR / f'{split}-{index:05d}.json')
  calls.clear()
  ssl4eo.main(args)
  assert calls == [f'{split}-{index:05d}']
  assert {f: (out / f).read_bytes() for f in complete} == complete
  _, records = _load(out, 'train+validation')
  assert sorted(int(r['location_id']) for r in records) == [1, 2, 3]

  with pytest.raises(SystemExit) as err:
    ssl4eo.main(args[:-1] + ['0.4'])
  assert 'val_fraction: 0.2 -> 0.4' in str(err.value.code) and '--overwrite' in str(err.value.code)
  summary = ssl4eo.main(args + ['--limit', '1', '--overwrite'])
  assert summary['total']['converted'] == 1 and 'validation' not in summary['splits']
  assert sorted(f for f in os.listdir(out) if '.array_record-' in f) == [
      'ssl4eo_s12_nol-train.array_record-00000-of-00001']


def _make_dfc(root, split, patches, rng):
  for i in patches:
    origin = (300000.0 + 3000 * i, 4000000.0)
    base = os.path.join(root, split)
    s1 = rng.normal(-15, 5, (2, 256, 256)).astype(np.float32)
    s1[1, 0, 0] = np.nan
    s2 = np.clip(rng.normal(S2_MEAN[:, None, None], S2_STD[:, None, None], (13, 256, 256)),
                 0, 20000).astype(np.uint16)
    dfc = np.tile(np.arange(1, 11, dtype=np.uint8), (256, 26))[:, :256]
    _write_tif(os.path.join(base, f's1_{split}', f'ROIs0000_{split}_s1_0_p{i}.tif'), s1,
               origin=origin, res=10)
    _write_tif(os.path.join(base, f's2_{split}', f'ROIs0000_{split}_s2_0_p{i}.tif'), s2,
               origin=origin, res=10)
    _write_tif(os.path.join(base, f'dfc_{split}', f'ROIs0000_{split}_dfc_0_p{i}.tif'),
               np.roll(dfc, i, axis=1), origin=origin, res=10)


def test_dfc2020(tmp_path):
  root, out = str(tmp_path / 'dfc'), tmp_path / 'out'
  rng = np.random.default_rng(5)
  _make_dfc(root, 'validation', (0, 1, 2, 10), rng)
  _make_dfc(root, 'test', (0, 4), rng)
  bad = os.path.join(root, 'validation', 'dfc_validation', 'ROIs0000_validation_dfc_0_p2.tif')
  _write_tif(bad, np.full((256, 256), 11, np.uint8), origin=(0, 0), res=10)
  summary = dfc2020.main(['--root', root, '--out', str(out), '--workers', '1',
                          '--examples-per-shard', '2'])
  assert summary['splits']['validation']['converted'] == 3
  assert summary['splits']['test']['converted'] == 2
  assert summary['total']['non_finite_values'] == 5
  with open(out / 'rejects.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['file'] == bad and row['location'] == 'ROIs0000_validation_0_p2'

  builder = tfds.builder_from_directory(str(out))
  assert builder.info.splits['validation'].num_examples == 3
  assert builder.info.splits['test'].num_examples == 2
  records = list(tfds.as_numpy(builder.as_dataset(split='validation')))
  assert [r['patch_id'].decode() for r in records] == [
      'ROIs0000_validation_0_p0', 'ROIs0000_validation_0_p1', 'ROIs0000_validation_0_p10']
  mapping = {1: 1, 2: 5, 3: 255, 4: 2, 5: 3, 6: 4, 7: 6, 8: 255, 9: 7, 10: 0}
  for r, i in zip(records, (0, 1, 10)):
    name = f'ROIs0000_validation_{{}}_0_p{i}.tif'
    with rasterio.open(os.path.join(root, 'validation', 'dfc_validation',
                                    name.format('dfc'))) as src:
      dfc = src.read(1)
    np.testing.assert_array_equal(r['label'], np.vectorize(mapping.get)(dfc).astype(np.uint8))
    assert np.count_nonzero(r['label'] == 255) == np.count_nonzero((dfc == 3) | (dfc == 8)) > 0
    with rasterio.open(os.path.join(root, 'validation', 's1_validation',
                                    name.format('s1'))) as src:
      s1 = src.read()
    with rasterio.open(os.path.join(root, 'validation', 's2_validation',
                                    name.format('s2'))) as src:
      s2 = src.read()
    np.testing.assert_array_equal(
        r['s1'], np.stack([_expected_uint8(s1[b], *S1_STATS[b]) for b in range(2)], -1))
    np.testing.assert_array_equal(
        r['s2'], np.stack([_expected_uint8(s2[b], S2_MEAN[b], S2_STD[b]) for b in range(13)], -1))
  assert records[0]['s1'][0, 0, 1] == 0  # NaN -> 0


def test_tfds_builder_runs_the_same_conversion(tmp_path):
  """The Beam-capable builder (plain generator here) writes what the CLI converter writes:
  the same array_record records in the same order (location-major, season-minor)."""
  root = str(tmp_path / 'raw')
  _make_ssl4eo(root, (1, 2), np.random.default_rng(6), clean=False)
  builder = ssl4eo.Ssl4eoS12Nol(data_dir=str(tmp_path / 'tfds'), config='noisy')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  assert builder.info.disable_shuffling
  ssl4eo.main(_ssl4eo_args(root, tmp_path / 'out'))
  cli = tfds.builder_from_directory(str(tmp_path / 'out'))
  for split in ('train', 'validation'):
    got = read_pretrain_locations(builder.data_dir, split)
    want = read_pretrain_locations(tmp_path / 'out', split)
    assert [int(r['location_id']) for r in got] == [int(e['location_id']) for e in want]
    assert builder.info.splits[split].num_examples == cli.info.splits[split].num_examples
    for r, e in zip(got, want):
      assert sorted(r) == sorted(e)
      for key in e:
        np.testing.assert_array_equal(r[key], e[key], err_msg=key)
  records = read_pretrain_locations(builder.data_dir, 'train+validation')
  assert sorted(int(r['location_id']) for r in records) == [1, 2]
  shard = next(f for f in os.listdir(builder.data_dir) if '.array_record-' in f)
  options = ArrayRecordReader(os.path.join(builder.data_dir, shard)).writer_options_string()
  assert 'group_size:1,' in options and 'uncompressed' in options, options
