"""data_prep.ssl4eo on the real SSL4EO-S12 / NoLDO-S12 layouts (fixtures: tests/real_layouts.py).

The README commands run as subprocesses exactly as written (only `/data/` is moved into the test
folder). Expected values come from plain rasterio reads and numpy resampling by the files'
georeferencing (tests/real_layouts.py), never from the converter's helpers.
"""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cromss_jax import input_pipeline as ip
from configs import pretrain as pretrain_config
from data_prep import ssl4eo
from helpers import read_pretrain_locations
import real_layouts as rl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COARSE_L1C = sum(1 for b in rl.L1C_BANDS if rl.RES[b] != 10)   # 9 bands on shifted grids
BASELINE_04 = {'PROCESSING_BASELINE': '04.00'}


def readme_commands() -> list[str]:
  """The shell commands of README's SSL4EO-S12 section, continuation lines joined."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  start = text.index('### SSL4EO-S12 with Dynamic World labels (pretraining)')
  section = text[start:text.index('\n### ', start + 10)]
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', section, re.S):
    joined = block.replace('\\\n', ' ')
    commands += [line.strip() for line in joined.splitlines()
                 if line.strip() and not line.strip().startswith('#')]
  return commands


def run_readme_command(command: str, tmp: str) -> subprocess.CompletedProcess:
  command = command.replace('/data/', f'{tmp}/data/')
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
             PYTHONPATH=REPO)
  return subprocess.run(['bash', '-c', command], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def load(out: str) -> dict[int, dict]:
  """location id -> the location regrouped from its per-season records (all splits)."""
  builder = tfds.builder_from_directory(out)
  records = {}
  for split in builder.info.splits:
    for r in read_pretrain_locations(out, split):
      records[int(r['location_id'])] = r
  return records


def summary_of(out: str) -> dict:
  with open(os.path.join(out, 'conversion_summary.json')) as f:
    return json.load(f)


def rejects_of(out: str) -> dict[int, dict]:
  with open(os.path.join(out, 'rejects.csv')) as f:
    return {int(r['location']): r for r in csv.DictReader(f)}


def expected_s2(root: str, location: rl.Location, season: int, product: str
                ) -> np.ndarray:
  """[H, W, bands] float64 before rounding: numpy bilinear onto B2's grid, then the SSL4EO-S12
  normalisation (x - (m - 2s)) / 4s * 255 (uint8 input: as is)."""
  bands = rl.L1C_BANDS if product == 'L1C' else rl.L2A_BANDS
  mean, std = (rl.L1C_MEAN, rl.L1C_STD) if product == 'L1C' else (rl.L2A_MEAN, rl.L2A_STD)
  folder = os.path.join(root, location.s2_dir, f'{location.loc:07d}', location.s2_names[season])
  _, ref = rl.read(os.path.join(folder, 'B2.tif'))
  out = []
  for band in bands:
    data, transform = rl.read(os.path.join(folder, band + '.tif'))
    x = rl.bilinear_onto(data, transform, ref, location.tile)
    if data.dtype != np.uint8:
      x = rl.normalise_float(x - location.band_offset[season], mean[band], std[band])
    out.append(x)
  return np.stack(out, -1)


def assert_close_uint8(got: np.ndarray, want: np.ndarray, what: str) -> None:
  """`got` is `want` rounded; only where `want` is within 1e-3 of a .5 tie may it be one step
  off (GDAL interpolates in float32, numpy here in float64)."""
  want = np.clip(want, 0, 255)
  rounded = np.rint(want)
  tie = np.abs(np.abs(want - np.floor(want)) - 0.5) < 1e-3
  diff = np.abs(got.astype(int) - rounded.astype(int))
  assert diff.max() <= 1, (what, diff.max())
  assert not np.any(diff[~tie]), (what, np.count_nonzero(diff[~tie]))
  assert np.mean(diff == 0) > 0.9, (what, np.mean(diff == 0))


def check_record(record: dict, root: str, location: rl.Location, product: str,
                 labels_dir: str = 'noldo/dw_labels') -> None:
  bands = rl.L1C_BANDS if product == 'L1C' else rl.L2A_BANDS
  t = location.tile
  assert record['s2'].shape == (4, t, t, len(bands))
  assert [b.decode() for b in record['s2_band_names']] == list(bands)
  assert [a.decode() for a in record['acquisition_ids']] == location.s2_names
  assert [a.decode() for a in record['s1_acquisition_ids']] == location.s1_names
  for season in range(4):
    want = expected_s2(root, location, season, product)
    for i, band in enumerate(bands):
      if rl.RES[band] == 10:   # On the reference grid: no resampling at all.
        np.testing.assert_array_equal(record['s2'][season, ..., i],
                                      np.rint(np.clip(want[..., i], 0, 255)), err_msg=band)
      else:
        assert_close_uint8(record['s2'][season, ..., i], want[..., i], f'{season} {band}')
    for i, band in enumerate(('VV', 'VH')):
      data, _ = rl.read(os.path.join(root, 's1', f'{location.loc:07d}',
                                     location.s1_names[season], band + '.tif'))
      want_s1 = data if data.dtype == np.uint8 else rl.normalise(data, rl.S1_MEAN[band],
                                                                 rl.S1_STD[band])
      np.testing.assert_array_equal(record['s1'][season, ..., i], want_s1, err_msg=band)
    label, _ = rl.read(os.path.join(root, labels_dir, f'{location.loc:07d}',
                                    location.s2_names[season], 'label.tif'))
    np.testing.assert_array_equal(record['labels'][season], label)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """/data as README names it: SSL4EO-S12 s1/, s2c/, s2a/ and the NoLDO-S12 labels.

  One location (one shard: the commands' `--workers 32` then runs inline, which keeps this
  test short); the label-pattern command also sees it.
  """
  tmp = str(tmp_path_factory.mktemp('release'))
  root = os.path.join(tmp, 'data', 'ssl4eo')
  noldo = os.path.join(tmp, 'data', 'noldo')
  labels = os.path.join(noldo, 'dw_labels')
  rng = np.random.default_rng(12)
  # L2A first: the L1C location then rewrites the shared S1 folders and labels (same names).
  l2a = rl.make_location(root, 1, rng, product='L2A', labels_dir=labels,
                         baseline_tags=(BASELINE_04,) + (None,) * 3)
  l1c = rl.make_location(root, 1, rng, labels_dir=labels,
                         baseline_tags=(None, None, None, BASELINE_04))
  rl.write_noldo_csv(os.path.join(noldo, 'dw_complete_ids.csv'), [l1c])
  # Pattern labels (/data/dw/<loc>/<season>.tif): copies of the NoLDO ones.
  for season, acq in enumerate(l1c.s2_names):
    data, transform = rl.read(os.path.join(labels, f'{1:07d}', acq, 'label.tif'))
    rl.write_tif(os.path.join(tmp, 'data', 'dw', f'{1:07d}', f'{season}.tif'), data, transform)
  return tmp, root, {'L1C': l1c, 'L2A': l2a}


@pytest.mark.slow
def test_readme_commands_convert_the_release(release):
  tmp, root, written = release
  labels = os.path.join(tmp, 'data', 'noldo', 'dw_labels')
  commands = readme_commands()
  assert len(commands) >= 3, commands
  outs = {}
  for command in commands:
    assert command.startswith('python -m data_prep.ssl4eo '), command
    done = run_readme_command(command, tmp)
    assert done.returncode == 0, (command, done.stderr[-3000:])
    out = re.search(r'--out (\S+)', command).group(1).replace('/data/', f'{tmp}/data/')
    outs[command] = out
  by_kind = {}
  for command, out in outs.items():
    kind = ('L2A' if '/s2a' in command else 'L1C') + ('-pattern' if 'pattern' in command else '')
    by_kind[kind] = out
  assert set(by_kind) == {'L1C', 'L2A', 'L1C-pattern'}, by_kind

  # NoLDO CSV, L1C: seasons paired by date across S1A/S1B, the release's shifted grids.
  location = written['L1C']
  assert location.s1_names != sorted(location.s1_names)   # name order would mispair
  records, summary = load(by_kind['L1C']), summary_of(by_kind['L1C'])
  assert sorted(records) == [1]
  check_record(records[1], root, location, 'L1C', labels)
  total = summary['total']
  assert total['converted'] == 1 and total['skipped'] == 0
  assert total['s2_shifted_grid_bands'] == 4 * COARSE_L1C
  assert total['s2_offset_removed'] == 1        # season 3 (baseline 04.00)
  assert total['non_finite_values'] == 7        # the swath border of season 0's VV
  assert total['pairs_over_max_days'] == 0 and total['labels_resampled'] == 0

  # L2A: 12-band records with the L2A statistics.
  records, summary = load(by_kind['L2A']), summary_of(by_kind['L2A'])
  check_record(records[1], root, written['L2A'], 'L2A', labels)
  assert summary['total']['s2_offset_removed'] == 1
  assert summary['total']['s2_shifted_grid_bands'] == 4 * (COARSE_L1C - 1)

  # The label pattern: labels by season number.
  records = load(by_kind['L1C-pattern'])
  assert sorted(records) == [1]
  check_record(records[1], root, location, 'L1C', labels)


@pytest.mark.slow
def test_l2a_records_feed_a_12_band_model(release):
  """The pipeline takes the 12 stored L2A bands as they are for data.s2_bands=12."""
  tmp, _, _ = release
  out = os.path.join(tmp, 'data', 'tfds', 'ssl4eo_s12_nol_l2a')
  if not os.path.exists(os.path.join(out, 'dataset_info.json')):  # This test alone.
    (command,) = [c for c in readme_commands() if '/s2a' in c]
    assert run_readme_command(command, tmp).returncode == 0
  records = load(out)
  config = pretrain_config.get_config()
  config.data.dataset_dir = out
  config.data.tile_size = 264
  config.data.crop_size = 264
  config.data.s2_bands = 12
  config.training.global_batch_size = 1
  batch = next(ip.create_pretrain_iterator(config, 'train', train=False, process_index=0,
                                           process_count=1, with_ids=True))
  assert batch['s2'].shape == (1, 264, 264, 12)
  record = records[int(batch['location_id'][0])]
  np.testing.assert_array_equal(batch['s2'][0], record['s2'][int(batch['season'][0])])
  config.data.s2_bands = 13
  with pytest.raises(ValueError, match='12 S2 bands'):
    next(ip.create_pretrain_iterator(config, 'train', train=False, process_index=0,
                                     process_count=1))


def test_8bit_release_120px_stored_as_is(tmp_path):
  """uint8 JPEG bands (the compressed release) of 120 px tiles, headerless NoLDO CSV."""
  root = str(tmp_path / 'raw')
  rng = np.random.default_rng(3)
  locations = [rl.make_location(root, loc, rng, tile=120, uint8=True, labels_dir='labels')
               for loc in (4, 7)]
  rl.make_location(root, 5, rng, tile=120, uint8=True, labels_dir='unlisted')  # not in the CSV
  rl.write_noldo_csv(os.path.join(root, 'labels', 'dw_complete_ids.csv'), locations,
                     header=False)
  out = str(tmp_path / 'out')
  summary = ssl4eo.main(['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
                         '--labels-csv', os.path.join(root, 'labels', 'dw_complete_ids.csv'),
                         '--out', out, '--workers', '1'])
  total = summary['total']
  assert total['converted'] == 2 and total['skipped'] == 0   # the CSV's locations only
  assert total['s2_uint8_seasons'] == 8 and total['s1_uint8_seasons'] == 8
  assert total['s2_offset_removed'] == 0 and total['non_finite_values'] == 0
  records = load(out)
  for location in locations:
    check_record(records[location.loc], root, location, 'L1C', labels_dir='labels')
  info = tfds.builder_from_directory(out).info
  assert info.features['s2'].shape == (120, 120, 13)  # one season per record
  assert info.features['season_labels'].shape == (4, 120, 120)
  assert info.splits['train'].num_examples + info.splits['validation'].num_examples == 2 * 4


@pytest.mark.slow
def test_mismatches_are_reported_with_file_sizes_and_offsets(tmp_path):
  root = str(tmp_path / 'raw')
  rng = np.random.default_rng(5)
  made = {loc: rl.make_location(root, loc, rng, tile=120) for loc in (1, 2, 3, 4, 5, 6)}
  made[7] = rl.make_location(root, 7, rng, tile=264)                 # another tile size
  made[8] = rl.make_location(root, 8, rng, tile=120, s1_shift_px=(2, -1))   # small S1 offset
  made[9] = rl.make_location(root, 9, rng, tile=120, s1_shift_px=(9, 0))    # large S1 offset
  made[10] = rl.make_location(root, 10, rng, tile=120, label_res=20)        # 20 m labels
  made[11] = rl.make_location(root, 11, rng, tile=120, crs='EPSG:4326', pixel=9e-5)
  loc_dir = lambda loc, sensor: os.path.join(root, sensor, f'{loc:07d}')  # noqa: E731
  # 2: S1 VV of 264 px under 120 px S2.
  vv = os.path.join(loc_dir(2, 's1'), made[2].s1_names[1], 'VV.tif')
  rl.write_tif(vv, np.zeros((264, 264), np.float32),
               rl.Affine(10, 0, made[2].left, 0, -10, made[2].top))
  # 3: a label shifted by 30 px in a projected CRS; 11: the same in EPSG:4326.
  for loc, pixel in ((3, 10.0), (11, 9e-5)):
    label = os.path.join(root, 'noldo/dw_labels', f'{loc:07d}', made[loc].s2_names[0],
                         'label.tif')
    data, t = rl.read(label)
    rl.write_tif(label, data, rl.Affine(t.a, 0, t.c + 30 * pixel, 0, t.e, t.f),
                 crs='EPSG:4326' if loc == 11 else rl.CRS)
  # 4: B11 covers a smaller extent.
  b11 = os.path.join(loc_dir(4, 's2c'), made[4].s2_names[2], 'B11.tif')
  rl.write_tif(b11, np.zeros((50, 50), np.uint16),
               rl.release_transform(made[4].left, made[4].top, 20))
  # 5: folder names without dates (and no date tags): never paired by name.
  os.rename(os.path.join(loc_dir(5, 's1'), made[5].s1_names[0]),
            os.path.join(loc_dir(5, 's1'), 'season_a'))
  rl.write_noldo_csv(os.path.join(root, 'noldo', 'ids.csv'), list(made.values()))
  out = str(tmp_path / 'out')
  summary = ssl4eo.main(['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
                         '--labels-csv', os.path.join(root, 'noldo', 'ids.csv'),
                         '--labels-root', os.path.join(root, 'noldo', 'dw_labels'),
                         '--out', out, '--workers', '1', '--max-pair-days', '3'])
  rejects = rejects_of(out)
  assert sorted(rejects) == [2, 3, 4, 5, 7, 9, 11]
  assert rejects[2]['file'] == vv
  assert rejects[2]['reason'].startswith(
      'size_mismatch: S1 VV is 264x264 px of 10 m (2640 x 2640 m) but S2 B2 is 120x120 px of '
      '10 m (1200 x 1200 m)'), rejects[2]
  assert rejects[3]['reason'].startswith('bounds_mismatch: label ('), rejects[3]
  assert 'by 30.00 px = 300 m' in rejects[3]['reason'], rejects[3]
  assert 'by 30.00 px = 0.0027 degree' in rejects[11]['reason'], rejects[11]
  assert rejects[4]['file'] == b11
  assert 'S2 B11 is 50x50 px of 20 m (1000 x 1000 m) but S2 B2 is 120x120 px' in \
      rejects[4]['reason']
  assert rejects[5]['reason'].startswith('no_date:') and rejects[5]['file'].endswith('season_a')
  assert rejects[7]['reason'].startswith(
      'size_mismatch: S2 B2 is 264x264 px but the tiles of this dataset are 120x120 px'), \
      rejects[7]
  assert rejects[9]['reason'].startswith('bounds_mismatch: S1 VV'), rejects[9]
  assert 'by 9.00 px = 90 m (allowed 4 px = 40 m)' in rejects[9]['reason'], rejects[9]

  total = summary['total']
  assert total['converted'] == 4                 # 1, 6, 8, 10
  assert total['s1_offset_resampled'] == 4       # location 8, every season
  assert total['labels_resampled'] == 4          # location 10, every season
  gaps = [rl.S1_DAYS_BEFORE[t] + 5 / 24 + loc % 3 for loc in (1, 6, 8, 10) for t in range(4)]
  assert total['pairs_over_max_days'] == sum(g > 3 for g in gaps)
  records = load(out)
  # Location 8: S1 moved back onto the S2 grid by its georeferencing (a whole-pixel shift).
  for season in range(4):
    data, transform = rl.read(os.path.join(loc_dir(8, 's1'), made[8].s1_names[season], 'VH.tif'))
    _, ref = rl.read(os.path.join(loc_dir(8, 's2c'), made[8].s2_names[season], 'B2.tif'))
    want = rl.normalise_float(rl.bilinear_onto(data, transform, ref, 120), rl.S1_MEAN['VH'],
                              rl.S1_STD['VH'])
    assert_close_uint8(records[8]['s1'][season, ..., 1], want, 'shifted S1')
    # Location 10: nearest neighbour from the 20 m label grid.
    label, transform = rl.read(os.path.join(root, 'noldo/dw_labels', f'{10:07d}',
                                            made[10].s2_names[season], 'label.tif'))
    _, ref = rl.read(os.path.join(loc_dir(10, 's2c'), made[10].s2_names[season], 'B2.tif'))
    np.testing.assert_array_equal(records[10]['labels'][season],
                                  rl.nearest_onto(label, transform, ref, 120))
    np.testing.assert_array_equal(records[10]['labels'][season],
                                  np.kron(label, np.ones((2, 2), np.uint8)))


def test_seasons_pair_by_date_not_by_name():
  s2 = [rl.s2_name(d) for d in rl.S2_DATES]
  s1 = [rl.s1_name(d, p) for d, p in zip(rl.S2_DATES, rl.S1_PLATFORMS)]
  shuffled = sorted(s1)                                  # S1A..., S1A..., S1B..., S1B...
  partner = ssl4eo.pair_seasons([ssl4eo.date_from_name(n) for n in s2],
                                [ssl4eo.date_from_name(n) for n in shuffled])
  assert [shuffled[j] for j in partner] == s1
  assert ssl4eo.date_from_name('S1B_IW_GRDH_1SDV_20210912T053012_20210912T053037_x').month == 9
  assert ssl4eo.date_from_name('20211209T104001_20211209T104008_T32UNU').day == 9
  assert ssl4eo.date_from_name('season_a') is None
  assert ssl4eo.date_from_tags({'system:time_start': '1615717821000'}).month == 3


def test_s2_offset_option_and_metadata(tmp_path):
  """--s2-offset 1000 removes the offset everywhere; auto only where the files say so."""
  root = str(tmp_path / 'raw')
  rng = np.random.default_rng(9)
  tags = ({'BOA_ADD_OFFSET': '-1000'}, {'PROCESSING_BASELINE': 'N0400'},
          {'PROCESSING_BASELINE': '03.01'}, None)
  location = rl.make_location(root, 1, rng, tile=60, baseline_tags=tags)
  # The generator adds +1000 to every tagged season, also the 03.01 one (which keeps it).
  rl.write_noldo_csv(os.path.join(root, 'ids.csv'), [location])
  args = ['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
          '--labels-csv', os.path.join(root, 'ids.csv'),
          '--labels-root', os.path.join(root, 'noldo', 'dw_labels'), '--workers', '1']
  auto = ssl4eo.main(args + ['--out', str(tmp_path / 'auto')])
  assert auto['total']['s2_offset_removed'] == 2
  record = load(str(tmp_path / 'auto'))[1]
  for season, removed in enumerate((1000.0, 1000.0, 0.0, 0.0)):
    location.band_offset[season] = removed
    want = expected_s2(root, location, season, 'L1C')
    np.testing.assert_array_equal(record['s2'][season, ..., 1], np.rint(want[..., 1]))
  forced = ssl4eo.main(args + ['--out', str(tmp_path / 'forced'), '--s2-offset', '1000'])
  assert forced['total']['s2_offset_removed'] == 4
  record = load(str(tmp_path / 'forced'))[1]
  location.band_offset[:] = [1000.0] * 4
  for season in range(4):
    want = expected_s2(root, location, season, 'L1C')
    np.testing.assert_array_equal(record['s2'][season, ..., 7], np.rint(want[..., 7]))


@pytest.mark.slow
def test_tfds_builder_reads_the_noldo_layout(tmp_path):
  """The Beam-capable builder (plain generator here) with a NoLDO CSV config: as the CLI."""
  root = str(tmp_path / 'raw')
  rng = np.random.default_rng(21)
  locations = [rl.make_location(root, loc, rng, tile=60, product='L2A') for loc in (2, 3)]
  rl.write_noldo_csv(os.path.join(root, 'noldo', 'ids.csv'), locations)
  config = ssl4eo.Ssl4eoBuilderConfig(
      name='noldo_l2a', s2_dir='s2a', labels_csv='noldo/ids.csv', labels_root='noldo/dw_labels',
      tile_size=60, s2_product='L2A', labels_manifest='')
  builder = ssl4eo.Ssl4eoS12Nol(data_dir=str(tmp_path / 'tfds'), config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  got = {int(r['location_id']): r
         for r in read_pretrain_locations(builder.data_dir, 'train+validation')}
  out = str(tmp_path / 'cli')
  ssl4eo.main(['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2a'),
               '--labels-csv', os.path.join(root, 'noldo', 'ids.csv'), '--out', out,
               '--labels-root', os.path.join(root, 'noldo', 'dw_labels'), '--workers', '1'])
  want = load(out)
  assert sorted(got) == sorted(want) == [2, 3]
  for loc, record in want.items():
    for key in ('s1', 's2', 'labels', 'acquisition_ids', 's1_acquisition_ids', 's2_band_names'):
      np.testing.assert_array_equal(got[loc][key], record[key], err_msg=key)
  check_record(got[3], root, locations[1], 'L2A')
