"""Input pipelines: pretraining records (SSL4EO-S12@NoL) with grain, downstream sets with tf.data.

Reads the TFDS datasets written by `data_prep` (record format: docs/DESIGN.md) and yields
host-local numpy batches (the per-host share of the global batch; `sharding.py` assembles global
arrays). Images stay uint8; the train step divides by 255 and computes the smoothing prior from
`season_labels` on the device (docs/METHOD.md §4.12), so neither happens here.

Pretraining (`create_pretrain_iterator`): the records are array_record, one per (location,
season), so a sample reads only the season it uses (plus the location's label maps for the
prior). A training batch is whole uint8 tiles; the compiled train step crops, flips and rotates
them (cromss_jax/augment.py). Each epoch visits every location once (in a random order, one
random season each); `data.num_workers` processes read ahead (grain).

Downstream (`create_downstream_iterator`): TFRecords of patches read with tf.data and augmented
here (random crop, flips, `config.data.rotation`, docs/METHOD.md §2.3).

Guarantees, for both:
* Determinism: every random choice is drawn from stateless RNGs keyed by (config.seed, epoch,
  ...) and every parallel stage keeps its order, so a seed gives the same batches whatever the
  parallelism (number of workers or parallel calls).
* Resume: a train iterator started at global step k yields exactly batches k, k+1, ... of an
  uninterrupted run.
* Host sharding: each process reads a disjoint part of every epoch; every host yields the same
  number of batches. (Pretraining: host h takes slice h of each global batch, so the global batch
  does not depend on the number of hosts.)
* Evaluation iterators cover the split exactly once across hosts; the last batches are padded
  with repeated examples and `valid` (bool [b]) marks the real ones.
* The downstream sequence also depends on the shuffle buffer and `config.data.cache` (which keeps
  each host's files fixed instead of redrawing them every epoch, so the in-memory cache of
  serialized records can be reused).

Downstream augmentation (training only): random crop (centre crop for evaluation), independent
h/v flips (p=0.5), and `config.data.rotation`: 'free' (p=rotation_prob, angle uniform in
[-90, 90] degrees, reflect padding, bilinear for images and nearest for labels, like
albumentations' Rotate), 'rot90' (p=rotation_prob, a random non-zero multiple of 90 degrees) or
'none'. `config.data.image_interpolation` ('bilinear' or 'nearest') sets the image resampling of
the free rotation. Borders are mirrored including the edge pixel ("dcba|abcd", numpy
'symmetric'); albumentations' default mirrors without it ("dcb|abcd"); only the rotated-in
corners differ.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

from absl import flags
from absl import logging
from etils import epath
from etils import epy
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

with epy.lazy_imports():  # On first use (tf.data, downstream only): ~9 s of CPU to import.
  import tensorflow as tf

from cromss_jax import config_validation
from cromss_jax import constants
from cromss_jax import pretrain_reader

Batch = dict[str, np.ndarray]

# Salts that keep the independent random streams of one element apart.
_FILES_SALT, _SHUFFLE_SALT, _EVAL_SALT = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _DatasetKind:
  """What distinguishes the pretraining records from the downstream ones."""
  name: str
  command: str
  label_key: str
  id_key: str
  seasonal: bool
  file_format: str


_PRETRAIN = _DatasetKind(name='ssl4eo_s12_nol', command='python -m data_prep.ssl4eo',
                         label_key='season_labels', id_key='location_id', seasonal=True,
                         file_format='array_record')
_DOWNSTREAM = _DatasetKind(name='dfc2020', command='python -m data_prep.dfc2020',
                           label_key='label', id_key='patch_id', seasonal=False,
                           file_format='tfrecord')


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
  """Sizes the training loop needs before it sees a batch.

  `eval_steps` is the number of (padded) evaluation batches every host yields; it is the same on
  all hosts so that collective evaluation steps line up.
  """
  dataset_dir: str
  train_split: str
  eval_split: str
  num_train_examples: int
  num_eval_examples: int
  steps_per_epoch: int
  eval_steps: int
  global_batch: int
  per_host_batch: int
  process_count: int
  tile_size: int
  crop_size: int
  s1_channels: int
  s2_channels: int
  num_seasons: int          # 0 for single-date (downstream) data
  has_clean_labels: bool
  num_classes: int | None = None   # label classes of the records (None: unknown dataset)


# Label classes (0..n-1, 255 = ignore) that each data_prep converter writes, by TFDS name.
NUM_CLASSES_BY_DATASET = {
    'ssl4eo_s12_nol': len(constants.DW_CLASSES),   # data_prep.ssl4eo: Dynamic World
    'dfc2020': len(constants.DFC_DW8_CLASSES),     # data_prep.dfc2020: DW-ordered DFC classes
    'ssl4eo_s12_dw': len(constants.DW_CLASSES),    # data_prep.ssl4eo_dwosm --labels dw
    'ssl4eo_s12_osm': 13,                          # data_prep.ssl4eo_dwosm --labels osm
}


@dataclasses.dataclass(frozen=True)
class _Augment:
  crop_size: int
  flip: bool
  rotation: str
  rotation_prob: float
  image_interpolation: str


@dataclasses.dataclass(frozen=True)
class _Source:
  """A resolved dataset: the builder plus what the element functions need."""
  kind: _DatasetKind
  builder: Any
  dataset_dir: str
  tile_size: int
  band_indices: tuple[int, ...] | None   # None: take the stored bands as they are
  s1_channels: int
  s2_channels: int
  num_seasons: int
  has_clean_labels: bool


# ------------------------------------------------------------------------------------------------
# Dataset discovery and checks.


def _find_dataset_dir(dataset_dir: str, kind: _DatasetKind) -> str:
  """Accepts the version folder itself or a parent holding `<version>/` or `<name>/<version>/`."""
  if not dataset_dir:
    raise FileNotFoundError(
        f'config.data.dataset_dir is not set. Point it at the {kind.name} TFDS folder written '
        f'by `{kind.command}` (e.g. --config.data.dataset_dir=/data/{kind.name}/1.0.0).')
  path = os.path.expanduser(dataset_dir)
  folder = epath.Path(path)   # local or gs://, without importing TensorFlow
  if not folder.is_dir():
    raise FileNotFoundError(
        f'Dataset folder {path!r} (config.data.dataset_dir) does not exist. Create it with '
        f'`{kind.command}` or point config.data.dataset_dir at the folder it wrote.')
  if (folder / 'dataset_info.json').exists():
    return path
  candidates = []
  for pattern in ('*/dataset_info.json', '*/*/dataset_info.json'):
    candidates += [os.fspath(p) for p in folder.glob(pattern)]
  if not candidates:
    raise FileNotFoundError(
        f'{path!r} (config.data.dataset_dir) holds no dataset_info.json (nor does any version '
        f'folder under it); it is not a TFDS folder. Create one with `{kind.command}`.')

  def version_key(p: str) -> tuple[Any, ...]:
    version = os.path.basename(os.path.dirname(p))
    parts = version.split('.')
    return tuple(int(x) for x in parts) if all(x.isdigit() for x in parts) else (-1, version)

  chosen = os.path.dirname(max(candidates, key=version_key))
  logging.info('Using TFDS folder %s (found under %s).', chosen, path)
  return chosen


def _load_source(config: ml_collections.ConfigDict, kind: _DatasetKind) -> _Source:
  dataset_dir = _find_dataset_dir(config.data.dataset_dir, kind)
  builder = tfds.builder_from_directory(dataset_dir)
  features = builder.info.features
  required = ('s1', 's2', kind.label_key) + (('location_id', 'season') if kind.seasonal else ())
  missing = [k for k in required if k not in features]
  if missing:
    raise ValueError(
        f'{dataset_dir} lacks the features {missing} of a {kind.name}-style dataset (it has '
        f'{sorted(features.keys())}); was it written by the current `{kind.command}`? '
        'Converting again with the same command writes the current layout.')
  file_format = str(builder.info.file_format.value if builder.info.file_format else 'tfrecord')
  if file_format != kind.file_format:
    raise ValueError(f'{dataset_dir} is stored as {file_format}; {kind.name}-style data must be '
                     f'{kind.file_format} (convert it with `{kind.command}`).')

  s1_shape = tuple(features['s1'].shape)
  s2_shape = tuple(features['s2'].shape)
  label_shape = tuple(features[kind.label_key].shape)
  # Both kinds store one image per record: [H,W,C]; pretraining adds all seasons' labels [T,H,W].
  expected_labels = s2_shape[:-1] if not kind.seasonal else label_shape[:1] + s2_shape[:-1]
  if len(s2_shape) != 3 or s1_shape[:-1] != s2_shape[:-1] or label_shape != expected_labels:
    raise ValueError(f'{dataset_dir}: unexpected shapes s1 {s1_shape}, s2 {s2_shape}, '
                     f'{kind.label_key} {label_shape} (see docs/DESIGN.md).')
  height, width = s2_shape[-3], s2_shape[-2]
  if height != width:
    raise ValueError(f'{dataset_dir}: tiles must be square, got {height}x{width}.')
  tile_size = height
  config_tile = config.data.tile_size
  if config_tile != tile_size:
    raise config_validation.ConfigError(
        f'config.data.tile_size={config_tile} but {dataset_dir} stores '
        f'{tile_size}x{tile_size} tiles; set --config.data.tile_size={tile_size}.')
  crop = config.data.crop_size
  if crop > tile_size:
    raise config_validation.ConfigError(
        f'config.data.crop_size={crop} is larger than the {tile_size}x{tile_size} tiles in '
        f'{dataset_dir}; use a crop <= {tile_size}.')

  config_validation.validate_keys(config, ('data.s2_bands',))
  s2_bands = config.data.s2_bands
  stored_bands = s2_shape[-1]
  if stored_bands == len(constants.S2_BANDS):
    band_indices = constants.S2_BAND_SUBSETS[s2_bands]
  elif stored_bands == s2_bands:
    band_indices = None
    logging.warning('%s stores %d S2 bands; taking them as the config.data.s2_bands=%d subset.',
                    dataset_dir, stored_bands, s2_bands)
  else:
    raise config_validation.ConfigError(
        f'config.data.s2_bands={s2_bands} needs the {len(constants.S2_BANDS)}-band records, but '
        f'{dataset_dir} stores {stored_bands} S2 bands; rewrite it with `{kind.command}` or '
        f'set --config.data.s2_bands={stored_bands}.')
  return _Source(
      kind=kind, builder=builder, dataset_dir=dataset_dir, tile_size=tile_size,
      band_indices=band_indices, s1_channels=s1_shape[-1], s2_channels=s2_bands,
      num_seasons=label_shape[0] if kind.seasonal else 0,
      has_clean_labels=kind.seasonal and 'clean_labels' in features)


def _split_files(source: _Source, split: str) -> tuple[list[str], list[int]]:
  """The split's shard files and their example counts, empty shards left out."""
  splits = source.builder.info.splits
  if split not in splits:
    raise ValueError(f'{source.dataset_dir} has no split {split!r}; it has {sorted(splits)}.')
  info = splits[split]
  pairs = [(os.fspath(p), int(n)) for p, n in zip(info.filepaths, info.shard_lengths) if n > 0]
  if not pairs:
    raise ValueError(f'Split {split!r} of {source.dataset_dir} is empty.')
  return [p for p, _ in pairs], [n for _, n in pairs]


