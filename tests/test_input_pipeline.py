"""input_pipeline on tiny TFDS folders written here (40x40 tiles, 32 crops; DFC-style 32x32).

The images are built so that every label is a known function of the image pixels at the same
place, which lets the tests check that crops, flips and rotations move images and labels together
(nearest-neighbour images for the exact checks), and that a pretraining sample holds the season
it claims.
"""
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import pretrain as pretrain_config
from configs import transfer as transfer_config
from cromss_jax import constants
from cromss_jax import input_pipeline as ip
from helpers import write_tfds_folder

TILE, CROP, SEASONS = 40, 32, 4
DFC_TILE = 32


def _base(location: int, size: int = TILE) -> np.ndarray:
  return np.random.default_rng(location).integers(0, 256, (size, size)).astype(np.uint8)


def _pretrain_records(location: int, clean: bool) -> list[dict]:
  """The location's records, one per season, as data_prep.ssl4eo writes them."""
  base = _base(location).astype(np.int64)
  season_labels = np.stack([(base + t) % 9 for t in range(SEASONS)]).astype(np.uint8)
  records = []
  for t in range(SEASONS):
    s1 = np.zeros((TILE, TILE, 2), np.uint8)
    s1[..., 0] = base
    s1[..., 1] = 40 * t + 10                 # identifies the season in the batch
    s2 = np.zeros((TILE, TILE, 13), np.uint8)
    s2[..., 0] = base
    s2[..., 1:] = 100 + np.arange(1, 13)     # band b is the constant 100 + b
    record = {'s1': s1, 's2': s2, 'season_labels': season_labels, 'location_id': location,
              'season': t, 'acquisition_id': f'a{t}', 'crs': 'EPSG:32632',
              'transform': np.arange(6, dtype=np.float64)}
    if clean:
      record['clean_labels'] = ((base + t + 1) % 9).astype(np.uint8)
    records.append(record)
  return records


def _dfc_label(base: np.ndarray) -> np.ndarray:
  return np.where(base % 10 == 0, constants.IGNORE_LABEL, base % 8).astype(np.uint8)


def _dfc_example(index: int, bands: int) -> dict:
  base = _base(1000 + index, DFC_TILE)
  s2 = np.zeros((DFC_TILE, DFC_TILE, bands), np.uint8)
  s2[..., 0] = base
  return {'s1': np.stack([base, np.full_like(base, 7)], -1), 's2': s2,
          'label': _dfc_label(base), 'patch_id': f'p{index}'}


def _write(root: str, name: str, features, splits: dict, file_format: str = 'tfrecord') -> str:
  """splits: {split: [[example, ...] per shard]} -> the TFDS version folder."""
  return write_tfds_folder(os.path.join(root, name, '1.0.0'), name, features, splits,
                           file_format)


def _pretrain_features(clean: bool):
  f = tfds.features
  spec = {
      's1': f.Tensor(shape=(TILE, TILE, 2), dtype=np.uint8),
      's2': f.Tensor(shape=(TILE, TILE, 13), dtype=np.uint8),
      'season_labels': f.Tensor(shape=(SEASONS, TILE, TILE), dtype=np.uint8),
      'location_id': f.Scalar(dtype=np.int64),
      'season': f.Scalar(dtype=np.int64),
      'acquisition_id': f.Text(),
      'crs': f.Text(),
      'transform': f.Tensor(shape=(6,), dtype=np.float64),
  }
  if clean:
    spec['clean_labels'] = f.Tensor(shape=(TILE, TILE), dtype=np.uint8)
  return f.FeaturesDict(spec)


def _write_pretrain(root: str, splits: dict[str, list[list[int]]], clean: bool = True) -> str:
  """{split: [[location, ...] per shard]} -> an array_record ssl4eo_s12_nol folder."""
  records = {split: [[r for loc in shard for r in _pretrain_records(loc, clean)]
                     for shard in shards] for split, shards in splits.items()}
  return _write(root, 'ssl4eo_s12_nol', _pretrain_features(clean), records, 'array_record')


def _dfc_features(bands: int):
  f = tfds.features
  return f.FeaturesDict({
      's1': f.Tensor(shape=(DFC_TILE, DFC_TILE, 2), dtype=np.uint8, encoding='bytes'),
      's2': f.Tensor(shape=(DFC_TILE, DFC_TILE, bands), dtype=np.uint8, encoding='bytes'),
      'label': f.Tensor(shape=(DFC_TILE, DFC_TILE), dtype=np.uint8, encoding='bytes'),
      'patch_id': f.Text(),
  })


