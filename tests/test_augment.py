"""cromss_jax.augment (the pretraining augmentation inside the train step) against NumPy.

Each transform is checked against an independent NumPy reference that applies the host
pipeline's steps one after another (crop, horizontal flip, vertical flip, np.rot90 or a float64
rotation about the centre with np.pad 'symmetric' borders), then the random draws are checked
for determinism and their rates. Tiles are 40 px, crops 32 px: a few seconds on 2 cores.
"""
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
import tensorflow as tf

from configs import pretrain as pretrain_config
from cromss_jax import augment
from cromss_jax import input_pipeline as ip
from cromss_jax.config_validation import ConfigError
from cromss_jax.tasks import pretrain

TILE, CROP, SEASONS, BANDS = 40, 32, 4, 5


def _sample(seed: int) -> dict[str, np.ndarray]:
  """Random uint8 images and label maps of one tile (no structure: any misplacement shows)."""
  rng = np.random.default_rng(seed)
  return {
      's1': rng.integers(0, 256, (TILE, TILE, 2), dtype=np.uint8),
      's2': rng.integers(0, 256, (TILE, TILE, BANDS), dtype=np.uint8),
      'labels': rng.integers(0, 9, (TILE, TILE), dtype=np.uint8),
      'clean_labels': rng.integers(0, 9, (TILE, TILE), dtype=np.uint8),
      'season_labels': rng.integers(0, 9, (SEASONS, TILE, TILE), dtype=np.uint8),
      'season': np.int32(seed % SEASONS),
  }


def _draws(offset=(0, 0), flip_h=False, flip_v=False, turns=0, angle=None) -> augment.Draws:
  return augment.Draws(offset=jnp.asarray(offset, jnp.int32), flip_h=jnp.asarray(flip_h),
                       flip_v=jnp.asarray(flip_v), turns=jnp.asarray(turns, jnp.int32),
                       rotate=jnp.asarray(angle is not None),
                       angle=jnp.asarray(0.0 if angle is None else angle, jnp.float32))


def _transform(sample, draws, aug):
  out = jax.jit(lambda s, d: augment.transform_sample(s, d, aug))(sample, draws)
  return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# The NumPy reference: the host's steps one after another, on [H, W, C] images and [L, H, W] maps
# ------------------------------------------------------------------------------------------------
def _rotation_sources(angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
  centre = (size - 1) / 2.0
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - centre
  c, s = math.cos(angle), math.sin(angle)
  return c * xx - s * yy + centre, s * xx + c * yy + centre


def _ref_rotate(image: np.ndarray, angle: float, bilinear: bool) -> np.ndarray:
  """[S, S, C] rotated about the centre; borders from np.pad(mode='symmetric')."""
  size, pad = image.shape[0], image.shape[0]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode='symmetric').astype(np.float64)
  sx, sy = _rotation_sources(angle, size)
  if not bilinear:
    return padded[np.round(sy).astype(int) + pad, np.round(sx).astype(int) + pad].astype(
        image.dtype)
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  at = lambda y, x: padded[y + pad, x + pad]
  top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
  bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
  return np.clip(np.round(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def _ambiguous(angle: float, size: int, tol: float = 1e-3) -> np.ndarray:
  """Pixels whose nearest source lies within `tol` of a rounding boundary (float32 vs 64)."""
  sx, sy = _rotation_sources(angle, size)
  return ((np.abs(sx - np.floor(sx) - 0.5) < tol) | (np.abs(sy - np.floor(sy) - 0.5) < tol))


def _reference(sample, *, offset=(0, 0), flip_h=False, flip_v=False, turns=0, angle=None,
               crop=CROP, bilinear=True) -> dict[str, np.ndarray]:
  r, c = offset
  images = {k: sample[k][r:r + crop, c:c + crop] for k in ('s1', 's2')}
  maps = {'labels': sample['labels'][..., None], 'clean_labels': sample['clean_labels'][..., None],
          'season_labels': np.moveaxis(sample['season_labels'], 0, -1)}   # all [H, W, L]
  maps = {k: v[r:r + crop, c:c + crop] for k, v in maps.items()}
  every = {**images, **maps}
  if flip_h:
    every = {k: v[:, ::-1] for k, v in every.items()}
  if flip_v:
    every = {k: v[::-1] for k, v in every.items()}
  if turns:
    every = {k: np.rot90(v, turns, axes=(0, 1)) for k, v in every.items()}
  if angle is not None:
    every = {k: _ref_rotate(v, angle, bilinear and k in images) for k, v in every.items()}
  out = {k: every[k] for k in images}
  out['labels'] = every['labels'][..., 0].astype(np.int32)
  out['clean_labels'] = every['clean_labels'][..., 0].astype(np.int32)
  out['season_labels'] = np.moveaxis(every['season_labels'], -1, 0)
  return out


def _assert_equal(out, ref, mask=None):
  for key in ('s1', 's2', 'labels', 'clean_labels', 'season_labels'):
    a, b = out[key], ref[key]
    assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
    if mask is None:
      np.testing.assert_array_equal(a, b, err_msg=key)
    else:
      m = {'s1': mask[..., None], 's2': mask[..., None], 'season_labels': mask[None]}.get(
          key, mask)
      np.testing.assert_array_equal(np.where(m, 0, a), np.where(m, 0, b), err_msg=key)


# ------------------------------------------------------------------------------------------------
# Each transform against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('offset,flip_h,flip_v', [
    ((0, 0), False, False), ((8, 0), True, False), ((0, 8), False, True), ((3, 5), True, True)])
