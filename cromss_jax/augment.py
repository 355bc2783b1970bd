"""The pretraining augmentation as pure JAX functions, run inside the compiled train step.

The pretraining input pipeline only reads one (location, season) record per sample and batches
whole tiles; the train step (tasks/pretrain.py) calls `augment_batch` before the forward pass and
the smoothing prior. The transforms are those of the transfer runs' host pipeline
(input_pipeline.py, docs/METHOD.md §2.3), in the same order and with the same conventions:

1. a random crop of `crop_size` out of the tile (offsets uniform, rows then columns);
2. a horizontal, then a vertical flip, each with p = 0.5 (`data.flip`);
3. with p = `data.rotation_prob`: 'rot90' a counter-clockwise quarter turn k in {1, 2, 3}
   (np.rot90 / tf.image.rot90), 'free' a rotation about the crop centre by an angle uniform in
   [-90, 90) degrees, sampling bilinear for images (or nearest, `data.image_interpolation`) and
   nearest for every label map, borders mirrored including the edge pixel (numpy 'symmetric').

All three are folded into one source index per output pixel (and four, with weights, for a
bilinear image), so each array is gathered once from the full tile. Images stay uint8 (the
bilinear result is rounded half to even and clipped, as on the host); `labels` and
`clean_labels` come out int32, `season_labels` keeps its dtype. The random draws are jax.random
ones, so a device run sees other crops and angles than a host run of the same seed (the same
distribution); they depend only on the key, i.e. on the seed and the step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from cromss_jax import config_validation

AUGMENT_KEYS = ('data.crop_size', 'data.flip', 'data.rotation', 'data.rotation_prob',
                'data.image_interpolation')
IMAGE_KEYS = ('s1', 's2')                                  # [H, W, C] uint8
MAP_KEYS = ('labels', 'clean_labels', 'season_labels')     # [H, W] or [T, H, W], nearest
_INT_LABELS = ('labels', 'clean_labels')
# Keeps the augmentation stream apart from any other use of the step's key.
_AUGMENT_SALT = 0x417567


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The augmentation settings of `config.data` (static: they shape the compiled program)."""
  crop_size: int
  flip: bool = True
  rotation: str = 'free'          # 'free' | 'rot90' | 'none'
  rotation_prob: float = 0.2
  image_interpolation: str = 'bilinear'   # of the free rotation; labels are always nearest

  @property
  def rotates(self) -> bool:
    return self.rotation != 'none' and self.rotation_prob > 0


def from_config(config: ml_collections.ConfigDict) -> AugmentConfig:
  """The settings of `config.data`, checked with the validator's rules."""
  config_validation.validate_keys(config, AUGMENT_KEYS)
  data = config.data
  return AugmentConfig(crop_size=int(data.crop_size), flip=bool(data.flip),
                       rotation=data.rotation, rotation_prob=float(data.rotation_prob),
                       image_interpolation=data.image_interpolation)


class Draws(NamedTuple):
  """One sample's random geometry (scalars; leading batch axis when vmapped)."""
  offset: jax.Array     # int32 [2]: crop origin (row, column) in the tile
  flip_h: jax.Array     # bool: reverse the columns
  flip_v: jax.Array     # bool: reverse the rows
  turns: jax.Array      # int32 in 0..3: counter-clockwise quarter turns ('rot90')
  rotate: jax.Array     # bool: apply the free rotation by `angle` ('free')
  angle: jax.Array      # float32 radians in [-pi/2, pi/2)


def draw(key: jax.Array, tile_size: int, aug: AugmentConfig) -> Draws:
  """The random geometry of one sample, from its own key."""
  keys = jax.random.split(key, 6)
  offset = jax.random.randint(keys[0], (2,), 0, tile_size - aug.crop_size + 1, jnp.int32)
  flips = [jnp.logical_and(aug.flip, jax.random.uniform(k) < 0.5) for k in keys[1:3]]
  rotate = jnp.logical_and(aug.rotates, jax.random.uniform(keys[3]) < aug.rotation_prob)
  turns = jnp.where(rotate & (aug.rotation == 'rot90'),
                    jax.random.randint(keys[4], (), 1, 4, jnp.int32), 0)
  free = rotate & (aug.rotation == 'free')
  angle = jnp.where(free, jax.random.uniform(keys[5], (), jnp.float32, -math.pi / 2,
                                             math.pi / 2), 0.0)
  return Draws(offset=offset, flip_h=flips[0], flip_v=flips[1], turns=turns, rotate=free,
               angle=angle)


def _reflect(index: jax.Array, size: int) -> jax.Array:
  """Mirrors integer indices into [0, size), the edge pixel repeated ("dcba|abcd")."""
  index = jnp.where(index < 0, -index - 1, index)
  index = jnp.where(index >= size, 2 * size - 1 - index, index)
  return jnp.clip(index, 0, size - 1)