def _resolve_hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only for the defaults)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count}).')
  return process_index, process_count


def _per_host_batch(config: ml_collections.ConfigDict, process_count: int) -> int:
  global_batch = config.training.global_batch_size
  if global_batch % process_count:
    raise config_validation.ConfigError(
        f'config.training.global_batch_size={global_batch} is not divisible by the '
        f'{process_count} processes; pick a multiple of {process_count}.')
  return global_batch // process_count


def _host_counts(lengths: list[int], process_count: int) -> tuple[bool, list[int]]:
  """(shard by files?, examples per host) for the fixed (unpermuted) file order."""
  if len(lengths) >= process_count:
    return True, [sum(lengths[h::process_count]) for h in range(process_count)]
  total = sum(lengths)
  return False, [len(range(h, total, process_count)) for h in range(process_count)]


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """config.training.steps_per_epoch if > 0, else full global batches in one pass."""
  configured = config.training.steps_per_epoch
  if configured > 0:
    return int(configured)
  steps = num_train_examples // config.training.global_batch_size
  if steps < 1:
    raise ValueError(f'The training split has {num_train_examples} examples, fewer than one '
                     f'global batch (config.training.global_batch_size='
                     f'{config.training.global_batch_size}); lower the batch size or set '
                     'config.training.steps_per_epoch.')
  return steps