TRAIN_IDS = list(range(24))      # 4 shards of 6
VAL_IDS = list(range(100, 107))  # 1 shard of 7


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('datasets'))
  out = {
      'pretrain': _write_pretrain(os.path.join(root, 'clean'), {
          'train': [TRAIN_IDS[s::4] for s in range(4)], 'validation': [VAL_IDS]}),
      'noclean': _write_pretrain(os.path.join(root, 'noclean'), {
          'train': [list(range(8))], 'validation': [[50]]}, clean=False),
  }
  # Records out of (location, season) order: a sample would silently get another season.
  shuffled = [r for loc in range(4) for r in _pretrain_records(loc, True)]
  shuffled[0], shuffled[1] = shuffled[1], shuffled[0]
  out['misordered'] = _write(os.path.join(root, 'misordered'), 'ssl4eo_s12_nol',
                             _pretrain_features(True), {'train': [shuffled]}, 'array_record')
  dfc_train = [[_dfc_example(i, 13) for i in range(8)]]                     # 1 shard
  dfc_test = [[_dfc_example(i, 13) for i in range(a, b)] for a, b in ((20, 25), (25, 30),
                                                                       (30, 33))]
  out['dfc'] = _write(os.path.join(root, 'dfc'), 'dfc2020', _dfc_features(13),
                      {'validation': dfc_train, 'test': dfc_test})
  out['dfc9'] = _write(os.path.join(root, 'dfc9'), 'dfc2020', _dfc_features(9),
                       {'validation': [[_dfc_example(i, 9) for i in range(8)]],
                        'test': [[_dfc_example(9, 9)]]})
  return out


def _config(dataset_dir: str, **data):
  config = pretrain_config.get_config()
  config.data.dataset_dir = dataset_dir
  config.data.tile_size = TILE
  config.data.crop_size = CROP
  config.data.num_workers = 0
  config.training.global_batch_size = 8
  config.data.update(data)
  return config


def _dfc_config(dataset_dir: str, **data):
  # Quarter turns with p = 0.75 (with the flips: all 8 orientations equally likely).
  config = transfer_config.get_config()
  config.data.dataset_dir = dataset_dir
  config.data.update(tile_size=DFC_TILE, crop_size=DFC_TILE, rotation='rot90',
                     rotation_prob=0.75, shuffle_buffer=16)
  config.training.global_batch_size = 8
  config.data.update(data)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _check_samples(batch, crop=None):
  """Every sample holds its location's tile in the season it claims, all maps included."""
  off = 0 if crop is None else (TILE - crop) // 2
  size = TILE if crop is None else crop
  window = (slice(off, off + size),) * 2
  season = batch['season'][:, None, None]
  base = np.stack([_base(int(i))[window] for i in batch['location_id']]).astype(np.int64)
  np.testing.assert_array_equal(batch['s1'][..., 0], base)
  np.testing.assert_array_equal(batch['s1'][..., 1], np.broadcast_to(40 * season + 10,
                                                                     base.shape))
  np.testing.assert_array_equal(batch['s2'][..., 0], base)
  np.testing.assert_array_equal(batch['labels'], (base + season) % 9)
  if 'clean_labels' in batch:
    np.testing.assert_array_equal(batch['clean_labels'], (base + season + 1) % 9)
  for t in range(SEASONS):
    np.testing.assert_array_equal(batch['season_labels'][:, t], (base + t) % 9)


def test_keys_shapes_dtypes_and_info(folders):
  config = _config(folders['pretrain'])
  batch = next(ip.create_pretrain_iterator(config, process_index=0, process_count=1))
  # Training: whole uint8 tiles for the train step to augment.
  expected = {'s1': (np.uint8, (8, TILE, TILE, 2)), 's2': (np.uint8, (8, TILE, TILE, 13)),
              'labels': (np.uint8, (8, TILE, TILE)),
              'season_labels': (np.uint8, (8, SEASONS, TILE, TILE)),
              'season': (np.int32, (8,)), 'clean_labels': (np.uint8, (8, TILE, TILE))}
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == expected
  # Evaluation: centre crops, int32 labels, `valid`.
  val = next(ip.create_pretrain_iterator(config, 'validation', process_index=0,
                                         process_count=1))
  expected_val = {'s1': (np.uint8, (8, CROP, CROP, 2)), 's2': (np.uint8, (8, CROP, CROP, 13)),
                  'labels': (np.int32, (8, CROP, CROP)),
                  'season_labels': (np.uint8, (8, SEASONS, CROP, CROP)),
                  'season': (np.int32, (8,)), 'clean_labels': (np.int32, (8, CROP, CROP)),
                  'valid': (np.bool_, (8,))}
  assert {k: (v.dtype, v.shape) for k, v in val.items()} == expected_val

  noclean = next(ip.create_pretrain_iterator(_config(folders['noclean']), 'validation',
                                             process_index=0, process_count=1))
  assert set(noclean) == set(expected_val) - {'clean_labels'}

  info = ip.pretrain_info(config, process_count=2)
  assert (info.num_train_examples, info.num_eval_examples) == (24, 7)
  assert (info.steps_per_epoch, info.per_host_batch, info.eval_steps) == (3, 4, 1)
  assert (info.tile_size, info.crop_size, info.s2_channels, info.num_seasons) == (40, 32, 13, 4)
  assert info.has_clean_labels and not ip.pretrain_info(
      _config(folders['noclean']), process_count=1).has_clean_labels
  config.training.steps_per_epoch = 5
  assert ip.steps_per_epoch(config, 24) == 5