def _rotation_sources(angle: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Float (x, y) of the input point each output pixel of a rotation about the centre reads."""
  centre = (size - 1) / 2.0
  offsets = jnp.arange(size, dtype=jnp.float32) - centre
  yy, xx = jnp.meshgrid(offsets, offsets, indexing='ij')
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return cos * xx - sin * yy + centre, sin * xx + cos * yy + centre


class _Sampling(NamedTuple):
  nearest: jax.Array                      # int32 [S*S] flat tile index of each output pixel
  corners: tuple[jax.Array, ...] | None   # 4 x int32 [S*S]: (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  weights: tuple[jax.Array, jax.Array] | None   # (fx, fy) float32 [S*S, 1]


def _sampling(draws: Draws, tile_size: int, aug: AugmentConfig) -> _Sampling:
  """Where each output pixel comes from in the tile: crop, flips and rotation composed."""
  size = aug.crop_size
  last = size - 1
  i, j = jnp.meshgrid(jnp.arange(size, dtype=jnp.int32), jnp.arange(size, dtype=jnp.int32),
                      indexing='ij')
  # Output pixel -> pixel of the flipped crop, first through the rotation.
  if aug.rotates and aug.rotation == 'rot90':
    rows = jnp.stack([i, j, last - i, last - j])[draws.turns]
    cols = jnp.stack([j, last - i, last - j, i])[draws.turns]
  else:
    rows, cols = i, j

  def to_tile(r: jax.Array, c: jax.Array) -> jax.Array:
    r = jnp.where(draws.flip_v, last - r, r) + draws.offset[0]
    c = jnp.where(draws.flip_h, last - c, c) + draws.offset[1]
    return (r * tile_size + c).reshape(-1)

  if not (aug.rotates and aug.rotation == 'free'):
    return _Sampling(to_tile(rows, cols), None, None)

  src_x, src_y = _rotation_sources(draws.angle, size)
  near_r = jnp.where(draws.rotate, _reflect(jnp.round(src_y).astype(jnp.int32), size), i)
  near_c = jnp.where(draws.rotate, _reflect(jnp.round(src_x).astype(jnp.int32), size), j)
  nearest = to_tile(near_r, near_c)
  if aug.image_interpolation == 'nearest':
    return _Sampling(nearest, None, None)
  x0, y0 = jnp.floor(src_x), jnp.floor(src_y)
  fx = jnp.where(draws.rotate, src_x - x0, 0.0).reshape(-1, 1)
  fy = jnp.where(draws.rotate, src_y - y0, 0.0).reshape(-1, 1)
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  ys = [jnp.where(draws.rotate, _reflect(y, size), i) for y in (y0, y0 + 1)]
  xs = [jnp.where(draws.rotate, _reflect(x, size), j) for x in (x0, x0 + 1)]
  corners = tuple(to_tile(y, x) for y in ys for x in xs)
  return _Sampling(nearest, corners, (fx, fy))


def _gather(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """jnp.take clamping instead of masking: `_sampling` only makes indices inside the tile."""
  return jnp.take(x, index, axis=axis, mode='clip')


def _sample_image(image: jax.Array, sampling: _Sampling, size: int) -> jax.Array:
  """uint8 [H, W, C] -> [S, S, C]: gathered whole pixels, bilinear when there are corners."""
  channels = image.shape[-1]
  pixels = image.reshape(-1, channels)
  if sampling.corners is None:
    return _gather(pixels, sampling.nearest, 0).reshape(size, size, channels)
  p00, p01, p10, p11 = (_gather(pixels, c, 0).astype(jnp.float32) for c in sampling.corners)
  fx, fy = sampling.weights
  top = p00 + fx * (p01 - p00)
  bottom = p10 + fx * (p11 - p10)
  out = jnp.clip(jnp.round(top + fy * (bottom - top)), 0, 255)
  return out.astype(image.dtype).reshape(size, size, channels)


def _sample_map(labels: jax.Array, sampling: _Sampling, size: int) -> jax.Array:
  """[..., H, W] (any dtype) -> [..., S, S], nearest."""
  lead = labels.shape[:-2]
  flat = labels.reshape(lead + (-1,))
  return _gather(flat, sampling.nearest, -1).reshape(lead + (size, size))


def transform_sample(sample: Mapping[str, jax.Array], draws: Draws,
                     aug: AugmentConfig) -> dict[str, jax.Array]:
  """One sample's images and label maps, all moved by the same geometry; other keys kept."""
  tile_size = sample['s1'].shape[0]
  if aug.crop_size > tile_size:
    raise config_validation.ConfigError(
        f'config.data.crop_size={aug.crop_size} is larger than the {tile_size}x{tile_size} '
        'tiles of the batch; use a crop <= the tile.')
  sampling = _sampling(draws, tile_size, aug)
  out = dict(sample)
  for key in IMAGE_KEYS:
    if key in sample:
      out[key] = _sample_image(sample[key], sampling, aug.crop_size)
  for key in MAP_KEYS:
    if key in sample:
      out[key] = _sample_map(sample[key], sampling, aug.crop_size)
      if key in _INT_LABELS:
        out[key] = out[key].astype(jnp.int32)
  return out


def augment_batch(batch: Mapping[str, Any], rng: jax.Array,
                  aug: AugmentConfig) -> dict[str, jax.Array]:
  """Augments a batch of whole tiles with one key per sample drawn from `rng`.

  Sample n's key is split(fold_in(rng, salt), batch)[n]: it depends on its position in the
  global batch, not on how the batch is sharded, so one and several devices or hosts agree.
  """
  tile_size = batch['s1'].shape[1]
  keys = jax.random.split(jax.random.fold_in(rng, _AUGMENT_SALT), batch['s1'].shape[0])
  draws = jax.vmap(lambda k: draw(k, tile_size, aug))(keys)
  geometric = {k: batch[k] for k in IMAGE_KEYS + MAP_KEYS if k in batch}
  out = dict(batch)
  out.update(jax.vmap(lambda s, d: transform_sample(s, d, aug))(geometric, draws))
  return out
