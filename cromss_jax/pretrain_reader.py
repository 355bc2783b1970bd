"""Random-access reading of the pretraining records: position in a host's stream -> sample.

Kept free of TensorFlow and JAX: grain's worker processes import only this module (and the
TFDS data source, numpy), which keeps each worker at ~70 MB and its start under a second
instead of ~700 MB and ~6 s with TensorFlow.

The records (data_prep.ssl4eo) are one per (location, season), the T seasons of a location
consecutive, so record = location position x T + season. Sample q of an epoch
(q < steps_per_epoch x global_batch) is location order[q mod L] of the epoch's pass q div L over
the L locations, with the season drawn for it; step k of the epoch is samples [k G, (k + 1) G)
and host h takes slice h of length G / P. Every choice is a pure function of (seed, epoch, pass,
position), so a batch depends only on its step: any number of worker processes gives the same
batches, a run resumed at step k continues exactly, and the global batch is the same whatever
the number of hosts.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Salts that keep the random streams of training and evaluation apart.
_TRAIN_SALT, _EVAL_SALT = 4, 3


def epoch_order(seed: int, epoch: int, epoch_pass: int, num_locations: int, num_seasons: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(location order, season at each position) of one pass over the split in one epoch."""
  rng = np.random.default_rng([seed, _TRAIN_SALT, epoch, epoch_pass])
  return rng.permutation(num_locations), rng.integers(0, num_seasons, num_locations)


def eval_season(seed: int, location: int, num_seasons: int) -> int:
  """The fixed season evaluated for a location (by its position in the split)."""
  return int(np.random.default_rng([seed, _EVAL_SALT, location]).integers(num_seasons))


@dataclasses.dataclass(frozen=True)
class RecordReader:
  """Where one split's records are and what a sample keeps of them."""
  dataset_dir: str
  split: str
  num_locations: int
  num_seasons: int
  tile_size: int
  band_indices: tuple[int, ...] | None   # None: the stored S2 bands as they are
  has_clean_labels: bool


class PretrainSampler:
  """position in this host's stream -> one sample (numpy dict), for grain's `map`.

  Training samples are whole uint8 tiles (the train step augments them); evaluation samples are
  centre crops with int32 labels and `valid` (False for the padding that gives every host the
  same number of batches). Picklable: each worker process opens its own data source.
  """

  def __init__(self, reader: RecordReader, *, train: bool, seed: int, crop: int,
               with_ids: bool, steps_per_epoch: int = 0, global_batch: int = 0,
               per_host_batch: int = 0, process_index: int = 0,
               host_locations: tuple[int, ...] = ()):
    self._reader = reader
    self._train = train
    self._seed = seed
    self._crop = crop
    self._with_ids = with_ids
    self._steps_per_epoch = steps_per_epoch
    self._global_batch = global_batch
    self._per_host_batch = per_host_batch
    self._process_index = process_index
    self._host_locations = host_locations
    self._source = None
    self._orders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_source': None, '_orders': {}}

  def _record(self, location: int, season: int) -> dict[str, Any]:
    reader = self._reader
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._source = tfds.builder_from_directory(reader.dataset_dir).as_data_source(reader.split)
    index = location * reader.num_seasons + season
    record = self._source[index]
    if int(record['season']) != season:
      raise ValueError(
          f'{reader.dataset_dir} ({reader.split}): record {index} holds season '
          f'{int(record["season"])}, expected {season}; the records are not in the (location, '
          'season) order `python -m data_prep.ssl4eo` writes. Convert the data again.')
    return record

  def _train_choice(self, q: int) -> tuple[int, int]:
    """Host stream position -> (location position, season)."""
    epoch, within = divmod(q, self._steps_per_epoch * self._per_host_batch)
    step, slot = divmod(within, self._per_host_batch)
    sample = step * self._global_batch + self._process_index * self._per_host_batch + slot
    epoch_pass, position = divmod(sample, self._reader.num_locations)
    key = (epoch, epoch_pass)
    if key not in self._orders:
      if len(self._orders) >= 4:
        self._orders.pop(next(iter(self._orders)))
      self._orders[key] = epoch_order(self._seed, epoch, epoch_pass,
                                      self._reader.num_locations, self._reader.num_seasons)
    order, seasons = self._orders[key]
    return int(order[position]), int(seasons[position])

  def __call__(self, q: int) -> dict[str, np.ndarray]:
    reader = self._reader
    if self._train:
      location, season = self._train_choice(q)
      valid = True
    else:
      valid = q < len(self._host_locations)
      location = self._host_locations[q if valid else 0]
      season = eval_season(self._seed, location, reader.num_seasons)
    record = self._record(location, season)
    s2 = record['s2']
    if reader.band_indices is not None:
      s2 = s2[..., list(reader.band_indices)]
    out = {'s1': record['s1'], 's2': s2, 'labels': record['season_labels'][season],
           'season_labels': record['season_labels'], 'season': np.int32(season)}
    if reader.has_clean_labels:
      out['clean_labels'] = record['clean_labels']
    if not self._train:
      lo = (reader.tile_size - self._crop) // 2
      window = slice(lo, lo + self._crop)
      out['s1'], out['s2'] = out['s1'][window, window], out['s2'][window, window]
      out['season_labels'] = out['season_labels'][:, window, window]
      out['labels'] = out['labels'][window, window].astype(np.int32)
      if reader.has_clean_labels:
        out['clean_labels'] = out['clean_labels'][window, window].astype(np.int32)
      out['valid'] = np.bool_(valid)
    if self._with_ids:
      out['location_id'] = np.int64(record['location_id'])
    return out