def test_samples_hold_the_season_they_claim(folders):
  config = _config(folders['pretrain'])
  batches = _take(ip.create_pretrain_iterator(config, process_index=0, process_count=1,
                                              with_ids=True), 6)
  for batch in batches:
    _check_samples(batch)
  seasons = np.concatenate([b['season'] for b in batches])
  assert len(set(seasons.tolist())) == SEASONS   # 48 draws of 4 seasons
  for batch in ip.create_pretrain_iterator(config, 'validation', process_index=0,
                                           process_count=1, with_ids=True):
    _check_samples({k: v[batch['valid']] for k, v in batch.items()}, crop=CROP)


def test_misordered_records_are_refused(folders):
  config = _config(folders['misordered'], crop_size=CROP)
  config.training.global_batch_size = 4
  with pytest.raises(ValueError, match=r'record \d+ holds season \d, expected \d.*data_prep'):
    for _ in ip.create_pretrain_iterator(config, num_steps=8, process_index=0, process_count=1):
      pass


def test_old_per_location_records_are_refused(tmp_path):
  features = tfds.features.FeaturesDict({
      's1': tfds.features.Tensor(shape=(SEASONS, TILE, TILE, 2), dtype=np.uint8),
      's2': tfds.features.Tensor(shape=(SEASONS, TILE, TILE, 13), dtype=np.uint8),
      'labels': tfds.features.Tensor(shape=(SEASONS, TILE, TILE), dtype=np.uint8),
      'location_id': tfds.features.Scalar(dtype=np.int64)})
  example = {'s1': np.zeros((SEASONS, TILE, TILE, 2), np.uint8),
             's2': np.zeros((SEASONS, TILE, TILE, 13), np.uint8),
             'labels': np.zeros((SEASONS, TILE, TILE), np.uint8), 'location_id': 1}
  old = _write(str(tmp_path), 'ssl4eo_s12_nol', features, {'train': [[example]]})
  with pytest.raises(ValueError, match=r"lacks the features \['season_labels', 'season'\].*"
                                       r'same command'):
    ip.pretrain_info(_config(old), process_count=1)


@pytest.mark.parametrize('bands', [3, 9, 12, 13])
def test_band_subsets(folders, bands):
  config = _config(folders['pretrain'], s2_bands=bands)
  batch = next(ip.create_pretrain_iterator(config, 'validation', process_index=0,
                                           process_count=1))
  subset = constants.S2_BAND_SUBSETS[bands]
  assert batch['s2'].shape[-1] == bands
  for channel, band in enumerate(subset):
    if band:   # band 0 carries the image, the others the constant 100 + band
      np.testing.assert_array_equal(batch['s2'][..., channel], 100 + band)
    else:
      np.testing.assert_array_equal(batch['s2'][..., channel], batch['s1'][..., 0])


@pytest.mark.slow
def test_same_seed_same_batches_whatever_the_workers(folders):
  config = _config(folders['pretrain'])
  a = _take(ip.create_pretrain_iterator(config, process_index=0, process_count=1), 4)
  for workers, prefetch in ((0, 0), (1, 2)):
    other = _config(folders['pretrain'], num_workers=workers, prefetch=prefetch)
    _assert_batches_equal(a, _take(ip.create_pretrain_iterator(
        other, process_index=0, process_count=1), 4))
  c = _take(ip.create_pretrain_iterator(config, seed=7, process_index=0, process_count=1), 4)
  assert not np.array_equal(a[0]['s1'], c[0]['s1'])