def _num_locations(source: _Source, split: str) -> int:
  """Locations of a pretraining split: its records come in runs of one per season."""
  records = sum(_split_files(source, split)[1])
  if records % source.num_seasons:
    raise ValueError(f'Split {split!r} of {source.dataset_dir} holds {records} records, not a '
                     f'multiple of its {source.num_seasons} seasons; convert it again with '
                     f'`{source.kind.command}`.')
  return records // source.num_seasons


def _split_sizes(source: _Source, split: str, process_count: int) -> tuple[int, list[int]]:
  """(samples in the split, samples per host of an evaluation pass over it).

  A pretraining sample is a location (one of its seasons is drawn), a downstream one a patch.
  """
  if source.kind.seasonal:
    total = _num_locations(source, split)
    return total, [len(range(h, total, process_count)) for h in range(process_count)]
  lengths = _split_files(source, split)[1]
  return sum(lengths), _host_counts(lengths, process_count)[1]


def _info(config: ml_collections.ConfigDict, source: _Source, train_split: str,
          eval_split: str, process_count: int) -> PipelineInfo:
  phb = _per_host_batch(config, process_count)
  num_train, _ = _split_sizes(source, train_split, process_count)
  num_eval, eval_steps = 0, 0
  if eval_split in source.builder.info.splits:
    num_eval, counts = _split_sizes(source, eval_split, process_count)
    eval_steps = max(1, math.ceil(max(counts) / phb))
  return PipelineInfo(
      dataset_dir=source.dataset_dir, train_split=train_split, eval_split=eval_split,
      num_train_examples=num_train, num_eval_examples=num_eval,
      steps_per_epoch=steps_per_epoch(config, num_train), eval_steps=eval_steps,
      global_batch=config.training.global_batch_size, per_host_batch=phb,
      process_count=process_count, tile_size=source.tile_size,
      crop_size=config.data.crop_size, s1_channels=source.s1_channels,
      s2_channels=source.s2_channels, num_seasons=source.num_seasons,
      has_clean_labels=source.has_clean_labels,
      # Pretraining records always hold Dynamic World labels (the converter checks 0..8).
      num_classes=NUM_CLASSES_BY_DATASET.get(
          source.builder.info.name, len(constants.DW_CLASSES) if source.kind.seasonal else None))