def test_crop_and_flips_are_exact(offset, flip_h, flip_v):
  sample = _sample(1)
  aug = augment.AugmentConfig(crop_size=CROP, rotation='none')
  out = _transform(sample, _draws(offset, flip_h, flip_v), aug)
  _assert_equal(out, _reference(sample, offset=offset, flip_h=flip_h, flip_v=flip_v))
  assert out['season'] == sample['season']   # keys that are not maps pass through


@pytest.mark.parametrize('turns', [0, 1, 2, 3])
def test_quarter_turns_are_exact(turns):
  sample = _sample(2)
  aug = augment.AugmentConfig(crop_size=CROP, rotation='rot90', rotation_prob=1.0)
  out = _transform(sample, _draws((2, 7), True, False, turns), aug)
  _assert_equal(out, _reference(sample, offset=(2, 7), flip_h=True, turns=turns))


@pytest.mark.parametrize('angle', [0.3, -1.2, 1.55, -math.pi / 2])
@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest'])
def test_free_rotation_matches_reference_with_mirrored_borders(angle, interpolation):
  sample = _sample(3)
  aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=1.0,
                              image_interpolation=interpolation)
  draws = _draws((4, 1), False, True, angle=angle)
  out = _transform(sample, draws, aug)
  ref = _reference(sample, offset=(4, 1), flip_v=True, angle=angle,
                   bilinear=interpolation == 'bilinear')
  ambiguous = _ambiguous(angle, CROP)
  assert ambiguous.mean() < 0.1
  if interpolation == 'bilinear':
    # float32 here, float64 there: the rounded values may differ by one, nowhere more.
    for key in ('s1', 's2'):
      diff = np.abs(out[key].astype(int) - ref[key].astype(int))
      assert diff.max() <= 1 and diff.mean() < 0.01, key
    out = {**out, 's1': ref['s1'], 's2': ref['s2']}
  _assert_equal(out, ref, mask=ambiguous)
  # The rotated-in corners are really filled from the mirrored borders (not a constant).
  assert len(np.unique(out['labels'][:3, :3])) > 1 or len(np.unique(out['labels'][-3:, -3:])) > 1


def test_a_sample_not_rotated_is_untouched_in_free_mode():
  sample = _sample(4)
  aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=0.5)
  out = _transform(sample, _draws((5, 5), True, True), aug)   # rotate=False
  _assert_equal(out, _reference(sample, offset=(5, 5), flip_h=True, flip_v=True))


def test_agrees_with_the_host_rotation_functions():
  """Same angle, same tile: the device rotation equals input_pipeline's tf functions."""
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)
  labels = rng.integers(0, 9, (CROP, CROP), dtype=np.uint8)
  sample = {'s1': image, 'labels': labels}
  for angle in (0.7, -0.4):
    aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=1.0)
    out = _transform(sample, _draws(angle=angle), aug)
    host = ip._rotate_bilinear(tf.constant(image), tf.constant(angle, tf.float32)).numpy()
    assert np.abs(out['s1'].astype(int) - host.astype(int)).max() <= 1
    host_labels = ip._rotate_nearest(tf.constant(labels[..., None]),
                                     tf.constant(angle, tf.float32)).numpy()[..., 0]
    ambiguous = _ambiguous(angle, CROP)
    np.testing.assert_array_equal(np.where(ambiguous, 0, out['labels']),
                                  np.where(ambiguous, 0, host_labels))
  aug = augment.AugmentConfig(crop_size=CROP, rotation='rot90', rotation_prob=1.0)
  for turns in (1, 2, 3):
    out = _transform(sample, _draws(turns=turns), aug)
    np.testing.assert_array_equal(out['s1'], tf.image.rot90(image, turns).numpy())


