"""input_pipeline on tiny TFDS folders written here (40x40 tiles, 32 crops; DFC-style 32x32).

The images are built so that every label is a known function of the image pixels at the same
place, which lets the tests check that crops, flips and rotations move images and all label maps
together (nearest-neighbour images for the exact checks).
"""
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import pretrain as pretrain_config
from cromss_jax import constants
from cromss_jax import input_pipeline as ip

TILE, CROP, SEASONS = 40, 32, 4
DFC_TILE = 32


def _base(location: int, size: int = TILE) -> np.ndarray:
  return np.random.default_rng(location).integers(0, 256, (size, size)).astype(np.uint8)


def _pretrain_example(location: int, clean: bool) -> dict:
  base = _base(location).astype(np.int64)
  s1 = np.zeros((SEASONS, TILE, TILE, 2), np.uint8)
  s2 = np.zeros((SEASONS, TILE, TILE, 13), np.uint8)
  labels = np.zeros((SEASONS, TILE, TILE), np.uint8)
  for t in range(SEASONS):
    s1[t, ..., 0] = base
    s1[t, ..., 1] = 40 * t + 10            # identifies the season in the batch
    s2[t, ..., 0] = base
    s2[t, ..., 1:] = 100 + np.arange(1, 13)  # band b is the constant 100 + b
    labels[t] = (base + t) % 9
  example = {'s1': s1, 's2': s2, 'labels': labels, 'location_id': location,
             'acquisition_ids': np.array([b'a%d' % t for t in range(SEASONS)], object),
             'crs': 'EPSG:32632', 'transform': np.arange(6, dtype=np.float64)}
  if clean:
    example['clean_labels'] = ((base[None] + np.arange(SEASONS)[:, None, None] + 1) % 9
                               ).astype(np.uint8)
  return example


def _dfc_label(base: np.ndarray) -> np.ndarray:
  return np.where(base % 10 == 0, constants.IGNORE_LABEL, base % 8).astype(np.uint8)


def _dfc_example(index: int, bands: int) -> dict:
  base = _base(1000 + index, DFC_TILE)
  s2 = np.zeros((DFC_TILE, DFC_TILE, bands), np.uint8)
  s2[..., 0] = base
  return {'s1': np.stack([base, np.full_like(base, 7)], -1), 's2': s2,
          'label': _dfc_label(base), 'patch_id': f'p{index}'}


def _write(root: str, name: str, features, splits: dict) -> str:
  """splits: {split: [[example, ...] per shard]} -> the TFDS version folder."""
  folder = os.path.join(root, name, '1.0.0')
  os.makedirs(folder)
  for split, shards in splits.items():
    for i, shard in enumerate(shards):
      path = os.path.join(folder, f'{name}-{split}.tfrecord-{i:05d}-of-{len(shards):05d}')
      with tf.io.TFRecordWriter(path) as writer:
        for example in shard:
          writer.write(features.serialize_example(example))
  tfds.folder_dataset.write_metadata(data_dir=folder, features=features, check_data=False)
  return folder


def _pretrain_features(clean: bool):
  f = tfds.features
  spec = {
      's1': f.Tensor(shape=(SEASONS, TILE, TILE, 2), dtype=np.uint8, encoding='zlib'),
      's2': f.Tensor(shape=(SEASONS, TILE, TILE, 13), dtype=np.uint8, encoding='zlib'),
      'labels': f.Tensor(shape=(SEASONS, TILE, TILE), dtype=np.uint8, encoding='zlib'),
      'location_id': f.Scalar(dtype=np.int64),
      'acquisition_ids': f.Tensor(shape=(SEASONS,), dtype=np.object_),
      'crs': f.Text(),
      'transform': f.Tensor(shape=(6,), dtype=np.float64),
  }
  if clean:
    spec['clean_labels'] = f.Tensor(shape=(SEASONS, TILE, TILE), dtype=np.uint8,
                                    encoding='zlib')
  return f.FeaturesDict(spec)


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
  train = [[_pretrain_example(i, True) for i in TRAIN_IDS[s::4]] for s in range(4)]
  val = [[_pretrain_example(i, True) for i in VAL_IDS]]
  out = {'pretrain': _write(os.path.join(root, 'clean'), 'ssl4eo_s12_nol',
                            _pretrain_features(True), {'train': train, 'validation': val})}
  out['noclean'] = _write(
      os.path.join(root, 'noclean'), 'ssl4eo_s12_nol', _pretrain_features(False),
      {'train': [[_pretrain_example(i, False) for i in range(8)]],
       'validation': [[_pretrain_example(50, False)]]})
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
  config.data.shuffle_buffer = 16
  config.training.global_batch_size = 8
  # Most tests here check the host augmentation; test_device_augmentation_gets_whole_tiles
  # checks the default, 'device'.
  config.data.augment_on = 'host'
  config.data.update(data)
  return config