@pytest.mark.parametrize('steps', [-1, 5])
def test_resume_equals_uninterrupted_run(folders, steps):
  config = _config(folders['pretrain'])
  config.training.steps_per_epoch = steps   # 5: 40 samples of 24 locations in an epoch
  full = _take(ip.create_pretrain_iterator(config, process_index=1, process_count=2,
                                           with_ids=True), 7)
  for start in ((1, 3, 4) if steps == -1 else (4,)):
    resumed = _take(ip.create_pretrain_iterator(config, start_step=start, process_index=1,
                                                process_count=2, with_ids=True), 7 - start)
    _assert_batches_equal(full[start:], resumed)
  finite = list(ip.create_pretrain_iterator(config, start_step=2, num_steps=3, process_index=1,
                                            process_count=2, with_ids=True))
  _assert_batches_equal(full[2:5], finite)
  # A new epoch visits the locations in a new order.
  if steps == -1:
    epoch0 = np.concatenate([b['location_id'] for b in full[:3]])
    epoch1 = np.concatenate([b['location_id'] for b in full[3:6]])
    assert not np.array_equal(epoch0, epoch1)


def test_hosts_split_each_global_batch(folders):
  config = _config(folders['pretrain'])
  one_host = list(ip.create_pretrain_iterator(config, num_steps=6, process_index=0,
                                              process_count=1, with_ids=True))
  hosts = [list(ip.create_pretrain_iterator(config, num_steps=6, process_index=h,
                                            process_count=2, with_ids=True)) for h in range(2)]
  for step in range(6):
    # The global batch does not depend on the number of hosts; host h holds its slice h.
    joined = {k: np.concatenate([hosts[0][step][k], hosts[1][step][k]]) for k in one_host[0]}
    _assert_batches_equal([joined], [one_host[step]])
  for epoch in range(2):   # 3 steps per epoch: every location once, hosts disjoint
    seen = [[int(i) for b in hosts[h][3 * epoch:3 * epoch + 3] for i in b['location_id']]
            for h in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == TRAIN_IDS


def test_validation_covers_split_once(folders):
  runs = {}
  for hosts, batch in ((2, 8), (1, 4)):
    config = _config(folders['pretrain'])
    config.training.global_batch_size = batch
    ids, num_batches = [], set()
    for host in range(hosts):
      batches = list(ip.create_pretrain_iterator(config, 'validation', process_index=host,
                                                 process_count=hosts, with_ids=True))
      runs[hosts, host] = batches
      num_batches.add(len(batches))
      for b in batches:
        assert b['valid'].dtype == bool and b['s1'].shape[0] == batch // hosts
        ids += [int(i) for i in b['location_id'][b['valid']]]
        _check_samples(b, crop=CROP)   # centre crop, no flips or rotation
    assert sorted(ids) == VAL_IDS
    assert len(num_batches) == 1
  # A second pass is the same (fixed order, fixed season per location).
  again = list(ip.create_pretrain_iterator(config, 'validation', process_index=0,
                                           process_count=1, with_ids=True))
  _assert_batches_equal(again, runs[1, 0])


@pytest.mark.slow
def test_train_step_augments_whole_tiles(folders):
  """What the train step makes of a batch: crops whose labels still fit their images."""
  import jax   # pylint: disable=g-import-not-at-top
  from cromss_jax import augment   # pylint: disable=g-import-not-at-top
  batch = next(ip.create_pretrain_iterator(_config(folders['pretrain']), process_index=0,
                                           process_count=1))
  aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=1.0,
                              image_interpolation='nearest')
  out = jax.jit(lambda b: augment.augment_batch(b, jax.random.PRNGKey(0), aug))(batch)
  crop_base = np.asarray(out['s1'][..., 0]).astype(np.int64)
  assert crop_base.shape == (8, CROP, CROP)
  np.testing.assert_array_equal(out['labels'], (crop_base + batch['season'][:, None, None]) % 9)


def test_quarter_turns_of_free_rotation_are_exact():
  x = tf.constant(np.random.default_rng(0).integers(0, 256, (6, 6, 3)).astype(np.uint8))
  for turns in (-1, 1):
    angle = tf.constant(turns * math.pi / 2)
    for rotate in (ip._rotate_nearest, ip._rotate_bilinear):
      rotated = rotate(x, angle).numpy()
      # One of the two senses; the angle distribution is symmetric, so either is fine.
      assert any(np.array_equal(rotated, tf.image.rot90(x, k)) for k in (1, 3))
  small = ip._rotate_bilinear(tf.fill([8, 8, 2], tf.constant(77, tf.uint8)), tf.constant(0.3))
  np.testing.assert_array_equal(small, 77)   # mirrored borders: no fill value blended in


