"""DFC2020 (SEN12MS-style 256x256 patches) -> TFDS dataset `dfc2020` for transfer evaluation.

    python -m data_prep.dfc2020 --root RAW/DFC2020 --out DATA/dfc2020 [--workers 16]

Reads `<root>/<split>/{s1,s2,dfc}_<split>/ROIs0000_<split>_{s1,s2,dfc}_0_p<i>.tif` for the splits
`validation` and `test`. One example per patch (docs/DESIGN.md): `s1` uint8 [256,256,2],
`s2` uint8 [256,256,13] (docs/METHOD.md §2.2 normalisation), `label` uint8 [256,256] in the DW-ordered
8 classes (DFC 3 savanna and 8 snow -> 255 = ignore), `patch_id` = `ROIs0000_<split>_0_p<i>`.
Patches are ordered by their number; the S2 file is the reference grid for the other two.

Rejected patches (rejects.csv `location,file,reason`, the `location` column holding the patch
id): a missing or unreadable file, wrong band count or size, CRS/bounds mismatch, NaN/inf in S2
or in the label, label pixels equal to the file's nodata value, DFC codes outside 1..10, an S1
band with no finite value. NaN/inf elsewhere in S1 become 0 and are counted.
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

DATASET_NAME = 'dfc2020'
SPLITS = ('validation', 'test')
PATCH_SIZE = 256
DFC_CODES = (1, 10)


def downstream_features(size: int = PATCH_SIZE) -> tfds.features.FeaturesDict:
  """The downstream record layout of docs/DESIGN.md (DFC2020, SSL4EO-S12@DW/@OSM) for
  size x size patches; uint8 tensors stored as raw bytes."""
  raw = tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict({
      's1': tfds.features.Tensor(shape=(size, size, len(constants.S1_BANDS)), dtype=np.uint8,
                                 encoding=raw),
      's2': tfds.features.Tensor(shape=(size, size, len(constants.S2_BANDS)), dtype=np.uint8,
                                 encoding=raw),
      'label': tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding=raw),
      'patch_id': tfds.features.Tensor(shape=(), dtype=np.str_),
  })


def patch_path(root: str, split: str, modality: str, index: int) -> str:
  return os.path.join(root, split, f'{modality}_{split}',
                      f'ROIs0000_{split}_{modality}_0_p{index}.tif')


def patch_id(split: str, index: int) -> str:
  return f'ROIs0000_{split}_0_p{index}'


@dataclasses.dataclass(frozen=True)
class Dfc2020Converter(common.Converter):
  """(split, patch number) -> one `dfc2020` example."""
  root: str
  grid_tolerance_px: float = 0.5

  name = DATASET_NAME
  unit = 'patch'
  counter_names = ('non_finite_values',)

  def features(self) -> tfds.features.FeaturesDict:
    return downstream_features()

  def item_name(self, item: Any) -> str:
    return patch_id(*item)

  def fingerprint(self) -> dict[str, Any]:
    return {'root': os.path.abspath(self.root), 'grid_tolerance_px': self.grid_tolerance_px}

  def convert(self, item: Any) -> tuple[dict[str, Any], dict[str, int]]:
    split, index = item
    shape = (PATCH_SIZE, PATCH_SIZE)
    s2_path = patch_path(self.root, split, 's2', index)
    s2, ref = common.read_raster(s2_path, count=len(constants.S2_BANDS), native_shape=shape)
    common.check_same_grid(ref, ref, self.grid_tolerance_px)
    common.check_finite(s2, s2_path, 'S2')
    s1_path = patch_path(self.root, split, 's1', index)
    s1, info = common.read_raster(s1_path, count=len(constants.S1_BANDS), native_shape=shape)
    common.check_same_grid(info, ref, self.grid_tolerance_px)
    for band, name in zip(s1, constants.S1_BANDS):
      common.check_not_all_non_finite(band, s1_path, f'S1 {name}')
    dfc_path = patch_path(self.root, split, 'dfc', index)
    dfc, info = common.read_raster(dfc_path, count=1, native_shape=shape)
    common.check_same_grid(info, ref, self.grid_tolerance_px)
    codes = common.check_labels(dfc[0], info, DFC_CODES)
    s1_u8, non_finite = constants.normalise_to_uint8(np.moveaxis(s1, 0, -1), constants.S1_MEAN,
                                                     constants.S1_STD)
    s2_u8, _ = constants.normalise_to_uint8(np.moveaxis(s2, 0, -1), constants.S2_MEAN,
                                            constants.S2_STD)
    example = {'s1': s1_u8, 's2': s2_u8, 'label': constants.dfc_lookup_table()[codes],
               'patch_id': patch_id(split, index)}
    return example, {'non_finite_values': non_finite}


def discover_patches(root: str) -> dict[str, list[tuple[str, int]]]:
  """Patch numbers per split seen in any of the three folders (a one-sided patch is rejected)."""
  if not os.path.isdir(root):
    raise common.ConversionError(f'{root} is not a directory')
  splits = {}
  for split in SPLITS:
    numbers = set()
    for modality in ('s1', 's2', 'dfc'):
      folder = os.path.join(root, split, f'{modality}_{split}')
      pattern = re.compile(rf'ROIs0000_{split}_{modality}_0_p(\d+)\.tif$')
      if os.path.isdir(folder):
        numbers.update(int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m)
    if not numbers:
      logging.warning('No %s patches under %s', split, os.path.join(root, split))
    splits[split] = [(split, i) for i in sorted(numbers)]
  return splits


def build_parser() -> argparse.ArgumentParser:
  parser = argparse_flags.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                         inherited_absl_flags=None)
  parser.add_argument('--root', required=True,
                      help='DFC2020 root holding validation/ and test/ folders.')
  common.add_shared_arguments(parser)
  return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts as the parsed command line says; returns the conversion summary."""
  converter = Dfc2020Converter(root=os.path.abspath(args.root),
                               grid_tolerance_px=args.grid_tolerance_px)
  splits = discover_patches(converter.root)
  if args.limit is not None:
    splits = {k: v[:args.limit] for k, v in splits.items()}
  logging.info('Patches: %s', {k: len(v) for k, v in splits.items()})
  return common.run_conversion(
      converter, splits, args.out, examples_per_shard=args.examples_per_shard,
      workers=args.workers, strict=args.strict, overwrite=args.overwrite,
      max_retries=args.max_retries, plan_args={'limit': args.limit},
      description='DFC2020 S1+S2 patches with labels mapped to the DW-ordered 8 classes, '
                  'converted by data_prep.dfc2020.')


main, _entry = common.cli_entry(run, build_parser)


if __name__ == '__main__':
  # Run the importable module's entry so that pickled objects name `data_prep.dfc2020`.
  from data_prep import dfc2020 as _dfc2020  # pylint: disable=g-import-not-at-top
  _dfc2020._entry()  # pylint: disable=protected-access
