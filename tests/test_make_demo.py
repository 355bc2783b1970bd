"""Tests of the demo-data generator: layouts the converters rely on, rasters, noise, determinism."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re

import numpy as np
import pytest
import rasterio

from cromss_jax import constants
from data_prep import make_demo

# One xdist worker for the module: the module-scoped demo world is then generated once.
pytestmark = pytest.mark.xdist_group('test_make_demo')

S2_ACQ = re.compile(r'^(\d{8})T\d{6}_(\d{8})T\d{6}_T\d{2}[C-X][A-Z]{2}$')
S1_ACQ = re.compile(
    r'^S1[AB]_IW_GRDH_1SDV_(\d{8})T\d{6}_\d{8}T\d{6}_\d{6}_[0-9A-F]{6}_[0-9A-F]{4}$')
SEASON_MONTHS = ((3, 4, 5), (6, 7, 8), (9, 10, 11), (12,))
LOCATIONS = 3
NOISE = 0.3


def _read(path):
  with rasterio.open(path) as ds:
    return ds.read(), ds.crs, ds.transform, ds.bounds


def _digest(root, under=''):
  """{relative path: sha256} of every file under root/under (marker excluded)."""
  out = {}
  for folder, _, files in os.walk(os.path.join(root, under)):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp('demo')
  # 6 test patches so that p3 (savanna) and p5 (snow) -- DFC's ignored classes -- are present.
  summary = make_demo.make_demo(out, locations=LOCATIONS, noise=NOISE, seed=0, dfc_validation=2,
                                dfc_test=6, scene_size=(40, 58))
  return str(out), summary


def _location_dirs(root, sensor, loc):
  return sorted(os.listdir(os.path.join(root, 'ssl4eo', sensor, f'{loc:07d}')))


@pytest.mark.slow
def test_ssl4eo_layout_and_acquisition_names(demo):
  root, _ = demo
  assert sorted(os.listdir(os.path.join(root, 'ssl4eo', 's1'))) == [
      f'{i:07d}' for i in range(LOCATIONS)]
  assert sorted(os.listdir(os.path.join(root, 'ssl4eo', 's2c'))) == [
      f'{i:07d}' for i in range(LOCATIONS)]
  for loc in range(LOCATIONS):
    for sensor, pattern, files in (('s2c', S2_ACQ, constants.S2_BANDS),
                                   ('s1', S1_ACQ, constants.S1_BANDS)):
      acqs = _location_dirs(root, sensor, loc)
      assert len(acqs) == constants.NUM_SEASONS
      assert len({a[:4] for a in acqs}) == 1     # one platform: sorted order is date order
      dates = []
      for season, acq in enumerate(acqs):        # sorted position == season
        match = pattern.match(acq)
        assert match, acq
        dates.append(match.group(1))
        assert int(match.group(1)[4:6]) in SEASON_MONTHS[season], acq
        assert sorted(os.listdir(os.path.join(root, 'ssl4eo', sensor, f'{loc:07d}', acq))) == \
            sorted(f'{b}.tif' for b in files)
      assert dates == sorted(dates)


def test_s2_bands_at_native_resolution(demo):
  root, _ = demo
  origins = set()
  for loc in range(LOCATIONS):
    grid = None
    for acq in _location_dirs(root, 's2c', loc):
      for band, res in zip(constants.S2_BANDS, constants.S2_RESOLUTION_M):
        data, crs, transform, bounds = _read(
            os.path.join(root, 'ssl4eo', 's2c', f'{loc:07d}', acq, f'{band}.tif'))
        size = constants.TILE_SIZE * 10 // res
        assert data.shape == (1, size, size), (band, data.shape)
        assert data.dtype == np.uint16
        assert (transform.a, transform.b, transform.d, transform.e) == (res, 0, 0, -res)
        assert re.fullmatch(r'EPSG:326\d\d', crs.to_string())
        assert data.min() >= 1 and np.median(data) < 12000
        assert np.median(data) > (5 if band == 'B10' else 300)   # B10 (cirrus) is near 0
        grid = grid or (crs, transform.c, transform.f, bounds)
        assert (crs, transform.c, transform.f, bounds) == grid   # same footprint for all bands
    origins.add((grid[1], grid[2]))
  assert len(origins) == LOCATIONS


def test_s1_rasters_have_speckle_and_swath_borders(demo):
  root, summary = demo
  nonfinite = {'nan': 0, '-inf': 0}
  for loc in range(LOCATIONS):
    _, s2_crs, s2_transform, _ = _read(os.path.join(
        root, 'ssl4eo', 's2c', f'{loc:07d}', _location_dirs(root, 's2c', loc)[0], 'B2.tif'))
    for acq in _location_dirs(root, 's1', loc):
      for band in constants.S1_BANDS:
        data, crs, transform, _ = _read(os.path.join(root, 'ssl4eo', 's1', f'{loc:07d}', acq,
                                                     f'{band}.tif'))
        assert data.shape == (1, constants.TILE_SIZE, constants.TILE_SIZE)
        assert data.dtype == np.float32
        assert crs == s2_crs and transform == s2_transform
        nonfinite['nan'] += int(np.isnan(data).sum())
        nonfinite['-inf'] += int(np.isneginf(data).sum())
        finite = data[np.isfinite(data)]
        assert -45 < np.median(finite) < 5 and finite.max() < 40
        assert finite.std() > 2   # speckle and texture, not flat class values
  assert nonfinite['nan'] > 0 and nonfinite['-inf'] > 0      # location 0 always has a border
  assert summary['ssl4eo']['s1_nonfinite_values'] == nonfinite['nan'] + nonfinite['-inf']


def test_labels_and_manifests(demo):
  root, _ = demo
  labels_dir = os.path.join(root, 'ssl4eo', 'labels')
  for kind in ('noisy', 'clean'):
    with open(os.path.join(labels_dir, f'{kind}_manifest.csv'), newline='') as f:
      rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['location', 'season', 'path']
    keys = {(int(r['location']), int(r['season'])) for r in rows}
    assert keys == {(l, s) for l in range(LOCATIONS) for s in range(constants.NUM_SEASONS)}
    assert len(rows) == len(keys)
    listed = set()
    for r in rows:
      assert not os.path.isabs(r['path'])
      path = os.path.join(labels_dir, r['path'])
      listed.add(os.path.normpath(path))
      data, crs, transform, _ = _read(path)
      _, s1_crs, s1_transform, _ = _read(os.path.join(
          root, 'ssl4eo', 's1', r['location'], _location_dirs(root, 's1', int(r['location']))[0],
          'VV.tif'))
      assert data.shape == (1, constants.TILE_SIZE, constants.TILE_SIZE)
      assert data.dtype == np.uint8 and data.max() < len(constants.DW_CLASSES)
      assert crs == s1_crs and transform == s1_transform
    on_disk = {os.path.normpath(os.path.join(d, n))
               for d, _, names in os.walk(os.path.join(labels_dir, kind)) for n in names}
    assert on_disk == listed


def test_noise_rate_near_request_and_summary_matches_files(demo):
  root, summary = demo
  agree = []
  for loc in range(LOCATIONS):
    for season in range(constants.NUM_SEASONS):
      clean = _read(os.path.join(root, 'ssl4eo', 'labels', 'clean', f'{loc:07d}',
                                 f'{season}.tif'))[0]
      noisy = _read(os.path.join(root, 'ssl4eo', 'labels', 'noisy', f'{loc:07d}',
                                 f'{season}.tif'))[0]
      agree.append(np.mean(clean == noisy))
  overall = float(np.mean(agree))
  assert abs(overall - (1 - NOISE)) < 0.1
  assert summary['label_agreement']['overall'] == pytest.approx(overall, abs=1e-4)
  with open(os.path.join(root, 'summary.json')) as f:
    on_disk = json.load(f)
  assert on_disk['label_agreement'] == summary['label_agreement']
  assert set(on_disk['label_agreement']['per_season']) == set(make_demo.SEASONS)
  truth = on_disk['ssl4eo']['truth_class_fractions']
  assert len([c for c, frac in truth.items() if frac > 0]) >= 6   # a varied land cover


@pytest.mark.parametrize('rate', [0.0, 0.05, 0.3, 0.6, 1.0])
def test_noisy_labels_hit_the_rate_exactly(rate):
  rng = np.random.default_rng(3)
  land = make_demo._make_land(rng, (96, 120), make_demo._BIOMES[0])
  for season in range(constants.NUM_SEASONS):
    truth = land.truth[season]
    noisy, sources = make_demo._noisy_labels(rng, truth, season, rate, land)
    wrong = noisy != truth
    assert wrong.sum() == round(rate * truth.size)
    assert np.array_equal(wrong, sources > 0)


def test_noise_zero_gives_exact_labels(tmp_path):
  summary = make_demo.make_demo(tmp_path, locations=1, noise=0.0, dfc_validation=0, dfc_test=0,
                                scene_size=None)
  assert summary['label_agreement']['overall'] == 1.0
  for season in range(constants.NUM_SEASONS):
    paths = [os.path.join(tmp_path, 'ssl4eo', 'labels', kind, '0000000', f'{season}.tif')
             for kind in ('clean', 'noisy')]
    assert np.array_equal(_read(paths[0])[0], _read(paths[1])[0])
  assert not os.path.exists(os.path.join(tmp_path, 'scene'))


def test_deterministic_per_seed_and_independent_of_counts(tmp_path, demo):
  kwargs = dict(locations=1, noise=NOISE, dfc_validation=1, dfc_test=0, scene_size=(40, 58))
  first = make_demo.make_demo(tmp_path / 'a', seed=0, **kwargs)
  second = make_demo.make_demo(tmp_path / 'b', seed=0, **kwargs)
  assert first['label_agreement'] == second['label_agreement']
  digest_a = _digest(tmp_path / 'a')
  assert digest_a == _digest(tmp_path / 'b')      # byte-identical, summary.json included
  make_demo.make_demo(tmp_path / 'c', seed=1, **kwargs)
  digest_c = _digest(tmp_path / 'c')
  for path in ('ssl4eo/labels/clean/0000000/0.tif', 'scene/s2.tif',
               'dfc2020/validation/s2_validation/ROIs0000_validation_s2_0_p1.tif'):
    assert digest_a[path] != digest_c[path], path
  # Every item has its own random stream: location 0, DFC patch p1 and the scene come out the
  # same inside the larger module dataset (same seed, more locations and patches).
  larger = _digest(demo[0])
  for path, digest in digest_a.items():
    if path.endswith('.tif'):
      assert larger[path] == digest, path


def test_dfc2020_layout_and_codes(demo):
  root, summary = demo
  codes = set()
  for split, count in (('validation', 2), ('test', 6)):
    for kind in ('s1', 's2', 'dfc'):
      names = sorted(os.listdir(os.path.join(root, 'dfc2020', split, f'{kind}_{split}')))
      assert names == sorted(f'ROIs0000_{split}_{kind}_0_p{i}.tif' for i in range(1, count + 1))
    for i in range(1, count + 1):
      stem = os.path.join(root, 'dfc2020', split, '{0}_' + split,
                          f'ROIs0000_{split}_{{0}}_0_p{i}.tif')
      s1, crs, transform, _ = _read(stem.format('s1'))
      s2, crs2, transform2, _ = _read(stem.format('s2'))
      label, crs3, transform3, _ = _read(stem.format('dfc'))
      assert s1.shape == (2, 256, 256) and s1.dtype == np.float32 and np.isfinite(s1).all()
      assert s2.shape == (13, 256, 256) and s2.dtype == np.uint16 and s2.min() >= 1
      assert label.shape == (1, 256, 256) and label.dtype == np.uint8
      assert crs == crs2 == crs3 and transform == transform2 == transform3
      assert transform.a == 10 and re.fullmatch(r'EPSG:326\d\d', crs.to_string())
      codes |= set(np.unique(label).tolist())
  assert codes <= set(range(1, 11))
  assert {make_demo.DFC_SAVANNA, make_demo.DFC_SNOW} <= codes   # the 'ignore' classes
  assert set(constants.DFC_TO_DW8) <= codes
  assert summary['dfc2020']['test']['patches'] == 6


def test_scene(demo):
  root, summary = demo
  s2, crs, transform, _ = _read(os.path.join(root, 'scene', 's2.tif'))
  s1, crs1, transform1, _ = _read(os.path.join(root, 'scene', 's1.tif'))
  truth, crs2, transform2, _ = _read(os.path.join(root, 'scene', 'truth.tif'))
  assert s2.shape == (13, 40, 58) and s2.dtype == np.uint16
  assert s1.shape == (2, 40, 58) and s1.dtype == np.float32 and np.isfinite(s1).all()
  assert truth.shape == (1, 40, 58) and truth.dtype == np.uint8
  assert truth.max() < len(constants.DW_CLASSES)
  assert crs == crs1 == crs2 and transform == transform1 == transform2 and transform.a == 10
  assert summary['scene']['shape'] == [40, 58]


def test_output_folder_safety(tmp_path):
  foreign = tmp_path / 'foreign'
  (foreign / 'ssl4eo').mkdir(parents=True)
  with pytest.raises(FileExistsError):
    make_demo.make_demo(foreign, locations=1, dfc_validation=0, dfc_test=0, scene_size=None)
  # A rerun replaces the tool's own earlier output, leaving no stale locations behind.
  own = tmp_path / 'own'
  make_demo.make_demo(own, locations=2, dfc_validation=0, dfc_test=0, scene_size=None)
  make_demo.make_demo(own, locations=1, dfc_validation=0, dfc_test=0, scene_size=None)
  assert os.listdir(own / 'ssl4eo' / 's1') == ['0000000']
  assert not any(n.endswith('.tmp') for _, _, names in os.walk(own) for n in names)


def test_cli(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    make_demo.main(['--help'])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  for option in ('--out', '--locations', '--noise', '--seed', '--dfc-validation', '--dfc-test',
                 '--scene-size'):
    assert option in help_text
  with pytest.raises(SystemExit):
    make_demo.main(['--out', str(tmp_path / 'x'), '--scene-size', '700by900'])
  assert make_demo.main(['--out', str(tmp_path / 'cli'), '--locations', '1', '--noise', '0.2',
                         '--seed', '5', '--dfc-validation', '1', '--dfc-test', '0',
                         '--scene-size', '16x20']) == 0
  out = capsys.readouterr().out
  assert 'agreement' in out
  with open(tmp_path / 'cli' / 'summary.json') as f:
    summary = json.load(f)
  assert summary['seed'] == 5 and summary['noise_requested'] == 0.2
  assert summary['scene']['shape'] == [16, 20]