def pretrain_info(config: ml_collections.ConfigDict, *, process_count: int | None = None,
                  train_split: str = 'train', eval_split: str = 'validation') -> PipelineInfo:
  """Sizes of the pretraining data under `config` (reads only the dataset metadata)."""
  _, process_count = _resolve_hosts(0, process_count)
  return _info(config, _load_source(config, _PRETRAIN), train_split, eval_split, process_count)


def downstream_info(config: ml_collections.ConfigDict, *, process_count: int | None = None,
                    train_split: str = 'validation', eval_split: str = 'test') -> PipelineInfo:
  """Sizes of a DFC2020-style dataset (train on the small 'validation' split by default)."""
  _, process_count = _resolve_hosts(0, process_count)
  return _info(config, _load_source(config, _DOWNSTREAM), train_split, eval_split,
               process_count)


# ------------------------------------------------------------------------------------------------
# Per-element geometry: every transform is applied identically to images and label maps.


_AUGMENT_KEYS = ('data.flip', 'data.rotation', 'data.rotation_prob', 'data.image_interpolation')


def _augment_config(config: ml_collections.ConfigDict) -> _Augment:
  config_validation.validate_keys(config, _AUGMENT_KEYS)   # the validator's rules, also here
  data = config.data
  return _Augment(crop_size=data.crop_size, flip=data.flip, rotation=data.rotation,
                  rotation_prob=float(data.rotation_prob),
                  image_interpolation=data.image_interpolation)


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
  """Mirrors indices into [0, size) including the edge pixel ("dcba|abcd", numpy 'symmetric')."""
  index = tf.where(index < 0, -index - 1, index)
  index = tf.where(index >= size, 2 * size - 1 - index, index)
  return tf.clip_by_value(index, 0, size - 1)   # only reached by angles beyond +-90 degrees