def _dihedral_crops(image: np.ndarray, crop: int) -> list[np.ndarray]:
  out = []
  for i in range(image.shape[0] - crop + 1):
    for j in range(image.shape[1] - crop + 1):
      patch = image[i:i + crop, j:j + crop]
      for p in (patch, patch[::-1]):
        out += [np.rot90(p, k) for k in range(4)]
  return out


@pytest.mark.parametrize('rotation', ['free', 'rot90'])
def test_downstream_images_and_labels_move_together(folders, rotation):
  config = _dfc_config(folders['dfc'], crop_size=24, rotation=rotation, rotation_prob=1.0,
                       image_interpolation='nearest')
  batches = _take(ip.create_downstream_iterator(config, 'validation', train=True,
                                                process_index=0, process_count=1,
                                                with_ids=True), 3)
  not_dihedral = 0
  for batch in batches:
    base = batch['s1'][..., 0]
    np.testing.assert_array_equal(batch['label'], _dfc_label(base).astype(np.int32))
    np.testing.assert_array_equal(batch['s2'][..., 0], base)
    for i, patch in enumerate(batch['patch_id']):
      candidates = _dihedral_crops(_base(1000 + int(bytes(patch)[1:]), DFC_TILE), 24)
      not_dihedral += not any(np.array_equal(base[i], c) for c in candidates)
  if rotation == 'rot90':
    assert not_dihedral == 0
  else:   # a nearest rotation of 24 px by under ~2 degrees can leave a crop unchanged
    assert not_dihedral >= 20


def test_bilinear_rotation_keeps_constant_bands(folders):
  config = _dfc_config(folders['dfc'], rotation='free', rotation_prob=1.0)
  batch = next(ip.create_downstream_iterator(config, 'validation', train=True,
                                             process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['s1'][..., 1], 7)
  np.testing.assert_array_equal(batch['s2'][..., 5], 0)


@pytest.mark.slow
def test_downstream_pipeline(folders):
  config = _dfc_config(folders['dfc'])
  batches = _take(ip.create_downstream_iterator(config, 'validation', train=True,
                                                process_index=0, process_count=1), 2)
  assert set(batches[0]) == {'s1', 's2', 'label'}
  assert batches[0]['label'].dtype == np.int32
  assert batches[0]['s2'].shape == (8, DFC_TILE, DFC_TILE, 13)
  labels = np.stack([b['label'] for b in batches])
  np.testing.assert_array_equal(
      labels, _dfc_label(np.stack([b['s1'][..., 0] for b in batches])).astype(np.int32))
  assert (labels == constants.IGNORE_LABEL).any()

  # Train on 'validation' (1 shard: split by example), test on 'test' (3 shards: by file).
  seen = [{bytes(i) for b in ip.create_downstream_iterator(
      config, 'validation', train=True, num_steps=2, process_index=h, process_count=2,
      with_ids=True) for i in b['patch_id']} for h in range(2)]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8
  ids = []
  for h in range(2):
    batches = list(ip.create_downstream_iterator(config, 'test', train=False, process_index=h,
                                                 process_count=2, with_ids=True))
    assert len(batches) == ip.downstream_info(config, process_count=2).eval_steps == 2
    ids += [bytes(i).decode() for b in batches for i in b['patch_id'][b['valid']]]
  assert sorted(ids) == sorted(f'p{i}' for i in range(20, 33))


def test_clear_errors(folders, tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere.*data_prep.ssl4eo'):
    ip.create_pretrain_iterator(_config(missing), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='dataset_dir is not set'):
    ip.pretrain_info(_config(''), process_count=1)
  with pytest.raises(ValueError, match='crop_size=64'):
    ip.pretrain_info(_config(folders['pretrain'], crop_size=64, tile_size=TILE),
                     process_count=1)
  with pytest.raises(ValueError, match='s2_bands=13.*9 S2 bands'):
    ip.downstream_info(_dfc_config(folders['dfc9']), process_count=1)
  assert ip.downstream_info(_dfc_config(folders['dfc9'], s2_bands=9),
                            process_count=1).s2_channels == 9
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    ip.create_pretrain_iterator(_config(folders['pretrain']), process_index=0, process_count=3)
  # The parent of the version folder is accepted too.
  parent = os.path.dirname(folders['pretrain'])
  assert ip.pretrain_info(_config(parent), process_count=1).num_train_examples == 24