# ------------------------------------------------------------------------------------------------
# The batch: one geometry for images and every label map, keys, determinism, rates
# ------------------------------------------------------------------------------------------------
def _structured_batch(n: int) -> dict[str, np.ndarray]:
  """Labels that are functions of the image at the same pixel, as the input tests build."""
  rng = np.random.default_rng(6)
  base = rng.integers(0, 256, (n, TILE, TILE)).astype(np.uint8)
  season = (np.arange(n) % SEASONS).astype(np.int32)
  stack = ((base[:, None].astype(int) + np.arange(SEASONS)[None, :, None, None]) % 9)
  return {'s1': np.stack([base, base // 2], -1), 's2': np.repeat(base[..., None], BANDS, -1),
          'labels': stack[np.arange(n), season].astype(np.uint8),
          'clean_labels': ((base.astype(int) + 1) % 9).astype(np.uint8),
          'season_labels': stack.astype(np.uint8), 'season': season}


@pytest.mark.parametrize('rotation', ['free', 'rot90'])
def test_images_and_all_label_maps_move_together(rotation):
  batch = _structured_batch(16)
  aug = augment.AugmentConfig(crop_size=CROP, rotation=rotation, rotation_prob=0.7,
                              image_interpolation='nearest')
  out = jax.jit(lambda b, k: augment.augment_batch(b, k, aug))(batch, jax.random.PRNGKey(3))
  out = {k: np.asarray(v) for k, v in out.items()}
  base = out['s1'][..., 0].astype(int)
  assert out['s1'].shape == (16, CROP, CROP, 2) and out['s1'].dtype == np.uint8
  np.testing.assert_array_equal(out['s1'][..., 1], base // 2)
  np.testing.assert_array_equal(out['s2'], np.repeat(out['s1'][..., :1], BANDS, -1))
  season = out['season']
  np.testing.assert_array_equal(out['labels'], (base + season[:, None, None]) % 9)
  np.testing.assert_array_equal(out['clean_labels'], (base + 1) % 9)
  assert out['labels'].dtype == out['clean_labels'].dtype == np.int32
  assert out['season_labels'].dtype == np.uint8
  for t in range(SEASONS):
    np.testing.assert_array_equal(out['season_labels'][:, t], (base + t) % 9)
  # Not all samples got the same geometry.
  assert len({out['s1'][i, 0, 0, 0] for i in range(16)}) > 1


@pytest.mark.slow
def test_keys_per_sample_and_determinism():
  batch = _structured_batch(6)
  aug = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=0.5)
  run = jax.jit(lambda b, k: augment.augment_batch(b, k, aug))
  key = jax.random.fold_in(jax.random.PRNGKey(42), 7)   # as the train step: (state.rng, step)
  a, again = run(batch, key), run(batch, key)
  for k in a:
    np.testing.assert_array_equal(a[k], again[k])
  other = run(batch, jax.random.fold_in(jax.random.PRNGKey(42), 8))
  assert not np.array_equal(a['s1'], other['s1'])
  # Sample n uses key n of the split: its result does not depend on the rest of the batch.
  keys = jax.random.split(jax.random.fold_in(key, augment._AUGMENT_SALT), 6)
  for n in (0, 5):
    sample = {k: v[n] for k, v in batch.items()}
    single = _transform(sample, augment.draw(keys[n], TILE, aug), aug)
    for k in single:
      np.testing.assert_array_equal(a[k][n], single[k], err_msg=k)


@pytest.mark.slow
def test_draw_rates_and_ranges():
  aug = augment.AugmentConfig(crop_size=CROP, rotation='rot90', rotation_prob=0.2)
  n = 4000
  d = jax.vmap(lambda k: augment.draw(k, TILE, aug))(jax.random.split(jax.random.PRNGKey(0), n))
  d = jax.tree.map(np.asarray, d)
  # 3 sigma of a binomial(4000, p) share is < 0.024.
  assert abs(d.flip_h.mean() - 0.5) < 0.03 and abs(d.flip_v.mean() - 0.5) < 0.03
  assert abs(np.mean(d.flip_h == d.flip_v) - 0.5) < 0.03       # independent of each other
  rotated = d.turns > 0
  assert abs(rotated.mean() - 0.2) < 0.025
  counts = np.bincount(d.turns[rotated], minlength=4)
  assert counts[0] == 0 and all(abs(c / rotated.sum() - 1 / 3) < 0.06 for c in counts[1:])
  assert not d.rotate.any() and not d.angle.any()
  assert d.offset.min() == 0 and d.offset.max() == TILE - CROP
  assert abs(d.offset.mean() - (TILE - CROP) / 2) < 0.3

  free = augment.AugmentConfig(crop_size=CROP, rotation='free', rotation_prob=0.3)
  d = jax.vmap(lambda k: augment.draw(k, TILE, free))(jax.random.split(jax.random.PRNGKey(1), n))
  d = jax.tree.map(np.asarray, d)
  assert abs(d.rotate.mean() - 0.3) < 0.03 and not d.turns.any()
  angles = d.angle[d.rotate]
  assert angles.min() >= -math.pi / 2 and angles.max() < math.pi / 2
  assert abs(angles.mean()) < 0.1 and abs(np.mean(np.abs(angles)) - math.pi / 4) < 0.1
  assert not d.angle[~d.rotate].any()

  off = augment.AugmentConfig(crop_size=TILE, flip=False, rotation='none')
  d = jax.vmap(lambda k: augment.draw(k, TILE, off))(jax.random.split(jax.random.PRNGKey(2), 64))
  assert not np.asarray(d.flip_h).any() and not np.asarray(d.rotate).any()
  assert not np.asarray(d.offset).any() and not np.asarray(d.turns).any()


# ------------------------------------------------------------------------------------------------
# Config and the train step's loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_config_key_and_errors():
  config = pretrain_config.get_config()
  assert pretrain.device_augment(config) == augment.AugmentConfig(
      crop_size=256, flip=True, rotation='free', rotation_prob=0.2,
      image_interpolation='bilinear')
  config.data.rotation = 'spin'
  with pytest.raises(ConfigError, match=r'config\.data\.rotation'):
    pretrain.device_augment(config)
  with pytest.raises(ConfigError, match=r'crop_size=64 is larger than the 40x40'):
    augment.augment_batch(_structured_batch(2), jax.random.PRNGKey(0),
                          augment.AugmentConfig(crop_size=64))


class _PixelModel(nn.Module):
  """Two 1x1 convolutions: the cheapest stand-in with the pretraining model's interface."""
  num_classes: int = 9

  @nn.compact
  def __call__(self, s1, s2, train: bool):
    del train
    return (nn.Conv(self.num_classes, (1, 1), name='c1')(s1),
            nn.Conv(self.num_classes, (1, 1), name='c2')(s2))


@pytest.mark.slow
def test_loss_augments_whole_tiles_from_the_step_key():
  """The loss with `augment` on whole tiles == the plain loss on the batch augmented by that key."""
  config = pretrain_config.get_config('tiny')
  config.data.crop_size = CROP
  obj_cfg = config.objective
  aug = pretrain.device_augment(config)
  model = _PixelModel()
  batch = _structured_batch(2)
  params = model.init(jax.random.PRNGKey(0), batch['s1'][:, :CROP, :CROP] / 255.0,
                      batch['s2'][:, :CROP, :CROP] / 255.0, train=False)['params']
  augmented = pretrain.pretrain_loss_fn(model, obj_cfg, aug)
  plain = pretrain.pretrain_loss_fn(model, obj_cfg)
  rng = jax.random.fold_in(jax.random.PRNGKey(1), 3)
  epoch = jnp.float32(0)

  @jax.jit
  def losses(batch, rng):
    loss, _ = augmented(params, {}, batch, epoch, rng)
    expected, _ = plain(params, {}, augment.augment_batch(batch, rng, aug), epoch, rng)
    return loss, expected

  loss, expected = losses(batch, rng)
  assert np.isfinite(loss) and float(loss) == float(expected)
  other, _ = losses(batch, jax.random.fold_in(rng, 1))
  assert float(other) != float(loss)   # another step, another augmentation

  # The learner of the config takes whole tiles (traced only, nothing compiled).
  config.data.s2_bands = 3
  learner = pretrain.create_pretrain_learner(config)
  variables = jax.eval_shape(lambda: learner.apply_init(learner.model, jax.random.PRNGKey(0),
                                                        learner.init_batch(), None))
  tiles = dict(batch, s2=batch['s2'][..., :3])
  loss_shape = jax.eval_shape(learner.loss_fn, variables['params'], variables['batch_stats'],
                              tiles, epoch, rng)[0]
  assert loss_shape.shape == ()
  unaugmented = pretrain.pretrain_loss_fn(learner.model, config.objective)
  with pytest.raises(Exception):   # 40 px tiles do not fit the U-Net without the crop
    jax.eval_shape(unaugmented, variables['params'], variables['batch_stats'], tiles, epoch, rng)
