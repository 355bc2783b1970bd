"""SSL4EO-S12@DW and SSL4EO-S12@OSM (NoLDO-S12 downstream sets) -> TFDS for transfer evaluation.

    python -m data_prep.ssl4eo_dwosm --root RAW/ssl4eo_s12_dw --labels dw --out DATA/ssl4eo_s12_dw
    python -m data_prep.ssl4eo_dwosm --root RAW/ssl4eo_s12_osm --labels osm --out DATA/ssl4eo_s12_osm

Raw layout (the released tiles): split folders `<labels>_<split>` (dw_train, dw_test, osm_train,
osm_test; another suffix such as `osm_train_large` becomes split `train_large`) directly under
`--root` or up to two levels below it, each holding
  image_s1/s1_<id>.tif        2 bands VV, VH, float32 dB
  image_s2/s2_<id>.tif        13 bands B1..B12 (L1C, x1e4, int16/uint16)
  label_<labels>/<labels>_<id>.tif
on one grid: 510 x 510 px (DW expert training tiles) or 512 x 512 px (DW hold-out tiles).
OSM split folders also hold `label_dw/`, which is not read.

One example per tile, the record format of `data_prep.dfc2020` (docs/DESIGN.md): `s1` uint8
[512,512,2], `s2` uint8 [512,512,13], `label` uint8 [512,512] with 255 = ignore, `patch_id` =
`<id>`. TFDS names `ssl4eo_s12_dw` / `ssl4eo_s12_osm`, splits `train` and `test` (the release:
DW 3,574 / 340 tiles, OSM 1,375 / 400). There is no validation split: the reference scripts
train on `train` and score `test` every epoch, as the transfer loop here does.

Labels, as the CromSS reader maps them:
* DW: file value 0 (unlabelled: the experts left ambiguous areas unmarked) and 10 (cloud) ->
  255; 1..9 -> the 9 classes 0..8 (Water, Trees, Grass, Flooded vegetation, Crops,
  Shrub & scrub, Built area, Bare ground, Snow & ice). A label file with several bands uses
  its second band (as the reference does).
* OSM: 0 (no OSM land use) -> 255; 1..13 -> the 13 classes 0..12.
Pixels equal to the label file's nodata value (if it declares one) are ignored too (counted).

Tile size: 510 px tiles are padded by one pixel on every side to 512 (images replicate their
edge pixels, as the reference pads its tiles; labels are padded with 255, so no label pixel is
invented), so both splits share one record shape (counted as `padded_tiles`).

Normalisation (differs from the pretraining records): the tiles are raw L1C / dB values, and
the CromSS DW/OSM reader normalises them per band on reading with the same statistics and
mean +- 2 std window as the pretraining set (constants.S2_MEAN/S2_STD, S1_MEAN/S1_STD), but
truncates to uint8 (`astype(uint8)` after scaling to [0, 255] in float32) where the pretraining
records (docs/METHOD.md §2.2, `constants.normalise_to_uint8`) round. `--quantise floor` (default)
reproduces the reference's bytes; `--quantise round` gives the pretraining records' rounding.
S1 NaN/inf become 0 and are counted (the reference leaves that cast undefined). As in the
reference, no processing-baseline DN offset is removed from S2.

Rejected tiles (rejects.csv, the `location` column holding `<split>/<id>`): a missing or
unreadable file, a size other than 510/512, S1/S2/label sizes or grids that disagree, wrong
band counts, NaN/inf in S2 or the label, label values outside the table above, an S1 band with
no finite value.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from absl import logging
from absl.flags import argparse_flags
import numpy as np
import tensorflow_datasets as tfds

from cromss_jax import constants
from data_prep import common
from data_prep import dfc2020

LABEL_KINDS = ('dw', 'osm')
DATASET_NAMES = {'dw': 'ssl4eo_s12_dw', 'osm': 'ssl4eo_s12_osm'}
TILE_SIZE = 512                 # stored size; 510 px tiles are padded to it
NATIVE_SIZES = (510, 512)
IGNORE = constants.IGNORE_LABEL

DW_CLASSES = constants.DW_CLASSES
DW_CLOUD_CODE = 10              # the reference drops DW's cloud value with the unlabelled 0
OSM_CLASSES = ('Urban', 'Arable land', 'Forest', 'Industrial', 'Artificial vegetation',
               'Dump site', 'Pasture', 'Permanent crops', 'Water', 'Open space', 'Shrub',
               'Wetland', 'Coastal')
CLASS_NAMES = {'dw': DW_CLASSES, 'osm': OSM_CLASSES}
QUANTISE = ('floor', 'round')


def label_lookup_table(labels: str) -> tuple[np.ndarray, int]:
  """(uint8[256] file value -> class or 255, largest valid file value)."""
  table = np.full(256, IGNORE, np.uint8)
  if labels == 'dw':
    table[1:len(DW_CLASSES) + 1] = np.arange(len(DW_CLASSES))
    return table, DW_CLOUD_CODE
  table[1:len(OSM_CLASSES) + 1] = np.arange(len(OSM_CLASSES))
  return table, len(OSM_CLASSES)


def normalise_truncated(x: np.ndarray, mean: Any, std: Any) -> tuple[np.ndarray, int]:
  """The CromSS DW/OSM reader's per-band normalisation: float32 (x - (m-2s)) / 4s * 255, clipped
  to [0, 255] and truncated to uint8. Bands on the last axis; non-finite values become 0.

  Returns the uint8 array and the number of non-finite input values.
  """
  x = np.asarray(x, np.float32)
  finite = np.isfinite(x)
  out = np.empty(x.shape, np.uint8)
  for band, (m, s) in enumerate(zip(mean, std)):
    lo, hi = m - 2 * s, m + 2 * s           # float64, as the reference computes them
    v = (np.where(finite[..., band], x[..., band], np.float32(lo)) - np.float32(lo))
    v = v / np.float32(hi - lo) * np.float32(255.0)
    out[..., band] = np.clip(v, 0, 255).astype(np.uint8)
  out[~finite] = 0
  return out, int(np.count_nonzero(~finite))


def pad_to_tile(images: np.ndarray, label: np.ndarray, size: int = TILE_SIZE
                ) -> tuple[np.ndarray, np.ndarray]:
  """[H,W,C] images and [H,W] labels centred in size x size: images edge-replicated, labels 255."""
  extra = size - images.shape[0]
  before, after = extra // 2, extra - extra // 2
  images = np.pad(images, ((before, after), (before, after), (0, 0)), mode='edge')
  label = np.pad(label, ((before, after), (before, after)), constant_values=IGNORE)
  return images, label


def tile_path(split_dir: str, labels: str, modality: str, tile_id: str) -> str:
  """modality: 's1', 's2' or 'label'."""
  if modality == 'label':
    return os.path.join(split_dir, f'label_{labels}', f'{labels}_{tile_id}.tif')
  return os.path.join(split_dir, f'image_{modality}', f'{modality}_{tile_id}.tif')


@dataclasses.dataclass(frozen=True)
class DwOsmConverter(common.Converter):
  """(split, tile id) -> one example of `ssl4eo_s12_dw` / `ssl4eo_s12_osm`."""
  root: str
  labels: str
  split_dirs: tuple[tuple[str, str], ...]   # (split, folder relative to root)
  quantise: str = 'floor'
  grid_tolerance_px: float = 0.5

  unit = 'tile'
  counter_names = ('non_finite_values', 'padded_tiles', 'nodata_label_pixels')

  @property
  def name(self) -> str:  # type: ignore[override]
    return DATASET_NAMES[self.labels]

  def features(self) -> tfds.features.FeaturesDict:
    return dfc2020.downstream_features(TILE_SIZE)

  def item_name(self, item: Any) -> str:
    return f'{item[0]}/{item[1]}'

  def fingerprint(self) -> dict[str, Any]:
    return {'root': os.path.abspath(self.root), 'labels': self.labels,
            'quantise': self.quantise, 'grid_tolerance_px': self.grid_tolerance_px,
            'split_dirs': [list(s) for s in self.split_dirs]}

  def _normalise(self, x: np.ndarray, mean: Any, std: Any) -> tuple[np.ndarray, int]:
    if self.quantise == 'round':
      return constants.normalise_to_uint8(x, mean, std)
    return normalise_truncated(x, mean, std)

  def _label(self, path: str, shape: tuple[int, int], ref: common.RasterInfo
             ) -> tuple[np.ndarray, int]:
    count = common.read_info(path).count
    if self.labels == 'osm' and count != 1:
      raise common.BadInput(path, f'band_count: {count} bands, expected 1')
    data, info = common.read_raster(path, count=count, native_shape=shape)
    common.check_same_grid(info, ref, self.grid_tolerance_px)
    values = data[1] if count > 1 else data[0]
    if np.issubdtype(values.dtype, np.floating):
      bad = np.count_nonzero(~np.isfinite(values))
      if bad:
        raise common.BadInput(path, f'label_non_finite: {bad} NaN/inf pixels')
    nodata = np.zeros(values.shape, bool)
    if info.nodata is not None and np.isfinite(info.nodata):
      nodata = values == info.nodata
    valid = values[~nodata]
    table, top = label_lookup_table(self.labels)
    if valid.size:
      if np.issubdtype(valid.dtype, np.floating) and np.any(valid != np.round(valid)):
        raise common.BadInput(path, 'label_out_of_range: non-integer label values')
      lo, hi = float(valid.min()), float(valid.max())
      if lo < 0 or hi > top:
        raise common.BadInput(path, f'label_out_of_range: values {lo:g}..{hi:g}, expected '
                              f'0..{top}')
    codes = np.where(nodata, 0, values).astype(np.uint8)
    return table[codes], int(np.count_nonzero(nodata))

  def convert(self, item: Any) -> tuple[dict[str, Any], dict[str, int]]:
    split, tile_id = item
    split_dir = os.path.join(self.root, dict(self.split_dirs)[split])
    s2_path = tile_path(split_dir, self.labels, 's2', tile_id)
    shape = common.read_info(s2_path).shape
    if shape[0] != shape[1] or shape[0] not in NATIVE_SIZES:
      raise common.BadInput(s2_path, f'size_mismatch: {shape[0]}x{shape[1]} px, expected '
                            '510x510 or 512x512')
    s2, ref = common.read_raster(s2_path, count=len(constants.S2_BANDS), native_shape=shape)
    common.check_same_grid(ref, ref, self.grid_tolerance_px)
    common.check_finite(s2, s2_path, 'S2')
    s1_path = tile_path(split_dir, self.labels, 's1', tile_id)
    s1, info = common.read_raster(s1_path, count=len(constants.S1_BANDS), native_shape=shape)
    common.check_same_grid(info, ref, self.grid_tolerance_px)
    for band, name in zip(s1, constants.S1_BANDS):
      common.check_not_all_non_finite(band, s1_path, f'S1 {name}')
    label, nodata_pixels = self._label(tile_path(split_dir, self.labels, 'label', tile_id),
                                       shape, ref)
    s1_u8, non_finite = self._normalise(np.moveaxis(s1, 0, -1), constants.S1_MEAN,
                                        constants.S1_STD)
    s2_u8, _ = self._normalise(np.moveaxis(s2, 0, -1), constants.S2_MEAN, constants.S2_STD)
    images = np.concatenate([s1_u8, s2_u8], axis=-1)
    padded = int(shape[0] != TILE_SIZE)
    if padded:
      images, label = pad_to_tile(images, label)
    example = {'s1': images[..., :2], 's2': images[..., 2:], 'label': label,
               'patch_id': tile_id}
    return example, {'non_finite_values': non_finite, 'padded_tiles': padded,
                     'nodata_label_pixels': nodata_pixels}


def find_split_dirs(root: str, labels: str) -> dict[str, str]:
  """split -> folder (relative to root) of every `<labels>_<split>` folder with an image_s2/."""
  if not os.path.isdir(root):
    raise common.ConversionError(f'{root} is not a directory')
  pattern = re.compile(rf'{labels}_(\w+)$')
  found: dict[str, str] = {}
  level = ['']
  for _ in range(3):   # root itself, and up to two levels below
    below = []
    for rel in level:
      folder = os.path.join(root, rel)
      for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
          continue
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(path, 'image_s2')):
          split = match.group(1)
          if split in found:
            raise common.ConversionError(
                f'two {labels}_{split} folders under {root}: {found[split]} and '
                f'{os.path.join(rel, name)}; point --root at one of their parents')
          found[split] = os.path.join(rel, name)
        else:
          below.append(os.path.join(rel, name))
    if found:
      return found
    level = below
  raise common.ConversionError(
      f'no {labels}_train / {labels}_test folder (with image_s2/ inside) under {root} or two '
      f'levels below it; is --labels {labels} right?')


def discover_tiles(root: str, labels: str, split_dirs: dict[str, str]
                   ) -> dict[str, list[tuple[str, str]]]:
  """Tile ids per split seen in any of the three folders (a one-sided tile is rejected)."""
  prefixes = {'image_s1': 's1_', 'image_s2': 's2_', f'label_{labels}': f'{labels}_'}
  splits = {}
  for split, rel in sorted(split_dirs.items()):
    ids = set()
    for folder, prefix in prefixes.items():
      path = os.path.join(root, rel, folder)
      if os.path.isdir(path):
        ids.update(f[len(prefix):-len('.tif')] for f in os.listdir(path)
                   if f.startswith(prefix) and f.endswith('.tif'))
    if not ids:
      logging.warning('No tiles under %s', os.path.join(root, rel))
    splits[split] = [(split, i) for i in sorted(ids)]
  return splits


def build_parser() -> argparse.ArgumentParser:
  parser = argparse_flags.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                         inherited_absl_flags=None)
  parser.add_argument('--root', required=True,
                      help='Folder holding the <labels>_train/ and <labels>_test/ folders '
                           '(or up to two levels above them).')
  parser.add_argument('--labels', required=True, choices=LABEL_KINDS,
                      help='dw: SSL4EO-S12@DW (9 classes); osm: SSL4EO-S12@OSM (13 classes).')
  parser.add_argument('--quantise', choices=QUANTISE, default='floor',
                      help="floor: the CromSS DW/OSM reader's truncation to uint8 (default); "
                           'round: the rounding of the pretraining records.')
  common.add_shared_arguments(parser)
  return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts as the parsed command line says; returns the conversion summary."""
  root = os.path.abspath(args.root)
  split_dirs = find_split_dirs(root, args.labels)
  converter = DwOsmConverter(root=root, labels=args.labels,
                             split_dirs=tuple(sorted(split_dirs.items())),
                             quantise=args.quantise, grid_tolerance_px=args.grid_tolerance_px)
  splits = discover_tiles(root, args.labels, split_dirs)
  if args.limit is not None:
    splits = {k: v[:args.limit] for k, v in splits.items()}
  logging.info('Tiles: %s', {k: len(v) for k, v in splits.items()})
  classes = ', '.join(f'{i} {n}' for i, n in enumerate(CLASS_NAMES[args.labels]))
  return common.run_conversion(
      converter, splits, args.out, examples_per_shard=args.examples_per_shard,
      workers=args.workers, strict=args.strict, overwrite=args.overwrite,
      plan_args={'limit': args.limit},
      description=f'SSL4EO-S12@{args.labels.upper()} S1+S2 tiles (512 px) with classes '
                  f'{classes}; 255 = ignore. Converted by data_prep.ssl4eo_dwosm '
                  f'(--quantise {args.quantise}).')


main, _entry = common.cli_entry(run, build_parser)


if __name__ == '__main__':
  # Run the importable module's entry so that pickled objects name `data_prep.ssl4eo_dwosm`.
  from data_prep import ssl4eo_dwosm as _ssl4eo_dwosm  # pylint: disable=g-import-not-at-top
  _ssl4eo_dwosm._entry()  # pylint: disable=protected-access