def _rotation_sources(angle: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Input (x, y) coordinates, float [size, size], of each output pixel of a rotation about
  the image centre (pixel centres at integer coordinates)."""
  centre = (size - 1) / 2.0
  offsets = tf.range(size, dtype=tf.float32) - centre
  yy, xx = tf.meshgrid(offsets, offsets, indexing='ij')
  cos, sin = tf.cos(angle), tf.sin(angle)
  return cos * xx - sin * yy + centre, sin * xx + cos * yy + centre


def _rotate_nearest(x: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
  """Rotates [S,S,C] (any dtype) with nearest-neighbour sampling and mirrored borders."""
  size, channels = x.shape[0], x.shape[-1]
  src_x, src_y = _rotation_sources(angle, size)
  col = _reflect(tf.cast(tf.round(src_x), tf.int32), size)
  row = _reflect(tf.cast(tf.round(src_y), tf.int32), size)
  return tf.gather(tf.reshape(x, [size * size, channels]), row * size + col)


def _rotate_bilinear(x: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
  """Rotates uint8 [S,S,C] with bilinear sampling and mirrored borders, rounding to uint8.

  Gathering whole pixels (all channels) at the four neighbours is much faster on CPU
  than tf.raw_ops.ImageProjectiveTransformV3, whose REFLECT mode also blends the fill value into
  the outermost half pixel.
  """
  size, channels = x.shape[0], x.shape[-1]
  src_x, src_y = _rotation_sources(angle, size)
  x0, y0 = tf.floor(src_x), tf.floor(src_y)
  fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  cols = (_reflect(x0, size), _reflect(x0 + 1, size))
  rows = (_reflect(y0, size) * size, _reflect(y0 + 1, size) * size)
  pixels = tf.reshape(x, [size * size, channels])

  def at(row: tf.Tensor, col: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.gather(pixels, row + col), tf.float32)

  top = at(rows[0], cols[0])
  top += fx * (at(rows[0], cols[1]) - top)
  bottom = at(rows[1], cols[0])
  bottom += fx * (at(rows[1], cols[1]) - bottom)
  out = top + fy * (bottom - top)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _geometry(images: tf.Tensor, labels: tf.Tensor, key: tf.Tensor, aug: _Augment,
              train: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """Crop, flip and rotate uint8 images [H,W,C] and label maps [H,W,L] with one draw."""
  tile = images.shape[0]
  crop = aug.crop_size
  keys = tf.random.experimental.stateless_split(key, 6)
  if train:
    offset = tf.random.stateless_uniform([2], keys[0], minval=0, maxval=tile - crop + 1,
                                         dtype=tf.int32)
  else:
    offset = tf.fill([2], (tile - crop) // 2)
  if crop != tile:
    images = tf.slice(images, [offset[0], offset[1], 0], [crop, crop, -1])
    labels = tf.slice(labels, [offset[0], offset[1], 0], [crop, crop, -1])
  if not train:
    return images, labels

  if aug.flip:
    for axis, k in ((1, keys[1]), (0, keys[2])):   # horizontal, then vertical
      flip = tf.random.stateless_uniform([], k) < 0.5
      images = tf.cond(flip, lambda x=images, a=axis: tf.reverse(x, [a]), lambda x=images: x)
      labels = tf.cond(flip, lambda x=labels, a=axis: tf.reverse(x, [a]), lambda x=labels: x)

  if aug.rotation != 'none' and aug.rotation_prob > 0:
    rotate = tf.random.stateless_uniform([], keys[3]) < aug.rotation_prob
    if aug.rotation == 'rot90':
      turns = tf.random.stateless_uniform([], keys[4], minval=1, maxval=4, dtype=tf.int32)
      turns = tf.where(rotate, turns, 0)
      images = tf.image.rot90(images, turns)
      labels = tf.image.rot90(labels, turns)
    else:
      angle = tf.random.stateless_uniform([], keys[4], minval=-math.pi / 2, maxval=math.pi / 2)
      rotate_images = (_rotate_nearest if aug.image_interpolation == 'nearest'
                       else _rotate_bilinear)

      def rotated() -> tuple[tf.Tensor, tf.Tensor]:
        return rotate_images(images, angle), _rotate_nearest(labels, angle)

      images, labels = tf.cond(rotate, rotated, lambda: (images, labels))
  images = tf.ensure_shape(images, [crop, crop, images.shape[-1]])
  labels = tf.ensure_shape(labels, [crop, crop, labels.shape[-1]])
  return images, labels


def _select_bands(s2: tf.Tensor, source: _Source) -> tf.Tensor:
  """The configured band subset, copied as contiguous runs (much faster than a last-axis gather)."""
  indices = source.band_indices
  if indices is None or tuple(indices) == tuple(range(s2.shape[-1])):
    return s2
  runs, start = [], 0
  for i in range(1, len(indices) + 1):
    if i == len(indices) or indices[i] != indices[i - 1] + 1:
      runs.append(s2[..., indices[start]:indices[i - 1] + 1])
      start = i
  return tf.concat(runs, axis=-1)


def _downstream_element(source: _Source, aug: _Augment, with_ids: bool
                        ) -> Callable[[dict[str, tf.Tensor], tf.Tensor, bool],
                                      dict[str, tf.Tensor]]:
  """One patch -> one sample; `label` keeps IGNORE_LABEL (255) as is."""

  def element(ex: dict[str, tf.Tensor], key: tf.Tensor, train: bool) -> dict[str, tf.Tensor]:
    images = tf.concat([ex['s1'], _select_bands(ex['s2'], source)], axis=-1)
    images, label = _geometry(images, ex['label'][..., None], key, aug, train)
    out = {
        's1': images[..., :source.s1_channels],
        's2': images[..., source.s1_channels:],
        'label': tf.cast(label[..., 0], tf.int32),
    }
    if with_ids and 'patch_id' in ex:
      out['patch_id'] = ex['patch_id']
    return out

  return element


# ------------------------------------------------------------------------------------------------
# Record streams (shared by both datasets).


def _map(ds: tf.data.Dataset, fn: Callable[..., Any], **kwargs: Any) -> tf.data.Dataset:
  """Dataset.map without AutoGraph: the element code is plain TF ops with explicit tf.cond."""
  return ds.map(tf.autograph.experimental.do_not_convert(fn), **kwargs)


def _read(path: tf.Tensor) -> tf.data.Dataset:
  return tf.data.TFRecordDataset(path, buffer_size=256 << 10)


def _interleave(files: tf.data.Dataset, num_files: int) -> tf.data.Dataset:
  return files.interleave(_read, cycle_length=max(1, min(num_files, 16)), block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _int_seed(key: tf.Tensor, salt: int) -> tf.Tensor:
  """A scalar int64 seed for ops that take one (Dataset.shuffle), drawn from a stateless key."""
  key = tf.random.experimental.stateless_fold_in(key, salt)
  return tf.random.stateless_uniform([], key, minval=0, maxval=2**31 - 1, dtype=tf.int64)


def _train_records(files: list[str], lengths: list[int], *, base_key: tf.Tensor,
                   start_step: int, steps: int, per_host_batch: int, process_index: int,
                   process_count: int, shuffle_buffer: int, cache: bool) -> tf.data.Dataset:
  """(epoch, index, serialized) for the host's examples of all epochs from `start_step` on.

  Each epoch reshuffles the file order and the examples with seeds from (seed, epoch), shards
  the files (or the examples) over hosts, repeats the host's share if it is shorter than
  `steps * per_host_batch` and numbers the elements, so an element's augmentation key depends
  only on (seed, epoch, process, index).
  """
  shard_files, _ = _host_counts(lengths, process_count)
  if not shard_files and sum(lengths) < process_count:
    raise ValueError(f'The training split has {sum(lengths)} examples, fewer than the '
                     f'{process_count} processes.')
  files_t = tf.constant(files)
  per_epoch = steps * per_host_batch
  start_epoch, offset = divmod(start_step, steps)

  cached = None
  if cache:   # fixed file assignment so that the cached stream is the same every epoch
    host_files = files[process_index::process_count] if shard_files else files
    cached = _interleave(tf.data.Dataset.from_tensor_slices(host_files), len(host_files))
    if not shard_files:
      cached = cached.shard(process_count, process_index)
    cached = cached.cache()

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    epoch_key = tf.random.experimental.stateless_fold_in(base_key, epoch)
    if cached is not None:
      records = cached
    else:
      order = tf.random.experimental.stateless_shuffle(
          files_t, tf.random.experimental.stateless_fold_in(epoch_key, _FILES_SALT))
      if shard_files:
        order = order[process_index::process_count]
      records = _interleave(tf.data.Dataset.from_tensor_slices(order),
                            len(files[process_index::process_count]) if shard_files
                            else len(files))
      if not shard_files:
        records = records.shard(process_count, process_index)
    records = records.shuffle(shuffle_buffer, seed=_int_seed(epoch_key, _SHUFFLE_SALT),
                              reshuffle_each_iteration=True)
    records = records.repeat().take(per_epoch).enumerate()
    skip = tf.where(tf.equal(epoch, start_epoch), tf.constant(offset * per_host_batch, tf.int64),
                    tf.constant(0, tf.int64))
    return _map(records.skip(skip), lambda index, record: (epoch, index, record))

  return tf.data.Dataset.counter(start=start_epoch).flat_map(
      tf.autograph.experimental.do_not_convert(epoch_records))


def _eval_records(files: list[str], lengths: list[int], *, per_host_batch: int,
                  process_index: int, process_count: int
                  ) -> tuple[tf.data.Dataset, int, int]:
  """(serialized, valid) in a fixed order, padded to the same batch count on every host."""
  shard_files, counts = _host_counts(lengths, process_count)
  host_files = files[process_index::process_count] if shard_files else files
  records = _interleave(tf.data.Dataset.from_tensor_slices(host_files), len(host_files))
  if not shard_files:
    records = records.shard(process_count, process_index)
  steps = max(1, math.ceil(max(counts) / per_host_batch))
  pad = steps * per_host_batch - counts[process_index]
  filler = _read(files[0]).take(1).repeat(pad)
  records = _map(records, lambda r: (r, True)).concatenate(
      _map(filler, lambda r: (r, False)))
  return records, steps, counts[process_index]


def _finish(ds: tf.data.Dataset, config: ml_collections.ConfigDict, per_host_batch: int
            ) -> Iterator[Batch]:
  ds = ds.batch(per_host_batch, drop_remainder=True)
  ds = ds.prefetch(config.data.prefetch)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return iter(tfds.as_numpy(ds))


def _create_iterator(config: ml_collections.ConfigDict, source: _Source, split: str, *,
                     train: bool, element_fn: Callable[..., dict[str, tf.Tensor]],
                     start_step: int, num_steps: int | None,
                     seed: int | None, process_index: int | None, process_count: int | None
                     ) -> Iterator[Batch]:
  process_index, process_count = _resolve_hosts(process_index, process_count)
  phb = _per_host_batch(config, process_count)
  files, lengths = _split_files(source, split)
  seed = config.seed if seed is None else seed
  base_key = tf.constant([seed, 0], tf.int64)
  parallel = config.data.num_parallel_calls
  parallel = tf.data.AUTOTUNE if parallel < 0 else parallel
  decode = source.builder.info.features.deserialize_example

  if train:
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0.')
    steps = steps_per_epoch(config, sum(lengths))
    records = _train_records(
        files, lengths, base_key=base_key, start_step=start_step, steps=steps,
        per_host_batch=phb, process_index=process_index, process_count=process_count,
        shuffle_buffer=config.data.shuffle_buffer, cache=bool(config.data.cache))

    def prepare(epoch: tf.Tensor, index: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
      key = base_key
      for value in (epoch, process_index, index):
        key = tf.random.experimental.stateless_fold_in(key, value)
      return element_fn(decode(record), key, True)

    ds = _map(records, prepare, num_parallel_calls=parallel, deterministic=True)
    if num_steps is not None:
      ds = ds.take(num_steps * phb)
    logging.info('%s/%s train stream: host %d/%d, %d examples in the split, %d steps/epoch of '
                 '%d per host, starting at step %d (epoch %d).', source.kind.name, split,
                 process_index, process_count, sum(lengths), steps, phb, start_step,
                 start_step // steps)
  else:
    records, eval_steps, host_count = _eval_records(
        files, lengths, per_host_batch=phb, process_index=process_index,
        process_count=process_count)
    eval_key = tf.random.experimental.stateless_fold_in(base_key, _EVAL_SALT)

    def prepare_eval(record: tf.Tensor, valid: tf.Tensor) -> dict[str, tf.Tensor]:
      out = element_fn(decode(record), eval_key, False)
      out['valid'] = valid
      return out

    ds = _map(records, prepare_eval, num_parallel_calls=parallel, deterministic=True)
    logging.info('%s/%s eval pass: host %d/%d, %d of %d examples in %d batches of %d.',
                 source.kind.name, split, process_index, process_count, host_count,
                 sum(lengths), eval_steps, phb)
  return _finish(ds, config, phb)


# ------------------------------------------------------------------------------------------------
# Pretraining: random access to (location, season) records (pretrain_reader), read with grain.


def _grain_iterator(samples: Any, config: ml_collections.ConfigDict, per_host_batch: int
                    ) -> Iterator[Batch]:
  """Samples -> host batches, made ahead by `data.num_workers` processes (0: threads here).

  Batched before the workers: a worker makes whole batches (reads and stacks in parallel), and
  batch k holds samples [k b, (k + 1) b) whatever the number of workers.
  """
  import grain  # pylint: disable=g-import-not-at-top  (pretraining only)
  workers = config.data.num_workers
  prefetch = config.data.prefetch if config.data.prefetch >= 0 else 2
  batches = samples.batch(per_host_batch, drop_remainder=True)
  if workers > 0:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags (outside an absl app)
      flags.FLAGS.mark_as_parsed()
    ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, -(-prefetch // workers))))
  else:
    ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                                   prefetch_buffer_size=prefetch))
  return iter(ds)


def pretrain_stream(config: ml_collections.ConfigDict, info: PipelineInfo) -> dict[str, Any]:
  """What besides the step fixes the pretraining batches (saved with every checkpoint)."""
  return {'reader': 'location_season_v1', 'train_locations': info.num_train_examples,
          'num_seasons': info.num_seasons, 'seed': int(config.seed),
          'global_batch': info.global_batch, 'steps_per_epoch': info.steps_per_epoch}


def create_pretrain_iterator(config: ml_collections.ConfigDict, split: str = 'train', *,
                             train: bool | None = None, start_step: int = 0,
                             num_steps: int | None = None, seed: int | None = None,
                             process_index: int | None = None,
                             process_count: int | None = None,
                             with_ids: bool = False) -> Iterator[Batch]:
  """Host-local pretraining batches (docs/DESIGN.md 'Batches') of the TFDS `ssl4eo_s12_nol`.

  A training batch holds whole tiles, all uint8 (`labels` is the drawn season's noisy map,
  `season_labels` all of them), for the train step to crop, flip and rotate
  (cromss_jax/augment.py). Evaluation batches are centre crops with int32 `labels` (and
  `clean_labels`) and a `valid` key.

  Args:
    config: the pretraining config (`data`, `training.global_batch_size`, `seed`).
    split: TFDS split to read ('train' or 'validation').
    train: shuffled, one random season per location and endless (True) or one fixed-order pass
      with a fixed season per location, padded to the same batch count on every host (False).
      Defaults to `split == 'train'`.
    start_step: (train) global step of the first batch; resuming at k yields batches k, k+1, ...
      of the run that started at 0.
    num_steps: (train) stop after this many batches; None = endless.
    seed: overrides config.seed.
    process_index: this host (default jax.process_index()); explicit values simulate hosts.
    process_count: number of hosts (default jax.process_count()).
    with_ids: add `location_id` (int64 [b]) to each batch.

  Returns:
    An iterator of numpy dicts with leading dimension global_batch_size // process_count.
  """
  import grain  # pylint: disable=g-import-not-at-top  (pretraining only)
  config_validation.validate_keys(config, ('data.num_workers', 'data.prefetch'))
  source = _load_source(config, _PRETRAIN)
  train = split == 'train' if train is None else train
  process_index, process_count = _resolve_hosts(process_index, process_count)
  phb = _per_host_batch(config, process_count)
  seed = config.seed if seed is None else seed
  locations = _num_locations(source, split)
  reader = pretrain_reader.RecordReader(
      dataset_dir=source.dataset_dir, split=split, num_locations=locations,
      num_seasons=source.num_seasons, tile_size=source.tile_size,
      band_indices=source.band_indices, has_clean_labels=source.has_clean_labels)
  common = dict(train=train, seed=seed, crop=config.data.crop_size, with_ids=with_ids)
  if train:
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0.')
    steps = steps_per_epoch(config, locations)
    sampler = pretrain_reader.PretrainSampler(
        reader, steps_per_epoch=steps, global_batch=config.training.global_batch_size,
        per_host_batch=phb, process_index=process_index, **common)
    end_step = 2**62 // phb if num_steps is None else start_step + num_steps   # 'endless'
    positions = grain.MapDataset.range(start_step * phb, end_step * phb)
    logging.info('%s/%s train stream: host %d/%d, %d locations x %d seasons, %d steps/epoch of '
                 '%d per host, starting at step %d (epoch %d).', source.kind.name, split,
                 process_index, process_count, locations, source.num_seasons, steps, phb,
                 start_step, start_step // steps)
  else:
    host_locations = tuple(range(process_index, locations, process_count))
    eval_steps = max(1, math.ceil(len(range(0, locations, process_count)) / phb))
    sampler = pretrain_reader.PretrainSampler(reader, host_locations=host_locations, **common)
    positions = grain.MapDataset.range(eval_steps * phb)
    logging.info('%s/%s eval pass: host %d/%d, %d of %d locations in %d batches of %d.',
                 source.kind.name, split, process_index, process_count, len(host_locations),
                 locations, eval_steps, phb)
  return _grain_iterator(positions.map(sampler), config, phb)


def create_downstream_iterator(config: ml_collections.ConfigDict, split: str, *, train: bool,
                               start_step: int = 0, num_steps: int | None = None,
                               seed: int | None = None, process_index: int | None = None,
                               process_count: int | None = None,
                               with_ids: bool = False) -> Iterator[Batch]:
  """Host-local batches {s1, s2, label} of a DFC2020-style TFDS dataset.

  `label` is int32 with 255 (constants.IGNORE_LABEL) kept for pixels to ignore. Training
  (`train=True`, usually split 'validation') uses random crops (when crop_size < tile), flips and
  `config.data.rotation` / `rotation_prob` (configs/transfer.py: 'rot90', 0.2); evaluation
  (usually split 'test') is one padded, centre-cropped pass with a `valid` key. Other arguments
  as `create_pretrain_iterator`; `with_ids` adds `patch_id` (bytes [b]).
  """
  source = _load_source(config, _DOWNSTREAM)
  aug = _augment_config(config)
  return _create_iterator(
      config, source, split, train=train,
      element_fn=_downstream_element(source, aug, with_ids),
      start_step=start_step, num_steps=num_steps, seed=seed, process_index=process_index,
      process_count=process_count)