def _dfc_config(dataset_dir: str, **data):
  # Quarter turns with p = 0.75 (with the flips: all 8 orientations equally likely).
  return _config(dataset_dir, tile_size=DFC_TILE, crop_size=DFC_TILE, rotation='rot90',
                 rotation_prob=0.75, **data)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_keys_shapes_dtypes_and_info(folders):
  config = _config(folders['pretrain'])
  batch = next(ip.create_pretrain_iterator(config, process_index=0, process_count=1))
  expected = {'s1': (np.uint8, (8, CROP, CROP, 2)), 's2': (np.uint8, (8, CROP, CROP, 13)),
              'labels': (np.int32, (8, CROP, CROP)),
              'season_labels': (np.uint8, (8, SEASONS, CROP, CROP)),
              'season': (np.int32, (8,)), 'clean_labels': (np.int32, (8, CROP, CROP))}
  assert set(batch) == set(expected)
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key

  noclean = next(ip.create_pretrain_iterator(_config(folders['noclean']), 'validation',
                                             process_index=0, process_count=1))
  assert set(noclean) == set(expected) - {'clean_labels'} | {'valid'}

  info = ip.pretrain_info(config, process_count=2)
  assert (info.num_train_examples, info.num_eval_examples) == (24, 7)
  assert (info.steps_per_epoch, info.per_host_batch, info.eval_steps) == (3, 4, 1)
  assert (info.tile_size, info.crop_size, info.s2_channels, info.num_seasons) == (40, 32, 13, 4)
  assert info.has_clean_labels and not ip.pretrain_info(
      _config(folders['noclean']), process_count=1).has_clean_labels
  config.training.steps_per_epoch = 5
  assert ip.steps_per_epoch(config, 24) == 5


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
def test_images_and_all_labels_move_together(folders, rotation):
  config = _config(folders['pretrain'], rotation=rotation, rotation_prob=1.0,
                   image_interpolation='nearest')
  batches = _take(ip.create_pretrain_iterator(config, process_index=0, process_count=1,
                                              with_ids=True), 3)
  not_dihedral = 0
  for batch in batches:
    base = batch['s1'][..., 0].astype(np.int64)
    season = batch['season']
    np.testing.assert_array_equal(batch['s1'][..., 1],
                                  np.broadcast_to((40 * season + 10)[:, None, None], base.shape))
    np.testing.assert_array_equal(batch['s2'][..., 0], batch['s1'][..., 0])
    np.testing.assert_array_equal(batch['labels'], (base + season[:, None, None]) % 9)
    np.testing.assert_array_equal(batch['clean_labels'], (base + season[:, None, None] + 1) % 9)
    for t in range(SEASONS):
      np.testing.assert_array_equal(batch['season_labels'][:, t], (base + t) % 9)
    np.testing.assert_array_equal(
        batch['season_labels'][np.arange(len(season)), season], batch['labels'])
    for i, location in enumerate(batch['location_id']):
      candidates = _dihedral_crops(_base(int(location)), CROP)
      not_dihedral += not any(np.array_equal(batch['s1'][i, ..., 0], c) for c in candidates)
  if rotation == 'rot90':
    assert not_dihedral == 0
  else:   # angles of exactly 0 or +-90 degrees have probability 0
    assert not_dihedral == 24
  assert len({int(s) for b in batches for s in b['season']}) > 1


def test_bilinear_rotation_keeps_constant_bands(folders):
  config = _config(folders['pretrain'], rotation='free', rotation_prob=1.0)
  batch = next(ip.create_pretrain_iterator(config, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['s2'][..., 5], 105)
  np.testing.assert_array_equal(batch['s1'][..., 1],
                                np.broadcast_to((40 * batch['season'] + 10)[:, None, None],
                                                batch['s1'].shape[:3]))


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


def test_same_seed_same_batches_whatever_the_parallelism(folders):
  config = _config(folders['pretrain'])
  serial = _config(folders['pretrain'], num_parallel_calls=1, prefetch=0)
  a = _take(ip.create_pretrain_iterator(config, process_index=0, process_count=1), 4)
  b = _take(ip.create_pretrain_iterator(serial, process_index=0, process_count=1), 4)
  _assert_batches_equal(a, b)
  c = _take(ip.create_pretrain_iterator(config, seed=7, process_index=0, process_count=1), 4)
  assert not np.array_equal(a[0]['s1'], c[0]['s1'])


@pytest.mark.parametrize('cache,steps', [(False, -1), (True, -1), (False, 5)])
def test_resume_equals_uninterrupted_run(folders, cache, steps):
  config = _config(folders['pretrain'], cache=cache)
  config.training.steps_per_epoch = steps   # 5: each host repeats its 12 examples in an epoch
  full = _take(ip.create_pretrain_iterator(config, process_index=1, process_count=2,
                                           with_ids=True), 7)
  for start in ((1, 3, 4) if steps == -1 and not cache else (4,)):
    resumed = _take(ip.create_pretrain_iterator(config, start_step=start, process_index=1,
                                                process_count=2, with_ids=True), 7 - start)
    _assert_batches_equal(full[start:], resumed)
  finite = list(ip.create_pretrain_iterator(config, start_step=2, num_steps=3, process_index=1,
                                            process_count=2, with_ids=True))
  _assert_batches_equal(full[2:5], finite)
  # A new epoch visits the examples in a new order.
  if steps == -1:
    epoch0 = np.concatenate([b['location_id'] for b in full[:3]])
    epoch1 = np.concatenate([b['location_id'] for b in full[3:6]])
    assert not np.array_equal(epoch0, epoch1)


def test_two_hosts_split_train_data(folders):
  config = _config(folders['pretrain'])
  for epoch in range(2):
    seen = []
    for host in range(2):
      batches = list(ip.create_pretrain_iterator(config, start_step=3 * epoch, num_steps=3,
                                                 process_index=host, process_count=2,
                                                 with_ids=True))
      assert all(b['s1'].shape[0] == 4 for b in batches)
      seen.append({int(i) for b in batches for i in b['location_id']})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(TRAIN_IDS)   # 4 shards of 6, 12 per host per epoch


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
        # Evaluation: centre crop, no flips or rotation.
        for i, location in enumerate(b['location_id']):
          off = (TILE - CROP) // 2
          np.testing.assert_array_equal(b['s1'][i, ..., 0],
                                        _base(int(location))[off:off + CROP, off:off + CROP])
    assert sorted(ids) == VAL_IDS
    assert len(num_batches) == 1
  # A second pass is the same (fixed order, fixed season per location).
  again = list(ip.create_pretrain_iterator(config, 'validation', process_index=0,
                                           process_count=1, with_ids=True))
  _assert_batches_equal(again, runs[1, 0])


def test_device_augmentation_gets_whole_tiles(folders):
  """augment_on='device': whole uint8 tiles of the season the host path draws too."""
  import jax   # pylint: disable=g-import-not-at-top
  from cromss_jax import augment   # pylint: disable=g-import-not-at-top
  device = _config(folders['pretrain'], augment_on='device')
  host = _config(folders['pretrain'])
  batches = _take(ip.create_pretrain_iterator(device, process_index=0, process_count=1,
                                              with_ids=True), 4)
  host_batches = _take(ip.create_pretrain_iterator(host, process_index=0, process_count=1,
                                                   with_ids=True), 4)
  expected = {'s1': (8, TILE, TILE, 2), 's2': (8, TILE, TILE, 13), 'labels': (8, TILE, TILE),
              'clean_labels': (8, TILE, TILE), 'season_labels': (8, SEASONS, TILE, TILE)}
  for batch, host_batch in zip(batches, host_batches):
    assert {k: batch[k].shape for k in expected} == expected
    assert all(batch[k].dtype == np.uint8 for k in expected)
    np.testing.assert_array_equal(batch['location_id'], host_batch['location_id'])
    np.testing.assert_array_equal(batch['season'], host_batch['season'])
    season = batch['season'][:, None, None]
    base = np.stack([_base(int(i)) for i in batch['location_id']]).astype(np.int64)
    np.testing.assert_array_equal(batch['s1'][..., 0], base)       # the tile as stored
    np.testing.assert_array_equal(batch['s1'][..., 1], np.broadcast_to(40 * season + 10,
                                                                       base.shape))
    np.testing.assert_array_equal(batch['s2'][..., 0], base)
    np.testing.assert_array_equal(batch['labels'], (base + season) % 9)
    np.testing.assert_array_equal(batch['clean_labels'], (base + season + 1) % 9)
    for t in range(SEASONS):
      np.testing.assert_array_equal(batch['season_labels'][:, t], (base + t) % 9)
  # Resume and evaluation as on the host path; evaluation is the same centre crop.
  _assert_batches_equal(batches[2:], _take(ip.create_pretrain_iterator(
      device, start_step=2, process_index=0, process_count=1, with_ids=True), 2))
  _assert_batches_equal(
      list(ip.create_pretrain_iterator(device, 'validation', process_index=0, process_count=1)),
      list(ip.create_pretrain_iterator(host, 'validation', process_index=0, process_count=1)))
  # What the train step makes of such a batch: crops whose labels still fit their images.
  aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=1.0,
                              image_interpolation='nearest')
  batch = {k: v for k, v in batches[0].items() if k != 'location_id'}
  out = jax.jit(lambda b: augment.augment_batch(b, jax.random.PRNGKey(0), aug))(batch)
  crop_base = np.asarray(out['s1'][..., 0]).astype(np.int64)
  assert crop_base.shape == (8, CROP, CROP)
  np.testing.assert_array_equal(out['labels'], (crop_base + batch['season'][:, None, None]) % 9)


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
